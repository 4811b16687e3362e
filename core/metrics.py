"""core.metrics: the STS score (cosine, Spearman x 100), FVU, latent counts and density helpers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor
from torchmetrics import Metric


def spearman100(x, y) -> float:
    """Spearman's rho x 100 of predicted similarities ``x`` against gold scores ``y``, in float64 with average ranks
    for ties (scipy; as SentEval and MTEB compute it): the ranking half of the STS score (:func:`sts_spearman`).
    NaN when ``x`` holds a non-finite value: ranking NaN embeddings' cosines gives an arbitrary number (0.54 on a
    diverged run), which must never select a checkpoint.
    """

    x = torch.as_tensor(x, dtype=torch.float64).cpu().numpy()
    y = torch.as_tensor(y, dtype=torch.float64).cpu().numpy()
    if not np.isfinite(x).all():
        return float("nan")
    return float(spearmanr(x, y).statistic * 100)


class ScoredPairs(Protocol):
    """What the STS scorer reads of a set of sentence pairs (``datamodules.sts.STSPairs`` is one)."""

    @property
    def sentences1(self) -> Sequence[str]: ...

    @property
    def sentences2(self) -> Sequence[str]: ...

    @property
    def scores(self) -> Sequence[float]: ...


def pair_cosines(z1_ND: Tensor, z2_ND: Tensor, k: int | None = None) -> Tensor:
    """Cosine similarity (N,) of each row of ``z1_ND`` with the same row of ``z2_ND`` over their first ``k``
    dimensions (None: all), in the embeddings' own dtype: the similarity half of the STS score."""
    return F.cosine_similarity(z1_ND[:, :k], z2_ND[:, :k], dim=-1)


def sts_spearman(z1_ND: Tensor, z2_ND: Tensor, gold_N, dims: Sequence[int | None] | None = None) -> float:
    """The STS score of the project: Spearman x 100 of the pairs' cosines against the gold scores (the mean over the
    prefixes of ``dims`` when given, e.g. a Matryoshka embedding's [32, ..., 256]). Validation, the STSEvaluator
    callback, MCR2's choice of initialisation, ``train.py evaluate`` and the benchmarks all call it (validation in
    its two halves, :func:`pair_cosines` per batch and :func:`mean_spearman` over the gathered epoch). NaN when an
    embedding is not finite (:func:`spearman100`)."""
    return mean_spearman(torch.stack([pair_cosines(z1_ND, z2_ND, k) for k in dims or [None]], 1), gold_N)


def mean_spearman(cos_NK: Tensor, gold_N) -> float:
    """The ranking half of :func:`sts_spearman`: Spearman x 100 of each column of cosines (one per prefix) against
    the gold scores, averaged over the columns."""
    return sum(spearman100(cos_N, gold_N) for cos_N in cos_NK.T) / cos_NK.shape[1]


class SentenceIndex:
    """Each distinct sentence of some sets of pairs, sorted, so that each is encoded once (STS tasks share many:
    STS-B was drawn from STS12-16), and the score of a set of pairs from the embeddings (U, D) of ``sentences``."""

    def __init__(self, pair_sets: Iterable[ScoredPairs]) -> None:
        self.sentences = sorted({s for p in pair_sets for s in (*p.sentences1, *p.sentences2)})
        self.index = {s: i for i, s in enumerate(self.sentences)}

    def __len__(self) -> int:
        return len(self.sentences)

    def rows(self, sentences: Sequence[str]) -> Tensor:
        """Where each of ``sentences`` stands in :attr:`sentences` (N,)."""
        return torch.tensor([self.index[s] for s in sentences], dtype=torch.long)

    def score(self, z_UD: Tensor, pairs: ScoredPairs, dims: Sequence[int | None] | None = None) -> float:
        """:func:`sts_spearman` of ``pairs`` with the embeddings ``z_UD`` of :attr:`sentences`."""
        return sts_spearman(z_UD[self.rows(pairs.sentences1)], z_UD[self.rows(pairs.sentences2)], pairs.scores, dims)


class FVU(Metric):
    """Fraction of variance unexplained over everything seen (summed statistics, so it is exact across batches and
    ranks): ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with the mean over all rows."""

    full_state_update = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_BD: Tensor, x_hat_BD: Tensor) -> None:
        x = x_BD.double()
        self.sse += (x - x_hat_BD.double()).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum()
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        return self.sse / (self.sum_sq - self.sum_x.pow(2).sum() / self.n)


class PrefixFVU(FVU):
    """:class:`FVU` of each Matryoshka prefix at once: ``update`` takes the prefixes' summed squared errors (L,)."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__(dim)
        self.add_state("sse", torch.zeros(levels, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_BD: Tensor, sse_L: Tensor) -> None:
        x = x_BD.double()
        self.sse += sse_L.double()
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum()
        self.n += x.shape[0]


class LatentCounts(Metric):
    """How often each latent fires, and the number of rows and non-zero codes (for L0 and dead latents)."""

    full_state_update = False

    def __init__(self, num_latents: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(num_latents, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, latents: Tensor, n_rows: int, acts: Tensor) -> None:
        """Counts the entries of ``latents`` whose code ``acts`` is positive (a batch top-k may choose zeros) over
        ``n_rows`` rows."""
        self.counts.index_add_(0, latents, (acts > 0).to(latents.dtype))
        self.rows += n_rows

    def compute(self) -> dict[str, Tensor]:
        rows = self.rows.clamp_min(1)
        return {"l0": self.counts.sum() / rows, "dead_fraction": (self.counts == 0).float().mean(),
                "frequency": self.counts.double() / rows}


def log10_density(frequency_F: Tensor) -> Tensor:
    """SAELens' feature density: ``log10(firing frequency + 1e-10)`` per latent (float32; a dead latent is -10)."""
    return torch.log10(frequency_F.double() + 1e-10).float()


#: Lower edges of the density histogram's bins, one per decade: [-10, -9) ... [-1, 0] (the last one closed).
DENSITY_BINS = tuple(range(-10, 0))


def density_histogram(log10_F: Tensor) -> dict[int, Tensor]:
    """``{lower edge: latents whose log10 density falls in that decade}`` (:data:`DENSITY_BINS`)."""
    decade = log10_F.floor().clamp(DENSITY_BINS[0], DENSITY_BINS[-1]).long() - DENSITY_BINS[0]
    counts = torch.bincount(decade, minlength=len(DENSITY_BINS))
    return dict(zip(DENSITY_BINS, counts))
