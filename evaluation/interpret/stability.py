"""Stability of a dictionary across seeds, and per-group feature mass (Papadimitriou et al., arXiv 2504.11695;
docs/methods.md 5c).

Stability: the decoder rows of two SAEs (unit norm after normalising) are matched one-to-one to maximise the sum of
cosines (Hungarian algorithm; signs kept: a row and its negation are opposite features, since codes are >= 0), and
the mean matched cosine is reported, overall and by decile of the first SAE's feature energy E[z_i].

Cost: scipy's ``linear_sum_assignment`` takes the dense F_a x F_b cosine matrix in float64 (2 GiB for F = 16384,
plus the float32 product: ~3 GiB peak) and is roughly cubic in the worst case. Measured on this project's 2-core CPU
(one thread, machine shared) on synthetic decoders, D = 384, 60% of rows shared up to noise and 40% unrelated: 0.9 s
at F = 4096, 4.9 s at 8192, 27 s at 16384. So ``method='auto'`` is exact up to ``exact_max`` = 16384 rows and above
it uses the *top-m* mode: an exact minimum-weight full matching (scipy's sparse LAPJVsp) restricted to each row's
and each column's ``top_m`` most similar candidates (m doubled while no full matching exists within them): 1.8 s at
8192, 6.7 s at 16384, mean cosine within 1e-5 (relative) of the exact one, the assignments differing only among
unrelated rows (169 of 8192). The method used is returned and reported (``interpret/stability_method``).

Group share (their modality score): ``E_a[z_i] / (E_a[z_i] + E_b[z_i])`` with E_g the mean code over the rows of
group g (zeros included); 1 = feature only fires on group a. For Brown, :func:`brown_groups` splits informative
prose (categories A-J) from imaginative prose (K-R).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from datamodules.activation_cache import META_SENTENCE
from evaluation.interpret.codes import SparseCodes

INFORMATIVE = ("news", "editorial", "reviews", "religion", "hobbies", "lore", "belles_lettres", "government",
               "learned")
IMAGINATIVE = ("fiction", "mystery", "science_fiction", "adventure", "romance", "humor")


@dataclass
class Matching:
    """A one-to-one matching of the rows of decoder a to rows of decoder b."""

    match: np.ndarray
    """(F_a,) int64 row of b matched to each row of a; -1 when unmatched (F_a > F_b)."""
    cos: np.ndarray
    """(F_a,) float64 cosine with the matched row; NaN when unmatched."""
    method: str
    """``hungarian`` or ``top{m}`` (the candidate count that succeeded)."""

    @property
    def mean_cos(self) -> float:
        return float(np.nanmean(self.cos)) if np.isfinite(self.cos).any() else float("nan")


def unit_rows(W: Tensor | np.ndarray) -> Tensor:
    W = torch.as_tensor(W).detach().float().cpu()
    return W / torch.linalg.vector_norm(W, dim=-1, keepdim=True).clamp_min(1e-12)


def _top_candidates(A: Tensor, B: Tensor, m: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of each row of A's ``m`` most cosine-similar rows of B, in blocks of ``chunk`` rows."""
    rows, cols = [], []
    for lo in range(0, A.shape[0], chunk):
        top = (A[lo : lo + chunk] @ B.t()).topk(min(m, B.shape[0]), dim=1).indices
        rows.append(np.repeat(np.arange(lo, lo + top.shape[0]), top.shape[1]))
        cols.append(top.reshape(-1).numpy())
    return np.concatenate(rows), np.concatenate(cols)


def _match_top_m(A: Tensor, B: Tensor, m: int) -> tuple[np.ndarray, np.ndarray]:
    ra, ca = _top_candidates(A, B, m)
    cb, rb = _top_candidates(B, A, m)  # each row of B's best rows of A
    n_b = B.shape[0]
    key = np.unique(np.concatenate([ra, rb]).astype(np.int64) * n_b + np.concatenate([ca, cb]))
    r, c = key // n_b, key % n_b
    cos = (A[torch.as_tensor(r)] * B[torch.as_tensor(c)]).sum(-1).double().numpy()
    graph = csr_matrix((2.0 - cos, (r, c)), shape=(A.shape[0], n_b))  # > 0: zero weights would be missing edges
    return min_weight_full_bipartite_matching(graph)


