"""How SAE features survive or cancel under mean pooling (Tehenan et al., arXiv 2506.04373; docs/methods.md 5a).

For a sentence with token vectors x_t (t = 1..T, the tokens the pooling averages), SAE codes z_t (input units),
decoder rows d_i (unit norm) and decoder bias b = s * b_dec (``SparseCoder.decode``: x_hat = z W_dec + s b_dec)::
    v_bar = mean_t x_t = sum_i zbar_i d_i + b + e_bar          zbar = mean_t z_t (the pooled code),
                                                               e_bar = mean_t (x_t - x_hat_t), exactly
    c_i = zbar_i * (d_i . v_bar)                               contribution of feature i to v_bar
    share_i = c_i / sum_j |c_j|                                normalised over features: sum_i |share_i| = 1

Dotting the first line with v_bar: ``sum_i c_i + b . v_bar + e_bar . v_bar = ||v_bar||^2``, so the features, the
bias and the error split the squared norm (``feature_share``, ``bias_share``, ``error_share``). A feature active in
the sentence (zbar_i > 0) *survives* pooling when it is aligned with the pooled vector (d_i . v_bar > 0, i.e.
c_i > 0) and *cancels* otherwise. v_bar is the raw pooled vector (what the model outputs), not centred on b.

Which tokens: the model's real mean pooling (sentence-transformers ``Pooling('mean')``) averages every real token,
[CLS]/[SEP] included; that is ``include_special=True``, which needs a cache built with ``special_tokens='keep'``
(a ``'drop'`` cache lacks them: an error says so). ``include_special=False`` averages the word tokens only (the
paper's code). Token vectors are the cache's layer, so this is the model's pooled embedding when the cache holds the
last layer; ``text_prefix`` tokens (e5's "query: ") are never cached, so with a prefix the pooled vector is the mean
over the sentence's own tokens only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from datamodules.activation_cache import META_SENTENCE, META_TAG, SPECIAL, ActivationCache
from evaluation.interpret.codes import SparseCodes, read_rows, threshold_codes
from evaluation.interpret.pos import TAGS, PosLabels
from lightning_modules.components.sparse_coder import SparseCoder


class SentenceDecomposition(NamedTuple):
    """One sentence's pooled vector split as ``pooled = code @ W_dec + bias + error`` (see the module docstring)."""

    pooled: Tensor
    """(D,) v_bar."""
    code: Tensor
    """(F,) zbar, the mean of the token codes."""
    bias: Tensor
    """(D,) s * b_dec."""
    error: Tensor
    """(D,) mean reconstruction error of the tokens."""
    contribution: Tensor
    """(F,) c_i = zbar_i (d_i . v_bar)."""
    share: Tensor
    """(F,) c_i / sum_j |c_j| (zeros when no feature is active)."""


@torch.no_grad()
def decompose_sentence(sae: SparseCoder, x_TD: Tensor) -> SentenceDecomposition:
    """Decompose the mean of the token vectors ``x_TD`` (the tokens the pooling uses) through ``sae``."""
    x_TD = x_TD.to(sae.W_dec)
    rows, feats, vals = threshold_codes(sae, x_TD)
    codes_TF = torch.zeros(x_TD.shape[0], sae.num_latents, dtype=x_TD.dtype, device=x_TD.device)
    codes_TF[rows, feats] = vals
    bias_D = sae.b_dec * sae.input_scale
    error_D = (x_TD - (codes_TF @ sae.W_dec + bias_D)).mean(0)
    pooled_D, code_F = x_TD.mean(0), codes_TF.mean(0)
    contrib_F = code_F * (sae.W_dec @ pooled_D)
    total = contrib_F.abs().sum()
    share_F = contrib_F / total if total > 0 else torch.zeros_like(contrib_F)
    return SentenceDecomposition(pooled_D, code_F, bias_D, error_D, contrib_F, share_F)


