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

Two similarity-distillation terms keep what the teacher ranks: :func:`cosine_distillation` (squared error of all
pairwise cosines, dominated by the many unrelated pairs) and :func:`listwise_distillation` (KL between the teacher's
and the student's softmax over each row's in-batch similarities at a temperature, which weights the near
neighbours that decide rankings). :func:`matryoshka_mcr2_loss` sums the objective over nested output prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class GroupLayout(NamedTuple):
    """How rows fall into groups, found once per batch (:func:`group_layout`) and reused by every prefix of a
    Matryoshka loss, in one of two forms:

    - sorted: the rows in group order (``order_M``) and each group's size on the host (``sizes``), so each block
      is as tall as the largest group; reading the sizes waits for the device once.
    - masked: each group's membership (``member_KM``, K known in advance), so each block holds all m rows with the
      other groups' rows zeroed: K times the arithmetic of the sorted form, but no host sync.

    ``counts_K`` holds the group sizes on the device in both (0 for a group absent from the batch).
    """

    order_M: Tensor | None
    sizes: list[int] | None
    counts_K: Tensor
    member_KM: Tensor | None = None


def group_layout(groups_M: Tensor, num_groups: int | None = None, on_host: bool | None = None) -> GroupLayout:
    """The :class:`GroupLayout` of a group id per row.

    Args:
        groups_M: group id per row: any values for the sorted form, ``[0, num_groups)`` for the masked one.
        num_groups: K, the number of possible groups (k-means clusters, labels); needed for the masked form.
        on_host: take the sorted form (one host sync). None: sorted where the host is the device (CPU tensors: the
            sync costs nothing there and the blocks are K times smaller) or K is unknown; masked on an accelerator,
            where a sync would stop the host from queueing the rest of the step (measured on 2 CPU cores at m = 1000,
            K = 32, D = 128: 11 ms sorted vs 113 ms masked, forward and backward).
    """
    if on_host is None:
        on_host = num_groups is None or groups_M.device.type == "cpu"
    if on_host:
        order_M = torch.argsort(groups_M, stable=True)
        _, counts_K = torch.unique_consecutive(groups_M[order_M], return_counts=True)
        # The one host sync: block shapes depend on how many rows each group has in this batch.
        return GroupLayout(order_M, counts_K.tolist(), counts_K)
    if num_groups is None or num_groups < 1:
        raise ValueError(f"the masked group layout needs num_groups >= 1, got {num_groups}")
    # scatter, not one_hot: one_hot checks the ids' range on the host
    member_KM = torch.zeros(num_groups, groups_M.shape[0], dtype=torch.bool, device=groups_M.device)
    member_KM.scatter_(0, groups_M[None], True)
    return GroupLayout(None, None, member_KM.sum(1), member_KM)


def group_blocks(z_MD: Tensor, groups_M: Tensor | int | GroupLayout) -> GroupBlocks:
    """Split rows into groups by sorting once and slicing (never a dense m x m membership matrix).

    Args:
        z_MD: features.
        groups_M: an integer group id per row (any values), or an int S meaning consecutive blocks of S rows
            (``m`` must be a multiple of S; no sort and no host sync), or a :class:`GroupLayout` already found.
    """
    m, d = z_MD.shape
    if isinstance(groups_M, int):
        if groups_M < 1 or m % groups_M:
            raise ValueError(f"group size {groups_M} does not divide the {m} rows")
        K = m // groups_M
        return GroupBlocks(z_MD.reshape(K, groups_M, d), torch.full((K,), groups_M, device=z_MD.device))
    if not isinstance(groups_M, GroupLayout):
        if groups_M.shape != (m,):
            raise ValueError(f"groups_M must hold one group id per row: shape {tuple(groups_M.shape)} for {m} rows")
        groups_M = group_layout(groups_M)
    rows = groups_M.member_KM.shape[1] if groups_M.order_M is None else len(groups_M.order_M)
    if rows != m:
        raise ValueError(f"a group layout of {rows} rows for {m} rows")
    if groups_M.order_M is None:  # masked: every block holds all rows, the other groups' zeroed
        return GroupBlocks(groups_M.member_KM[:, :, None] * z_MD[None], groups_M.counts_K)
    slices = torch.split(z_MD[groups_M.order_M], groups_M.sizes)
    return GroupBlocks(pad_sequence(slices, batch_first=True), groups_M.counts_K)


