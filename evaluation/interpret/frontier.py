"""The sparsity frontier (Papadimitriou et al., arXiv 2504.11695; docs/methods.md 5c): explained variance against L0
for SAEs of several k and dictionary sizes on one cache, scored on the same held-out vectors.

Each SAE is scored with its INFERENCE codes (the global threshold, as every other part of the suite), so L0 is the
measured mean number of active features per vector, not the training k: ``explained_variance = 1 - FVU`` with
``FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (the mean over the held-out rows), accumulated exactly in
float64 over chunks. A point is on the frontier when no other point has at most its L0 and more explained variance
(:func:`pareto_front`); the recipe's own SAE can be scored on the same rows and shown among them.

:func:`sentence_variance_share` measures how much of a token cache's variance lies between sentences (tokens of one
sentence sharing its meaning). Where that share is high, a dictionary with about as many latents as training
sentences can spend latents on single sentences: it fits its training tokens and misses held-out ones, which the
studies show by scoring every SAE on training vectors too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.metrics import FVU, LatentCounts, density_histogram, log10_density
from core.tensors import eval_mode
from evaluation.interpret.figures import Series, line_chart
from lightning_modules.components.batch_topk import BatchTopKSAE


@torch.no_grad()
def score_sae(sae: BatchTopKSAE, x_ND: np.ndarray | torch.Tensor, chunk_rows: int = 4096,
              density: bool = False) -> dict:
    """``fvu``, ``explained_variance``, ``l0``, ``never_active`` (share of features silent on every row) and ``n``
    of ``sae`` in eval mode on the rows of ``x_ND``: the validation step's own metrics (:class:`FVU`,
    :class:`LatentCounts`), read once at the end. ``density``: also ``log10_density_hist``, the latents per decade
    of log10 firing frequency on those rows (:func:`~core.metrics.density_histogram`)."""
    if len(x_ND) == 0:
        raise ValueError("no vectors to score the SAE on")
    dev = sae.W_enc.device
    fvu, counts = FVU(sae.cfg.d_in).to(dev), LatentCounts(sae.num_latents).to(dev)
    with eval_mode(sae):
        for lo in range(0, len(x_ND), chunk_rows):
            x = torch.as_tensor(np.asarray(x_ND[lo : lo + chunk_rows], dtype=np.float32)).to(dev)
            out = sae(x)
            fvu.update(x, out.x_hat)
            counts.update(out.latents, len(x), out.acts)
    value, latents = float(fvu.compute()), counts.compute()
    out = {"fvu": value, "explained_variance": 1 - value, "l0": float(latents["l0"]),
           "never_active": float(latents["dead_fraction"]), "n": len(x_ND)}
    if density:
        hist = density_histogram(log10_density(latents["frequency"]))
        out["log10_density_hist"] = {str(b): int(n) for b, n in hist.items()}
    return out


@torch.no_grad()
def sentence_variance_share(parts: Sequence[np.ndarray | torch.Tensor], sentence_N: np.ndarray,
                            chunk_rows: int = 65536) -> float:
    """Share of the total variance of the rows of ``parts`` (arrays stacked in order, e.g. a cache's memory-mapped
    shards) that lies between the groups of ``sentence_N`` (a sentence id per row):
    ``1 - sum_i ||x_i - mean_{s(i)}||^2 / sum_i ||x_i - mean||^2``, in float64 over chunks.
    0: every sentence has the global mean; 1: each sentence's tokens are one vector."""
    ids, inv = np.unique(np.asarray(sentence_N), return_inverse=True)
    inv_t = torch.as_tensor(inv.reshape(-1), dtype=torch.long)
    if len(inv_t) != sum(len(p) for p in parts):
        raise ValueError(f"{sum(len(p) for p in parts)} rows but {len(inv_t)} sentence ids")
    sums = torch.zeros(len(ids), parts[0].shape[1], dtype=torch.float64)
    sum_sq, start = 0.0, 0
    for part in parts:
        for lo in range(0, len(part), chunk_rows):
            x = torch.from_numpy(np.array(part[lo : lo + chunk_rows], dtype=np.float64))
            sums.index_add_(0, inv_t[start + lo : start + lo + len(x)], x)
            sum_sq += float(x.pow(2).sum())
        start += len(part)
    counts = torch.bincount(inv_t, minlength=len(ids)).double()
    total = sum_sq - float(sums.sum(0).pow(2).sum()) / float(counts.sum())
    within = sum_sq - float((sums.pow(2).sum(1) / counts).sum())
    return 1.0 - within / total if total > 0 else float("nan")


def pareto_front(l0: Sequence[float], explained: Sequence[float]) -> np.ndarray:
    """(P,) bool: points that no other point beats, i.e. none has L0 <= theirs and more explained variance (or the
    same explained variance at a lower L0)."""
    l0, ev = np.asarray(l0, float), np.asarray(explained, float)
    out = np.ones(len(l0), dtype=bool)
    for i in range(len(l0)):
        better = (l0 <= l0[i]) & (ev >= ev[i]) & ((l0 < l0[i]) | (ev > ev[i]))
        out[i] = not better.any()
    return out


def frontier_plot(points: Sequence[dict], path: str | Path, title: str = "Explained variance vs L0",
                  metric: str = "explained_variance", ylabel: str = "Explained variance (held out)") -> Path:
    """One line per dictionary size through its points by L0 (log axis), and each extra point (``group`` set, e.g.
    the recipe's SAE) as its own series; ``metric``: the points' key on the y axis (points without it are left
    out)."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p.get(metric) is None:
            continue
        groups.setdefault(p.get("group") or f"F = {p['num_latents']}", []).append(p)
    series = [Series(name, [p["l0"] for p in sorted(ps, key=lambda p: p["l0"])],
                     [p[metric] for p in sorted(ps, key=lambda p: p["l0"])])
              for name, ps in groups.items()]
    return line_chart(path, series, title, "L0: active features per token (held out)", ylabel, log_x=True)


__all__ = ["frontier_plot", "pareto_front", "score_sae", "sentence_variance_share"]
