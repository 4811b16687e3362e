"""Maximal coding rate reduction (MCR2) and a similarity-distillation term, for compressing embeddings.

With features Z (m x d), rows on the unit sphere, and a quantisation error ``eps2`` (epsilon squared):

- coding rate ``R(Z) = 1/2 logdet(I_d + d / (m eps2) Z^T Z)``
- grouped coding rate ``R_c(Z) = sum_j m_j / (2m) logdet(I_d + d / (m_j eps2) Z_j^T Z_j)`` over groups j
- rate reduction ``Delta R = R - R_c``; the loss minimised is ``-gamma R + R_c``.

References: Yu et al., "Learning Diverse and Discriminative Representations via the Principle of Maximal Coding
Rate Reduction" (NeurIPS 2020), whose public code builds one dense m x m membership matrix per class; here groups
are sorted once and sliced into zero-padded blocks, and each log-determinant uses the smaller side of
``logdet(I_d + c Z^T Z) = logdet(I_m + c Z Z^T)``. Severdija et al. (arXiv 2304.12674) train such a projection
on a frozen Sentence-BERT. Every log-determinant is taken in float32 with autocast disabled (Cholesky).

The rate depends on m: compute it on the batch gathered over all ranks (the paper uses m = 1000).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


def _float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


def logdet_identity_plus_gram(z_KSD: Tensor, scale_K: Tensor | float) -> Tensor:
    """``logdet(I_D + c_k Z_k^T Z_k)`` for each block k of ``z_KSD`` (K, S, D), or for one (S, D) matrix.

    Uses the S x S side when S < D (same value), a Cholesky factorisation without a host sync
    (``cholesky_ex``), and float32 with autocast off. A failed factorisation (not positive definite in float32,
    e.g. a huge scale on repeated rows) gives NaN for that block instead of a silently wrong number.
    Zero rows (padding) leave the value unchanged.
    """
    single = z_KSD.dim() == 2
    z_KSD = z_KSD.unsqueeze(0) if single else z_KSD
    with torch.autocast(device_type=z_KSD.device.type, enabled=False):
        z_KSD = _float32(z_KSD)
        S, D = z_KSD.shape[-2:]
        gram_KNN = z_KSD @ z_KSD.mT if S < D else z_KSD.mT @ z_KSD
        if isinstance(scale_K, Tensor):
            gram_KNN = scale_K.float().reshape(-1, 1, 1) * gram_KNN
        else:  # a Python number: no host-to-device copy
            gram_KNN = scale_K * gram_KNN
        eye_NN = torch.eye(gram_KNN.shape[-1], dtype=torch.float32, device=z_KSD.device)
        chol_KNN, info_K = torch.linalg.cholesky_ex(eye_NN + gram_KNN)
        logdet_K = 2 * chol_KNN.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_K = torch.where(info_K == 0, logdet_K, torch.full_like(logdet_K, float("nan")))
    return logdet_K[0] if single else logdet_K


def coding_rate(z_MD: Tensor, eps2: float = 0.5) -> Tensor:
    """``R(Z) = 1/2 logdet(I_d + d / (m eps2) Z^T Z)`` (a float32 scalar)."""
    m, d = z_MD.shape
    return logdet_identity_plus_gram(z_MD, d / (m * eps2)) / 2


class GroupBlocks(NamedTuple):
    """The rows of each group, zero-padded to the largest group: ``blocks_KSD`` (K groups) and sizes ``counts_K``."""

    blocks_KSD: Tensor
    counts_K: Tensor


def group_blocks(z_MD: Tensor, groups_M: Tensor | int) -> GroupBlocks:
    """Split rows into groups by sorting once and slicing (never a dense m x m membership matrix).

    Args:
        z_MD: features.
        groups_M: an integer group id per row (any values), or an int S meaning consecutive blocks of S rows
            (``m`` must be a multiple of S; no sort and no host sync).
    """
    m, d = z_MD.shape
    if isinstance(groups_M, int):
        if groups_M < 1 or m % groups_M:
            raise ValueError(f"group size {groups_M} does not divide the {m} rows")
        K = m // groups_M
        return GroupBlocks(z_MD.reshape(K, groups_M, d), torch.full((K,), groups_M, device=z_MD.device))
    if groups_M.shape != (m,):
        raise ValueError(f"groups_M must hold one group id per row: shape {tuple(groups_M.shape)} for {m} rows")
    order_M = torch.argsort(groups_M, stable=True)
    _, counts_K = torch.unique_consecutive(groups_M[order_M], return_counts=True)
    # The one host sync: block shapes depend on how many rows each group has in this batch.
    slices = torch.split(z_MD[order_M], counts_K.tolist())
    return GroupBlocks(pad_sequence(slices, batch_first=True), counts_K)


def grouped_coding_rate(z_MD: Tensor, groups_M: Tensor | int, eps2: float = 0.5) -> Tensor:
    """``R_c(Z) = sum_j m_j / (2m) logdet(I_d + d / (m_j eps2) Z_j^T Z_j)``; see :func:`group_blocks` for groups."""
    return _blocks_rate(group_blocks(z_MD, groups_M), z_MD.shape[0], eps2)


def _blocks_rate(groups: GroupBlocks, m: int, eps2: float) -> Tensor:
    d = groups.blocks_KSD.shape[-1]
    counts_K = groups.counts_K.float()
    logdet_K = logdet_identity_plus_gram(groups.blocks_KSD, d / (counts_K * eps2))
    return (counts_K / (2 * m) * logdet_K).sum()


class MCR2Output(NamedTuple):
    """Loss and its parts (float32 scalars; ``distill`` is 0 without a teacher).

    Attributes:
        loss: ``-gamma R + R_c + distill_weight * distill``.
        rate: R of the whole batch.
        rate_c: R_c, the group-wise rate.
        distill: mean squared difference of the off-diagonal cosine similarities (student vs teacher).
        smallest_group: size of the smallest group in the batch (diagnostics for non-finite losses).
    """

    loss: Tensor
    rate: Tensor
    rate_c: Tensor
    distill: Tensor
    smallest_group: Tensor

    @property
    def delta_r(self) -> Tensor:
        return self.rate - self.rate_c


def cosine_distillation(student_MK: Tensor, teacher_MD: Tensor) -> Tensor:
    """Mean over pairs i != j of ``(cos(s_i, s_j) - cos(t_i, t_j))^2``: keeps graded similarity, which MCR2 alone
    does not preserve. Float32, autocast off; the teacher side carries no gradient."""
    m = student_MK.shape[0]
    with torch.autocast(device_type=student_MK.device.type, enabled=False):
        s_MK = F.normalize(_float32(student_MK), dim=-1)
        t_MD = F.normalize(_float32(teacher_MD.detach()), dim=-1)
        diff_MM = s_MK @ s_MK.T - t_MD @ t_MD.T  # the diagonal is 1 - 1 = 0 up to rounding
        diff_MM = diff_MM - torch.diag_embed(diff_MM.diagonal())
    return diff_MM.pow(2).sum() / max(m * (m - 1), 1)


def mcr2_loss(
    z_MK: Tensor,
    groups_M: Tensor | int,
    eps2: float = 0.5,
    gamma: float = 1.0,
    teacher_MD: Tensor | None = None,
    distill_weight: float = 0.0,
) -> MCR2Output:
    """MCR2 objective on L2-normalised rows of ``z_MK`` (rescaling would otherwise grow the rate without bound).

    Args:
        z_MK: student features of the whole (gathered) batch.
        groups_M: group id per row, or an int S for consecutive groups of S rows (e.g. S = 2: (premise,
            entailment) pairs laid out as rows 2i, 2i + 1).
        eps2: epsilon squared, the quantisation error (paper default 0.5).
        gamma: weight of R.
        teacher_MD: teacher embeddings of the same rows, for the optional distillation term.
        distill_weight: weight of :func:`cosine_distillation` (0 skips it).
    """
    with torch.autocast(device_type=z_MK.device.type, enabled=False):
        z_MK = F.normalize(_float32(z_MK), dim=-1)
        rate = coding_rate(z_MK, eps2)
        groups = group_blocks(z_MK, groups_M)
        rate_c = _blocks_rate(groups, z_MK.shape[0], eps2)
        loss = -gamma * rate + rate_c
        distill = torch.zeros((), device=z_MK.device)
        if distill_weight:
            if teacher_MD is None:
                raise ValueError("distill_weight > 0 needs teacher_MD")
            distill = cosine_distillation(z_MK, teacher_MD)
            loss = loss + distill_weight * distill
    return MCR2Output(loss, rate, rate_c, distill, groups.counts_K.min())


__all__ = [
    "GroupBlocks",
    "MCR2Output",
    "coding_rate",
    "cosine_distillation",
    "group_blocks",
    "grouped_coding_rate",
    "logdet_identity_plus_gram",
    "mcr2_loss",
]