def grouped_coding_rate(z_MD: Tensor, groups_M: Tensor | int | GroupLayout, eps2: float = 0.5) -> Tensor:
    """``R_c(Z) = sum_j m_j / (2m) logdet(I_d + d / (m_j eps2) Z_j^T Z_j)``; see :func:`group_blocks` for groups."""
    return _blocks_rate(group_blocks(z_MD, groups_M), z_MD.shape[0], eps2)


def _blocks_rate(groups: GroupBlocks, m: int, eps2: float) -> Tensor:
    d = groups.blocks_KSD.shape[-1]
    counts_K = groups.counts_K.float()
    # an absent group (masked layout) has zero rows and weight 0: any finite scale gives it logdet 0
    logdet_K = logdet_identity_plus_gram(groups.blocks_KSD, d / (counts_K.clamp(min=1) * eps2))
    return (counts_K / (2 * m) * logdet_K).sum()


class MCR2Output(NamedTuple):
    """Loss and its parts (float32 scalars; ``distill`` is 0 without a teacher).

    Attributes:
        loss: ``mcr2_weight (-gamma R + R_c) + distill_weight * distill + listwise_weight * listwise``.
        rate: R of the whole batch (0 when the MCR2 term is off).
        rate_c: R_c, the group-wise rate (0 when the MCR2 term is off).
        distill: mean squared difference of the off-diagonal cosine similarities (student vs teacher).
        smallest_group: size of the smallest group in the batch (diagnostics for non-finite losses; 0 when the
            MCR2 term is off).
        listwise: :func:`listwise_distillation` (0 when off).
    """

    loss: Tensor
    rate: Tensor
    rate_c: Tensor
    distill: Tensor
    smallest_group: Tensor
    listwise: Tensor

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


def listwise_distillation(student_MK: Tensor, teacher_MD: Tensor, temperature: float = 0.05,
                          teacher_temperature: float | None = None) -> Tensor:
    """Mean over rows i of ``KL(p_i || q_i)``, where ``p_i`` and ``q_i`` are the teacher's and the student's softmax
    over ``cos(x_i, x_j) / temperature`` for the other rows ``j != i`` of the batch.

    A low temperature puts the weight on each row's nearest neighbours, the pairs whose order a similarity ranking
    depends on, where :func:`cosine_distillation` weights every pair alike. Zero when the student's cosines equal
    the teacher's (with equal temperatures). Float32, autocast off; the teacher side carries no gradient.

    Args:
        student_MK: student features (any scale: rows are L2-normalised here).
        teacher_MD: teacher features of the same rows.
        temperature: the student's softmax temperature (> 0).
        teacher_temperature: the teacher's; None uses ``temperature``.
    """
    m = student_MK.shape[0]
    if m < 2:
        raise ValueError(f"listwise_distillation needs at least 2 rows, got {m}")
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    with torch.autocast(device_type=student_MK.device.type, enabled=False):
        s_MK = F.normalize(_float32(student_MK), dim=-1)
        t_MD = F.normalize(_float32(teacher_MD.detach()), dim=-1)
        self_MM = torch.eye(m, dtype=torch.bool, device=s_MK.device)
        log_q_MM = torch.log_softmax((s_MK @ s_MK.T / temperature).masked_fill(self_MM, float("-inf")), dim=-1)
        log_p_MM = torch.log_softmax((t_MD @ t_MD.T / tau_t).masked_fill(self_MM, float("-inf")), dim=-1)
        kl_MM = log_p_MM.exp() * (log_p_MM - log_q_MM)
    return kl_MM.masked_fill(self_MM, 0.0).sum() / m