@dataclass
class PoolingStats:
    """Pooling decomposition aggregated over S sentences (features: over the sentences where they are active)."""

    contribution: np.ndarray
    """(F,) mean ``share_i`` over the sentences where feature i is active (NaN: never active)."""
    survival: np.ndarray
    """(F,) fraction of those sentences where it survives, c_i > 0 (NaN: never active)."""
    active: np.ndarray
    """(F,) int64 sentences where feature i is active."""
    total: np.ndarray
    """(F,) sum over all sentences of ``share_i``."""
    sentence_ids: np.ndarray
    """(S,) sentences decomposed (those with at least one pooled token)."""
    feature_share: np.ndarray
    """(S,) sum_i c_i / ||v_bar||^2."""
    bias_share: np.ndarray
    """(S,) b . v_bar / ||v_bar||^2."""
    error_share: np.ndarray
    """(S,) e_bar . v_bar / ||v_bar||^2 (the three shares sum to 1)."""
    cancel_share: np.ndarray
    """(S,) sum of |c_i| over cancelling features / sum_i |c_i|."""


def pooled_rows(meta: np.ndarray, include_special: bool, special_tokens: str | None) -> np.ndarray:
    """(N,) bool: rows the chosen pooling averages; a clear error when the rows lack the special tokens."""
    if include_special and special_tokens != "keep":
        raise ValueError(
            f"the model's mean pooling includes [CLS]/[SEP], but these token vectors were cached with "
            f"special_tokens={special_tokens!r}: rebuild the cache with data.special_tokens=keep, or decompose the "
            "pooling over word tokens only (include_special=False)")
    return np.ones(len(meta), dtype=bool) if include_special else meta[:, META_TAG] != SPECIAL


