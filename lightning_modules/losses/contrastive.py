"""InfoNCE of anchors against candidates, and the builders that choose the candidates.

SimCSE (unsupervised and supervised) and the HNCSE variants are the same objective: a cross-entropy over cosine
similarities divided by a temperature. They differ only in which candidates each anchor is scored against and
in per-logit biases. A :class:`CandidateBuilder` turns the (globally gathered) views of a batch into
:class:`Candidates`; :func:`info_nce` scores them. Related: sentence-transformers' MultipleNegativesRankingLoss
(the same maths with a scale of 1 / temperature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Views(NamedTuple):
    """The embeddings of one batch, gathered over all ranks (G = world_size * B rows).

    Attributes:
        anchors_GD: first view of every sentence (z1).
        positives_GD: second view (z2): a dropout view (unsupervised) or the entailment sentence (supervised).
        hard_negatives_GD: third view (z3), the contradiction sentence, or None.
        offset: index of this rank's first row in the gathered batch; this rank owns rows ``offset : offset + B``.
        local_size: B, the rows this rank computes the loss for.
    """

    anchors_GD: Tensor
    positives_GD: Tensor
    hard_negatives_GD: Tensor | None
    offset: int
    local_size: int

    @property
    def local_anchors_BD(self) -> Tensor:
        return self.anchors_GD[self.offset : self.offset + self.local_size]

    def local_labels(self) -> Tensor:
        """Column of each local row's positive among the gathered positives."""
        return torch.arange(self.offset, self.offset + self.local_size, device=self.anchors_GD.device)


class Candidates(NamedTuple):
    """What each local anchor is scored against.

    Attributes:
        anchors_BD: the local anchors.
        shared_MD: candidates shared by every anchor (columns 0..M-1 of the logits).
        labels_B: the column of each anchor's positive.
        extra_BSD: optional per-anchor candidates, appended as columns M..M+S-1.
        bias_BC: optional additive bias on the (B, C) logits (C = M or M + S), e.g. log(alpha) on hard negatives.
    """

    anchors_BD: Tensor
    shared_MD: Tensor
    labels_B: Tensor
    extra_BSD: Tensor | None = None
    bias_BC: Tensor | None = None


def contrastive_logits(c: Candidates, temperature: float) -> Tensor:
    """Cosine similarity of each anchor with each candidate, divided by ``temperature``: (B, M [+ S])."""
    a_BD = F.normalize(c.anchors_BD, dim=-1)
    logits_BC = a_BD @ F.normalize(c.shared_MD, dim=-1).T
    if c.extra_BSD is not None:
        extra_BS = torch.einsum("bd,bsd->bs", a_BD, F.normalize(c.extra_BSD, dim=-1))
        logits_BC = torch.cat([logits_BC, extra_BS], dim=1)
    logits_BC = logits_BC / temperature
    if c.bias_BC is not None:
        logits_BC = logits_BC + c.bias_BC
    return logits_BC


def info_nce(c: Candidates, temperature: float) -> Tensor:
    """Mean cross-entropy of each anchor's positive against all its candidates (computed in float32)."""
    return F.cross_entropy(contrastive_logits(c, temperature).float(), c.labels_B)


def prefix(c: Candidates, k: int) -> Candidates:
    """The same candidates seen through the first ``k`` dimensions of every embedding."""
    extra = None if c.extra_BSD is None else c.extra_BSD[..., :k]
    return c._replace(anchors_BD=c.anchors_BD[:, :k], shared_MD=c.shared_MD[:, :k], extra_BSD=extra)


def matryoshka_info_nce(c: Candidates, temperature: float, dims: Sequence[int],
                        weights: Sequence[float] | None = None) -> Tensor:
    """``sum_k w_k * info_nce(prefix(c, k))``: Matryoshka representation learning (Kusupati et al., NeurIPS 2022)
    over one set of candidates, so the first ``k`` dimensions of the embedding are an embedding on their own.

    The candidates are built once, from the whole embeddings; each prefix only recomputes the cosines from its
    own normalised slice (one (B, C) matmul per prefix, no second forward pass). Builders that mix embeddings
    (HNCSE) mix linearly, so a prefix of a mixed vector is the mix of the prefixes. sentence-transformers'
    ``MatryoshkaLoss`` is the same sum (weights default to 1 each) around any inner loss.

    Args:
        c: the candidates of the whole embeddings.
        temperature: tau.
        dims: prefix sizes, each in ``[1, D]``.
        weights: one per prefix; None weighs each 1.
    """
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} Matryoshka weights for {len(dims)} dims")
    D = c.anchors_BD.shape[-1]
    if not dims or any(not 1 <= k <= D for k in dims):
        raise ValueError(f"Matryoshka dims must lie in [1, {D}] (the embedding size), got {list(dims)}")
    return sum(w * info_nce(prefix(c, k), temperature) for k, w in zip(dims, weights, strict=True))


class CandidateBuilder:
    """Chooses the candidates of each anchor. Subclasses implement :meth:`__call__`.

    Builders are plain objects configured in YAML (``class_path`` + ``init_args``) and injected into
    :class:`~lightning_modules.contrastive.ContrastiveModule`.
    """

    def __call__(self, views: Views, temperature: float) -> Candidates:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class InBatchNegatives(CandidateBuilder):
    """SimCSE: every other positive in the global batch is a negative; explicit hard negatives join the pool.

    Unsupervised (no hard negatives): logits (B, G), row i's positive is column offset + i.
    Supervised: logits (B, 2G) = [cos(z1, z2) | cos(z1, z3)] / tau; ``hard_negative_weight`` (alpha) adds
    ``log(alpha)`` to the logit of each anchor's OWN hard negative (column G + offset + i) only.

    Args:
        hard_negative_weight: alpha > 0; 1 (the default) adds nothing.
    """

    def __init__(self, hard_negative_weight: float = 1.0) -> None:
        if not hard_negative_weight > 0:
            raise ValueError(f"hard_negative_weight must be > 0, got {hard_negative_weight}")
        self.hard_negative_weight = hard_negative_weight

    def __call__(self, views: Views, temperature: float) -> Candidates:
        labels_B = views.local_labels()
        if views.hard_negatives_GD is None:
            return Candidates(views.local_anchors_BD, views.positives_GD, labels_B)
        shared_MD = torch.cat([views.positives_GD, views.hard_negatives_GD])
        return Candidates(
            views.local_anchors_BD,
            shared_MD,
            labels_B,
            bias_BC=own_hard_negative_bias(views, self.hard_negative_weight, shared_MD.shape[0]),
        )


def own_hard_negative_bias(views: Views, alpha: float, num_columns: int) -> Tensor | None:
    """(B, num_columns) bias with ``log(alpha)`` at column ``G + offset + i`` for local row i; None if alpha == 1."""
    if alpha == 1.0:
        return None
    G, B = views.positives_GD.shape[0], views.local_size
    bias_BC = views.anchors_GD.new_zeros(B, num_columns)
    rows_B = torch.arange(B, device=bias_BC.device)
    bias_BC[rows_B, G + views.local_labels()] = math.log(alpha)
    return bias_BC