def mcr2_loss(
    z_MK: Tensor,
    groups_M: Tensor | int | GroupLayout,
    eps2: float = 0.5,
    gamma: float = 1.0,
    teacher_MD: Tensor | None = None,
    distill_weight: float = 0.0,
    listwise_weight: float = 0.0,
    temperature: float = 0.05,
    mcr2_weight: float = 1.0,
) -> MCR2Output:
    """MCR2 objective on L2-normalised rows of ``z_MK`` (rescaling would otherwise grow the rate without bound),
    plus the optional distillation terms.

    Args:
        z_MK: student features of the whole (gathered) batch.
        groups_M: group id per row, or an int S for consecutive groups of S rows (e.g. S = 2: (premise,
            entailment) pairs laid out as rows 2i, 2i + 1).
        eps2: epsilon squared, the quantisation error (paper default 0.5).
        gamma: weight of R.
        teacher_MD: teacher embeddings of the same rows, for the distillation terms.
        distill_weight: weight of :func:`cosine_distillation` (0 skips it).
        listwise_weight: weight of :func:`listwise_distillation` (0 skips it).
        temperature: the listwise term's softmax temperature.
        mcr2_weight: weight of ``-gamma R + R_c``; 0 skips the rates (a distillation-only head: ``rate``,
            ``rate_c`` and ``smallest_group`` are then 0).
    """
    with torch.autocast(device_type=z_MK.device.type, enabled=False):
        z_MK = F.normalize(_float32(z_MK), dim=-1)
        zero = torch.zeros((), device=z_MK.device)
        rate, rate_c, smallest, loss = zero, zero, torch.zeros((), dtype=torch.long, device=z_MK.device), zero
        if mcr2_weight:
            rate = coding_rate(z_MK, eps2)
            groups = group_blocks(z_MK, groups_M)
            rate_c = _blocks_rate(groups, z_MK.shape[0], eps2)
            smallest = torch.where(groups.counts_K > 0, groups.counts_K, z_MK.shape[0]).min()  # of those present
            loss = mcr2_weight * (-gamma * rate + rate_c)
        if (distill_weight or listwise_weight) and teacher_MD is None:
            raise ValueError("distill_weight or listwise_weight > 0 needs teacher_MD")
        distill = listwise = zero
        if distill_weight:
            distill = cosine_distillation(z_MK, teacher_MD)
            loss = loss + distill_weight * distill
        if listwise_weight:
            listwise = listwise_distillation(z_MK, teacher_MD, temperature)
            loss = loss + listwise_weight * listwise
    return MCR2Output(loss, rate, rate_c, distill, smallest, listwise)


def matryoshka_mcr2_loss(z_MK: Tensor, groups_M: Tensor | int, dims: Sequence[int], **kwargs) -> MCR2Output:
    """:func:`mcr2_loss` of each prefix ``z_MK[:, :k]`` for ``k`` in ``dims``, summed term by term, so that the
    first ``k`` outputs are each an embedding on their own (Kusupati et al., "Matryoshka Representation Learning",
    NeurIPS 2022). ``smallest_group`` is the smallest over the prefixes (the same rows: all equal).

    Args:
        z_MK: student features; every ``k`` must be in ``[1, K]``.
        groups_M: as in :func:`mcr2_loss`.
        dims: the prefix sizes, e.g. ``(32, 64, 128, 256)``.
        **kwargs: the other arguments of :func:`mcr2_loss` (weights, temperature, teacher).
    """
    if not dims or any(not 1 <= k <= z_MK.shape[-1] for k in dims):
        raise ValueError(f"matryoshka dims must lie in [1, {z_MK.shape[-1]}], got {list(dims)}")
    if isinstance(groups_M, Tensor) and kwargs.get("mcr2_weight", 1.0):
        if groups_M.shape != (z_MK.shape[0],):
            raise ValueError(f"groups_M must hold one group id per row: shape {tuple(groups_M.shape)} for "
                             f"{z_MK.shape[0]} rows")
        groups_M = group_layout(groups_M)  # the same rows in every prefix: sort and sync once, not per prefix
    outs = [mcr2_loss(z_MK[:, :k], groups_M, **kwargs) for k in dims]
    return MCR2Output(*(torch.stack([getattr(o, f) for o in outs]).min() if f == "smallest_group" else
                        torch.stack([getattr(o, f) for o in outs]).sum() for f in MCR2Output._fields))


__all__ = [
    "GroupBlocks",
    "GroupLayout",
    "MCR2Output",
    "coding_rate",
    "cosine_distillation",
    "group_blocks",
    "group_layout",
    "grouped_coding_rate",
    "listwise_distillation",
    "logdet_identity_plus_gram",
    "matryoshka_mcr2_loss",
    "mcr2_loss",
]