@torch.no_grad()
def pooling_contributions(sae: SparseCoder, codes: SparseCodes, vectors: ActivationCache | np.ndarray,
                          include_special: bool = True, special_tokens: str | None = None,
                          sentence_chunk: int = 512) -> PoolingStats:
    """Decompose every sentence's mean-pooled vector (see the module docstring), ``sentence_chunk`` at a time.

    Args:
        sae: the SAE that produced ``codes``.
        codes: sparse codes of ``vectors`` with their metadata (rows grouped by sentence, in order).
        vectors: the token vectors (an ``ActivationCache`` or an (N, D) array in the rows' order).
        include_special: average [CLS]/[SEP] too (the model's pooling) or word tokens only.
        special_tokens: ``'keep'`` or ``'drop'``, how ``vectors`` were cached; read from a cache's ``meta.json``.
        sentence_chunk: sentences per block; memory about ``3 * sentence_chunk * F * 4`` bytes.
    """
    if codes.meta is None:
        raise ValueError("the pooling decomposition needs the sentence id of every row (encode an ActivationCache)")
    if isinstance(vectors, ActivationCache):
        if vectors.meta.get("level") != "token":
            raise ValueError(f"{vectors.folder} holds {vectors.meta.get('level')}-level vectors, tokens are needed")
        special_tokens = vectors.meta.get("special_tokens")
        if vectors.meta.get("text_prefix"):
            warnings.warn("the cache's text_prefix tokens are not cached: pooling over the sentence tokens only",
                          stacklevel=2)
    meta = codes.meta
    use = pooled_rows(meta, include_special, special_tokens)
    sid = meta[:, META_SENTENCE].astype(np.int64)
    if np.any(np.diff(sid) < 0):
        raise ValueError("rows must be grouped by sentence in increasing sentence id (cache order)")
    sent_ids, starts = np.unique(sid, return_index=True)
    ends = np.append(starts[1:], len(sid))
    n_used = np.add.reduceat(use.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    dev, n_feat = sae.W_dec.device, sae.num_latents
    W_FD, bias_D = sae.W_dec.float(), (sae.b_dec * sae.input_scale).float()
    acc = {k: torch.zeros(n_feat, dtype=torch.float64, device=dev) for k in ("active", "survive", "share")}
    per_sentence: dict[str, list[Tensor]] = {k: [] for k in ("feature", "bias", "cancel")}
    for j0 in range(0, len(sent_ids), sentence_chunk):
        j1 = min(j0 + sentence_chunk, len(sent_ids))
        r0, r1 = int(starts[j0]), int(ends[j1 - 1])
        loc = torch.as_tensor(np.repeat(np.arange(j1 - j0), ends[j0:j1] - starts[j0:j1]), device=dev)
        keep = torch.as_tensor(use[r0:r1], device=dev)
        n_S = torch.as_tensor(np.maximum(n_used[j0:j1], 1), dtype=torch.float32, device=dev)
        x_nD = read_rows(vectors, r0, r1).to(dev)
        pooled_SD = torch.zeros(j1 - j0, x_nD.shape[1], device=dev).index_add_(0, loc[keep], x_nD[keep])
        pooled_SD /= n_S[:, None]
        t0, t1 = np.searchsorted(codes.rows, [r0, r1])
        r = torch.as_tensor(codes.rows[t0:t1] - r0, device=dev)
        f = torch.as_tensor(codes.features[t0:t1].astype(np.int64), device=dev)
        v = torch.as_tensor(codes.values[t0:t1], device=dev)
        on = keep[r]
        code_SF = torch.zeros((j1 - j0) * n_feat, device=dev).index_add_(0, loc[r[on]] * n_feat + f[on], v[on])
        code_SF = code_SF.view(j1 - j0, n_feat) / n_S[:, None]
        c_SF = code_SF * (pooled_SD @ W_FD.t())
        abs_S = c_SF.abs().sum(1)
        share_SF = c_SF / abs_S.clamp_min(1e-30)[:, None]
        active_SF = code_SF > 0
        acc["active"] += active_SF.sum(0)
        acc["survive"] += (active_SF & (c_SF > 0)).sum(0)
        acc["share"] += share_SF.sum(0, dtype=torch.float64)
        sq_S = pooled_SD.pow(2).sum(1).clamp_min(1e-30)
        per_sentence["feature"].append(c_SF.sum(1) / sq_S)
        per_sentence["bias"].append(pooled_SD @ bias_D / sq_S)
        per_sentence["cancel"].append((-c_SF).clamp_min(0).sum(1) / abs_S.clamp_min(1e-30))
    ok = n_used > 0
    cat = {k: torch.cat(p).double().cpu().numpy()[ok] if p else np.zeros(0) for k, p in per_sentence.items()}
    active = acc["active"].cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        contribution = np.where(active > 0, acc["share"].cpu().numpy() / active, np.nan)
        survival = np.where(active > 0, acc["survive"].cpu().numpy() / active, np.nan)
    return PoolingStats(contribution, survival, active.astype(np.int64), acc["share"].cpu().numpy(),
                        sent_ids[ok], cat["feature"], cat["bias"], 1 - cat["feature"] - cat["bias"], cat["cancel"])


def pooling_summary(stats: PoolingStats, labels: PosLabels | None = None,
                    prefix: str = "interpret/") -> dict[str, float]:
    """Scalars: mean survival rate over features ever active, mean per-sentence shares, and (with ``labels``) the
    share of the total feature contribution (sum over sentences and features of ``share_i``) per dominant tag."""
    seen = stats.active > 0
    out = {f"{prefix}pooling_survival_mean": float(stats.survival[seen].mean()) if seen.any() else 0.0,
           f"{prefix}pooling_cancel_share": float(stats.cancel_share.mean()) if len(stats.cancel_share) else 0.0,
           f"{prefix}pooling_feature_share": float(stats.feature_share.mean()) if len(stats.feature_share) else 0.0,
           f"{prefix}pooling_bias_share": float(stats.bias_share.mean()) if len(stats.bias_share) else 0.0,
           f"{prefix}pooling_error_share": float(stats.error_share.mean()) if len(stats.error_share) else 0.0}
    if labels is not None:
        for tag, share in contribution_by_tag(stats, labels).items():
            out[f"{prefix}pooling_contribution_share/{tag}"] = share
    return out


def contribution_by_tag(stats: PoolingStats, labels: PosLabels) -> dict[str, float]:
    """``{tag: sum of total_i over features with that dominant tag / sum of total_i}`` for the tags present."""
    grand = stats.total.sum()
    out = {}
    for t, tag in enumerate(TAGS):
        is_t = labels.dominant == t
        if is_t.any() and grand != 0:
            out[tag] = float(stats.total[is_t].sum() / grand)
    return out


__all__ = ["PoolingStats", "SentenceDecomposition", "contribution_by_tag", "decompose_sentence",
           "pooled_rows", "pooling_contributions", "pooling_summary"]