def match_decoders(W_a: Tensor | np.ndarray, W_b: Tensor | np.ndarray, method: str = "auto", exact_max: int = 16384,
                   top_m: int = 32) -> Matching:
    """Match decoder rows one-to-one maximising the total cosine (see the module docstring).

    Args:
        W_a, W_b: (F_a, D) and (F_b, D) decoder rows (normalised here).
        method: ``hungarian`` (exact, dense), ``top_m`` (exact within candidates) or ``auto``.
        exact_max: ``auto`` uses the dense solver when max(F_a, F_b) <= exact_max.
        top_m: initial candidates per row and per column for ``top_m``.
    """
    if method not in ("auto", "hungarian", "top_m"):
        raise ValueError(f"method must be auto, hungarian or top_m, got {method!r}")
    A, B = unit_rows(W_a), unit_rows(W_b)
    if method == "auto":
        method = "hungarian" if max(A.shape[0], B.shape[0]) <= exact_max else "top_m"
    name = "hungarian"
    if method == "top_m":
        m = top_m
        while m < B.shape[0]:
            try:
                rows, cols = _match_top_m(A, B, m)
                name = f"top{m}"
                break
            except ValueError:  # no full matching within the candidates
                m *= 2
        else:
            method = "hungarian"
    if method == "hungarian":
        rows, cols = linear_sum_assignment((A @ B.t()).double().numpy(), maximize=True)
    match = np.full(A.shape[0], -1, dtype=np.int64)
    match[rows] = cols
    cos = np.full(A.shape[0], np.nan)
    cos[rows] = (A[torch.as_tensor(rows)] * B[torch.as_tensor(cols)]).sum(-1).double().numpy()
    return Matching(match, cos, name)


def energy_deciles(energy: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """(F,) int bin of each feature by energy rank: bin = floor(n_bins * rank / F), rank ascending (ties: index),
    so the bins have equal sizes even when many features share energy 0 (dead)."""
    rank = np.empty(len(energy), dtype=np.int64)
    rank[np.argsort(energy, kind="stable")] = np.arange(len(energy))
    return rank * n_bins // max(len(energy), 1)


def stability_by_decile(matching: Matching, energy_a: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """(n_bins,) mean matched cosine per energy decile of the first SAE (NaN for empty bins)."""
    bins = energy_deciles(energy_a, n_bins)
    return np.asarray([np.nanmean(matching.cos[bins == k]) if np.isfinite(matching.cos[bins == k]).any()
                       else np.nan for k in range(n_bins)])


def brown_groups(meta: np.ndarray, sentences: list[dict], a: tuple[str, ...] = INFORMATIVE,
                 b: tuple[str, ...] = IMAGINATIVE) -> np.ndarray:
    """(N,) int8 group of each row by its sentence's ``category``: 0 in ``a``, 1 in ``b``, -1 otherwise."""
    cat = [s.get("category") for s in sentences]
    sent_group = np.asarray([0 if c in a else 1 if c in b else -1 for c in cat], dtype=np.int8)
    return sent_group[meta[:, META_SENTENCE]]


def group_share(codes: SparseCodes, group: np.ndarray) -> np.ndarray:
    """(F,) ``E_a[z_i] / (E_a[z_i] + E_b[z_i])`` for rows with ``group == 0`` (a) and ``== 1`` (b); NaN where the
    feature never fires on either group."""
    n_a, n_b = int((group == 0).sum()), int((group == 1).sum())
    if n_a == 0 or n_b == 0:
        raise ValueError(f"both groups need rows: {n_a} in group a, {n_b} in group b")
    g = group[codes.rows]
    mean_a = np.bincount(codes.features[g == 0], codes.values[g == 0].astype(np.float64), codes.n_features) / n_a
    mean_b = np.bincount(codes.features[g == 1], codes.values[g == 1].astype(np.float64), codes.n_features) / n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean_a + mean_b > 0, mean_a / (mean_a + mean_b), np.nan)


def group_share_summary(score: np.ndarray, hi: float = 0.9, lo: float = 0.1, n_bins: int = 10,
                        prefix: str = "interpret/") -> dict[str, float]:
    """Counts of features specific to group a (score > hi) and b (score < lo), the mean score, and a histogram of
    scores over [0, 1] (``n_bins`` equal bins), among features firing on either group."""
    s = score[np.isfinite(score)]
    counts, _ = np.histogram(s, bins=n_bins, range=(0.0, 1.0))
    out = {f"{prefix}group_share_specific_a": float((s > hi).sum()),
           f"{prefix}group_share_specific_b": float((s < lo).sum()),
           f"{prefix}group_share_mean": float(s.mean()) if len(s) else float("nan")}
    out.update({f"{prefix}group_share_hist/{k}": float(c) for k, c in enumerate(counts)})
    return out


__all__ = ["IMAGINATIVE", "INFORMATIVE", "Matching", "brown_groups", "energy_deciles", "group_share",
           "group_share_summary", "match_decoders", "stability_by_decile", "unit_rows"]
