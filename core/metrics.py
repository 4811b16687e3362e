"""core.metrics."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor
from torchmetrics import Metric


def spearman100(x, y) -> float:
    """Spearman's rho x 100 of predicted similarities ``x`` against gold scores ``y``, in float64 with average ranks
    for ties (scipy; as SentEval and MTEB compute it). The one STS score of the project: validation, the
    STSEvaluator callback and ``train.py evaluate`` all call it. NaN when ``x`` holds a non-finite value: ranking
    NaN embeddings' cosines gives an arbitrary number (0.54 on a diverged run), which must never select a checkpoint.
    """

    x = torch.as_tensor(x, dtype=torch.float64).cpu().numpy()
    y = torch.as_tensor(y, dtype=torch.float64).cpu().numpy()
    if not np.isfinite(x).all():
        return float("nan")
    return float(spearmanr(x, y).statistic * 100)


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
