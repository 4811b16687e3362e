"""Poolers that turn token states into one vector per sentence."""

from __future__ import annotations

from torch import Tensor

from core.tensors import masked_mean

#: ``cls``: the first token ([CLS]); ``cls_before_pooler``: the same vector, named as in SimCSE for a model
#: evaluated without its MLP; ``mean``: masked mean over all tokens, special tokens included (the
#: sentence-transformers default); ``first_last_avg``: mean over tokens of (hidden_states[1] + hidden_states[-1]) / 2.
POOLERS = ("cls", "cls_before_pooler", "mean", "first_last_avg")


def pool(hidden_states: tuple[Tensor, ...], mask_BL: Tensor, pooler: str) -> Tensor:
    """Pool a model's hidden states.

    Args:
        hidden_states: the embeddings output followed by every layer's output, each (B, L, D), as returned by
            Hugging Face models with ``output_hidden_states=True``. Only ``first_last_avg`` reads more than the last.
        mask_BL: attention mask, 1 for real tokens.
        pooler: one of :data:`POOLERS`.
    """
    last_BLD = hidden_states[-1]
    if pooler in ("cls", "cls_before_pooler"):
        return last_BLD[:, 0]
    if pooler == "mean":
        return masked_mean(last_BLD, mask_BL)
    if pooler == "first_last_avg":
        return masked_mean((hidden_states[1] + last_BLD) / 2, mask_BL)
    raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")


def needs_all_layers(pooler: str) -> bool:
    return pooler == "first_last_avg"


__all__ = ["POOLERS", "masked_mean", "pool", "needs_all_layers"]
