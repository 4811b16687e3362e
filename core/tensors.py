"""Tensor helpers both data and models use: padding token ids, the masked mean over tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def pad_ids(sequences: Sequence[Sequence[int]], pad_token_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """``(input_ids, mask)``, both (N, L): the sequences right-padded to ``length`` (default: the longest one), and
    True where a token stands. Every token is copied at once (the mask's True entries in row-major order are the
    sequences' tokens in order), not a slice per sequence: that was ~3 ms of Python a batch of 64 pairs."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    L = int(lengths.max()) if length is None else length
    mask = torch.arange(L) < lengths[:, None]
    input_ids = torch.full((len(sequences), L), pad_token_id, dtype=torch.long)
    input_ids[mask] = torch.tensor([i for ids in sequences for i in ids], dtype=torch.long)
    return input_ids, mask


def masked_mean(tokens_BLD: Tensor, mask_BL: Tensor) -> Tensor:
    """Mean over the positions where ``mask_BL`` is 1 (padding excluded, [CLS]/[SEP] included)."""
    mask_BL1 = mask_BL.unsqueeze(-1).to(tokens_BLD.dtype)
    return (tokens_BLD * mask_BL1).sum(1) / mask_BL1.sum(1).clamp(min=1e-9)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout; an SAE's codes from its threshold) inside the block, its own mode
    restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
