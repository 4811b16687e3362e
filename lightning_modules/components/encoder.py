"""A Hugging Face encoder with its tokenizer, a pooler and an optional SimCSE MLP head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from core.hub import check_max_length, load_pretrained
from core.tensors import eval_mode, pad_ids
from lightning_modules.components.heads import MLPHead
from lightning_modules.components.pooling import POOLERS, needs_all_layers, pool

MLPMode = Literal["train_only", "always", "none"]


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face activation (gradient) checkpointing of every layer, non-reentrant (RNG replayed)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: nn.Module) -> bool:
    """Whether :func:`enable_checkpointing` is in effect."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


class Encoder(nn.Module):
    """Sentence encoder: transformer -> pooler -> (MLP head).

    Args:
        model_name_or_path: Hugging Face hub name or local folder of any encoder model.
        pooler: one of ``cls``, ``cls_before_pooler``, ``mean``, ``first_last_avg``.
        mlp: when the MLP head (Linear(D, D) + Tanh) is applied. ``train_only`` (unsupervised SimCSE: used in
            training, dropped at inference), ``always`` (supervised SimCSE), ``none``. Default: ``train_only`` for
            ``cls``, ``none`` for the other poolers.
        max_length: tokens kept per sentence (truncation).
        attn_implementation: passed to ``from_pretrained`` (e.g. ``sdpa``, ``eager``); None keeps the default.
        gradient_checkpointing: recompute each transformer layer's activations in the backward pass instead of
            keeping them (Hugging Face's activation / gradient checkpointing, ``use_reentrant=False``: it replays
            the RNG, so dropout masks and gradients are unchanged). Less memory, about one more forward pass.
        compile: ``torch.compile`` the transformer in place (``nn.Module.compile``, so parameter names and
            checkpoints are unchanged) with ``dynamic=True``: one graph serves every batch size and padded length.
            For GPUs; on CPU compiling costs minutes (docs/pitfalls.md #10).
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooler: str = "cls",
        mlp: MLPMode | None = None,
        max_length: int = 32,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
        if mlp is None:
            mlp = "train_only" if pooler == "cls" else "none"
        if mlp not in ("train_only", "always", "none"):
            raise ValueError(f"unknown mlp mode {mlp!r}; choose train_only, always or none")
        if pooler == "cls_before_pooler" and mlp != "none":
            raise ValueError("pooler 'cls_before_pooler' means the [CLS] vector without the MLP: set mlp to 'none'")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model, self.tokenizer = load_pretrained(model_name_or_path, **kwargs)
        check_max_length(max_length, self.model, model_name_or_path)
        # from_pretrained returns eval mode; SimCSE's dropout views need train mode (docs/pitfalls.md #1).
        self.model.train()
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        if compile:
            self.model.compile(dynamic=True)
        self.model_name_or_path = model_name_or_path
        self.pooler = pooler
        self.mlp_mode: MLPMode = mlp
        self.max_length = max_length
        self.dim: int = self.model.config.hidden_size
        self.mlp = MLPHead(self.dim) if mlp != "none" else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Embed a padded batch: (B, L) ids -> (B, D) embeddings."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=needs_all_layers(self.pooler),
            **extra,
        )
        hidden = out.hidden_states if needs_all_layers(self.pooler) else (out.last_hidden_state,)
        z_BD = pool(hidden, attention_mask, self.pooler)
        if self.mlp is not None and (self.training or self.mlp_mode == "always"):
            z_BD = self.mlp(z_BD)
        return z_BD

    # ----------------------------------------------------------------------------------------------- inference
    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence, truncated to ``max_length``, unpadded (pad later, per batch)."""
        # ids only: building each sentence's attention mask and token types in Python took a third of encode's time
        return self.tokenizer(list(sentences), truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad a list of token id lists to the longest one: ``input_ids`` and ``attention_mask`` (B, L)."""
        input_ids, mask = pad_ids(ids, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask.long()}

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 128) -> Tensor:
        """Embed pre-tokenised sentences without dropout, in length-sorted batches; returns (N, D) float32 on CPU."""
        device = next(self.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dim)
        with eval_mode(self):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in self.collate([ids[i] for i in rows]).items()}
                out[rows] = self(**batch).float().cpu()
        return out

    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> Tensor:
        """Embed raw sentences (inference path: no dropout, MLP only if ``mlp='always'``)."""
        return self.encode_ids(self.tokenize(sentences), batch_size=batch_size)
