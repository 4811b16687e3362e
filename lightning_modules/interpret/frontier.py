"""The sparsity frontier (Papadimitriou et al., arXiv 2504.11695; docs/methods.md 5c): explained variance against L0
for SAEs of several k and dictionary sizes on one cache, scored on the same held-out vectors.

Each SAE is scored with its INFERENCE codes (the global threshold, as every other part of the suite), so L0 is the
measured mean number of active features per vector, not the training k: ``explained_variance = 1 - FVU`` with
``FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (the mean over the held-out rows), accumulated exactly in
float64 over chunks. A point is on the frontier when no other point has at most its L0 and more explained variance
(:func:`pareto_front`); the recipe's own SAE can be scored on the same rows and shown among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_modules.components.batch_topk import BatchTopKSAE
from lightning_modules.interpret.plot import Series, line_chart


@torch.no_grad()
def score_sae(sae: BatchTopKSAE, x_ND: np.ndarray | torch.Tensor, chunk_rows: int = 4096) -> dict[str, float]:
    """``fvu``, ``explained_variance``, ``l0``, ``never_active`` (share of features silent on every row) and ``n``
    of ``sae`` in eval mode on the rows of ``x_ND``."""
    was_training = sae.training
    sae.eval()
    dev = sae.W_enc.device
    n, sse, sum_x, sum_sq, active = 0, 0.0, None, 0.0, 0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=dev)
    try:
        for lo in range(0, len(x_ND), chunk_rows):
            x = torch.as_tensor(np.asarray(x_ND[lo : lo + chunk_rows], dtype=np.float32)).to(dev)
            out = sae(x)
            xd = x.double()
            sse += float((xd - out.x_hat.double()).pow(2).sum())
            sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
            sum_sq += float(xd.pow(2).sum())
            active += int(out.acts.numel())
            fired[out.latents] = True
            n += len(x)
    finally:
        sae.train(was_training)
    if n == 0:
        raise ValueError("no vectors to score the SAE on")
    fvu = sse / (sum_sq - float(sum_x.pow(2).sum()) / n)
    return {"fvu": fvu, "explained_variance": 1 - fvu, "l0": active / n,
            "never_active": float((~fired).float().mean()), "n": n}


def pareto_front(l0: Sequence[float], explained: Sequence[float]) -> np.ndarray:
    """(P,) bool: points that no other point beats, i.e. none has L0 <= theirs and more explained variance (or the
    same explained variance at a lower L0)."""
    l0, ev = np.asarray(l0, float), np.asarray(explained, float)
    out = np.ones(len(l0), dtype=bool)
    for i in range(len(l0)):
        better = (l0 <= l0[i]) & (ev >= ev[i]) & ((l0 < l0[i]) | (ev > ev[i]))
        out[i] = not better.any()
    return out


def frontier_plot(points: Sequence[dict], path: str | Path, title: str = "Explained variance vs L0") -> Path:
    """One line per dictionary size through its points by L0 (log axis), and each extra point (``group`` set, e.g.
    the recipe's SAE) as its own series."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p.get("group") or f"F = {p['num_latents']}", []).append(p)
    series = [Series(name, [p["l0"] for p in sorted(ps, key=lambda p: p["l0"])],
                     [p["explained_variance"] for p in sorted(ps, key=lambda p: p["l0"])])
              for name, ps in groups.items()]
    return line_chart(path, series, title, "L0: active features per token (held out)", "explained variance",
                      log_x=True)


__all__ = ["frontier_plot", "pareto_front", "score_sae"]
