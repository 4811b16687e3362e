"""Which SAE features do different encoders share? Matching features by what they fire on (Tehenan et al., arXiv
2506.04373, section 6; docs/methods.md 5e).

Decoder rows of SAEs on different models live in different spaces (384-d MiniLM, 768-d mpnet), so features are
compared by their activation patterns over the same text. Tokenisers differ, so the unit is the WORD: a feature's
activation on a word occurrence is its largest code over the word's wordpieces, and occurrences are keyed by
(sentence id, word index) of the shared corpus (the Brown words of the cache's ``texts.jsonl``). Only occurrences
present in both caches count (a sentence truncated by one model's ``max_length`` loses its tail there).

For two SAEs a (F_a features) and b (F_b) over the W common occurrences, with A (W, F_a) and B (W, F_b) the word-level
codes, the Pearson correlation of every pair of features::

    corr_ij = (A_i . B_j / W - mean(A_i) mean(B_j)) / (sd(A_i) sd(B_j))

computed from the sparse product A^T B (no dense (W, F) matrix); features silent on the common words have no
correlation (NaN) and count as silent, not as model-specific. A feature's *match* in the other model is its
best-correlated feature there; it is *shared* when that correlation is at least ``threshold``, else *specific*
(``one_to_one=True`` matches one-to-one instead, by the Hungarian algorithm on the correlations, and a feature is
shared when its partner's correlation reaches the threshold). With more than two models a feature is
``shared_any`` when it is shared with at least one other model and ``shared_all`` when with every other one.

The POS profile of a group (shared or specific features of one model): the share of the group's features whose
dominant tag (:func:`evaluation.interpret.pos.label_features`, from the model's own cache) is each tag, and
their mean purity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from datamodules.activation_cache import META_SENTENCE, META_WORD
from evaluation.interpret.codes import SparseCodes
from evaluation.interpret.pos import TAGS, PosLabels

#: word occurrence key = sentence_id * WORD_KEY_BASE + word_index
WORD_KEY_BASE = 1 << 20


@dataclass
class WordCodes:
    """Word-level codes of one SAE: one row per word occurrence, keyed by (sentence, word index)."""

    keys: np.ndarray
    """(W,) int64 ascending ``sentence_id * WORD_KEY_BASE + word_index``."""
    codes: sparse.csr_matrix
    """(W, F) float32: the largest code of each feature over the word's pieces."""


def word_codes(codes: SparseCodes) -> WordCodes:
    """Pool token codes to words (max over each word's pieces); tokens without a word (special tokens) are left out.
    Words where no feature fires are kept, as zero rows."""
    if codes.meta is None:
        raise ValueError("word-level codes need each row's sentence and word index (encode an ActivationCache)")
    meta = codes.meta
    if (meta[:, META_WORD] >= WORD_KEY_BASE).any():
        raise ValueError(f"a word index >= {WORD_KEY_BASE}: sentences that long are not supported")
    row_key = meta[:, META_SENTENCE].astype(np.int64) * WORD_KEY_BASE + meta[:, META_WORD]
    has_word = meta[:, META_WORD] >= 0
    keys, word_of_row = np.unique(np.where(has_word, row_key, -1), return_inverse=True)
    offset = 1 if len(keys) and keys[0] == -1 else 0  # key -1 gathers the word-less rows: dropped
    keys = keys[offset:]
    word = word_of_row[codes.rows] - offset
    ok = word >= 0
    word, feat, val = word[ok].astype(np.int64), codes.features[ok].astype(np.int64), codes.values[ok]
    pair = word * codes.n_features + feat
    order = np.lexsort((-val, pair))  # per (word, feature): the largest value first
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[order][1:] != pair[order][:-1]
    sel = order[first]
    mat = sparse.csr_matrix((val[sel], (word[sel], feat[sel])), shape=(len(keys), codes.n_features),
                            dtype=np.float32)
    return WordCodes(keys, mat)


def align(a: WordCodes, b: WordCodes) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """The rows of ``a`` and ``b`` at the word occurrences both hold, in key order."""
    common, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    if not len(common):
        raise ValueError("the two SAEs' caches share no word occurrence: built over different sentences, or over a "
                         "corpus without words (word-level alignment needs Brown-style words)")
    return a.codes[ia], b.codes[ib]


def _moments(M: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = M.shape[0]
    M = M.astype(np.float64)
    mean = np.asarray(M.sum(0)).ravel() / n
    var = np.asarray(M.multiply(M).sum(0)).ravel() / n - mean * mean
    return mean, np.sqrt(np.maximum(var, 0.0))


def feature_correlation(A: sparse.csr_matrix, B: sparse.csr_matrix) -> np.ndarray:
    """(F_a, F_b) float32 Pearson correlation of every feature of A with every feature of B over the rows (NaN where
    either feature is constant on them)."""
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A has {A.shape[0]} rows, B {B.shape[0]}: align them first")
    n = A.shape[0]
    mean_a, sd_a = _moments(A)
    mean_b, sd_b = _moments(B)
    prod = (A.astype(np.float64).T @ B.astype(np.float64)).toarray()
    cov = prod / n - np.outer(mean_a, mean_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd_a, sd_b)
    corr[(sd_a <= 0)[:, None] | (sd_b <= 0)[None, :]] = np.nan
    return corr.astype(np.float32)


@dataclass
class PairMatch:
    """Matches between the features of two SAEs, each way."""

    best_ab: np.ndarray
    """(F_a,) int64 matched feature of b for each feature of a (-1: silent / unmatched)."""
    corr_ab: np.ndarray
    """(F_a,) float64 its correlation (NaN: silent / unmatched)."""
    best_ba: np.ndarray
    corr_ba: np.ndarray
    method: str
    """``best`` (each feature's best-correlated one) or ``hungarian`` (one-to-one)."""

    def mutual(self, threshold: float) -> int:
        """Pairs (i, j) that are each other's match with correlation >= threshold."""
        i = np.flatnonzero((self.best_ab >= 0) & (self.corr_ab >= threshold))
        return int((self.best_ba[self.best_ab[i]] == i).sum())


def match_features(corr: np.ndarray, one_to_one: bool = False) -> PairMatch:
    """Each feature's match in the other SAE from the (F_a, F_b) correlations (see the module docstring)."""
    valid = np.isfinite(corr)
    filled = np.where(valid, corr, -np.inf)
    if one_to_one:
        ra, rb = valid.any(1), valid.any(0)
        ia, ib = np.flatnonzero(ra), np.flatnonzero(rb)
        best_ab, best_ba = np.full(corr.shape[0], -1), np.full(corr.shape[1], -1)
        if len(ia) and len(ib):
            sub = np.where(valid[np.ix_(ia, ib)], corr[np.ix_(ia, ib)], -1.0).astype(np.float64)
            r, c = linear_sum_assignment(sub, maximize=True)
            best_ab[ia[r]], best_ba[ib[c]] = ib[c], ia[r]
        corr_ab = np.where(best_ab >= 0, corr[np.arange(len(best_ab)), np.maximum(best_ab, 0)], np.nan)
        corr_ba = np.where(best_ba >= 0, corr[np.maximum(best_ba, 0), np.arange(len(best_ba))], np.nan)
        return PairMatch(best_ab.astype(np.int64), corr_ab.astype(np.float64), best_ba.astype(np.int64),
                         corr_ba.astype(np.float64), "hungarian")
    best_ab = np.where(valid.any(1), filled.argmax(1), -1)
    best_ba = np.where(valid.any(0), filled.argmax(0), -1)
    corr_ab = np.where(best_ab >= 0, filled.max(1), np.nan) if corr.shape[1] else np.full(corr.shape[0], np.nan)
    corr_ba = np.where(best_ba >= 0, filled.max(0), np.nan) if corr.shape[0] else np.full(corr.shape[1], np.nan)
    return PairMatch(best_ab.astype(np.int64), corr_ab.astype(np.float64), best_ba.astype(np.int64),
                     corr_ba.astype(np.float64), "best")


def pos_profile(features: np.ndarray, labels: PosLabels) -> dict:
    """``{"n": count, "purity_mean": ..., "dominant": {tag: share of the group}}`` for the features given."""
    dom = labels.dominant[features]
    dom = dom[dom >= 0]
    counts = np.bincount(dom, minlength=len(TAGS))
    return {"n": int(len(features)),
            "purity_mean": float(labels.purity[features].mean()) if len(features) else float("nan"),
            "dominant": {TAGS[t]: float(c / len(dom)) for t, c in enumerate(counts) if c}}


@dataclass
class CrossModelResult:
    """Shared vs model-specific features of several SAEs over one corpus."""

    threshold: float
    method: str
    n_words: dict[str, int]
    """Common word occurrences per pair ``"a|b"``."""
    pairs: dict[str, dict]
    """Per ordered pair ``"a|b"``: shares and correlation statistics of a's features against b."""
    models: dict[str, dict]
    """Per model: counts and shares of shared (any / all) and specific features, and each group's POS profile."""
    matches: dict[str, PairMatch] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "method": self.method, "n_words": self.n_words, "pairs": self.pairs,
                "models": self.models}


def compare_models(words: Mapping[str, WordCodes], labels: Mapping[str, PosLabels] | None = None,
                   threshold: float = 0.5, one_to_one: bool = False) -> CrossModelResult:
    """Match the features of every pair of SAEs and split each model's features into shared and specific ones.

    Args:
        words: per model name, its SAE's :func:`word_codes` over the shared corpus.
        labels: per model name, its features' POS labels (from its own cache); None leaves out the POS profiles.
        threshold: the correlation at or above which a feature counts as shared with another model.
        one_to_one: Hungarian one-to-one matching instead of each feature's best match.
    """
    if len(words) < 2:
        raise ValueError(f"a cross-model comparison needs at least 2 SAEs, got {len(words)}")
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a correlation, in [-1, 1]; got {threshold}")
    names = list(words)
    shared_with = {m: [] for m in names}  # per model, one (F,) bool per other model
    silent = {m: np.zeros(words[m].codes.shape[1], dtype=bool) for m in names}
    pairs, n_words, matches = {}, {}, {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            A, B = align(words[a], words[b])
            corr = feature_correlation(A, B)
            match = match_features(corr, one_to_one)
            matches[f"{a}|{b}"] = match
            n_words[f"{a}|{b}"] = int(A.shape[0])
            for x, y, best, c, dead in ((a, b, match.best_ab, match.corr_ab, ~np.isfinite(corr).any(1)),
                                        (b, a, match.best_ba, match.corr_ba, ~np.isfinite(corr).any(0))):
                is_shared = np.isfinite(c) & (c >= threshold)
                shared_with[x].append(is_shared)
                silent[x] |= dead
                alive = ~dead
                pairs[f"{x}|{y}"] = {
                    "n_features": int(len(c)), "n_silent": int(dead.sum()), "n_shared": int(is_shared.sum()),
                    "shared_share": float(is_shared.sum() / max(alive.sum(), 1)),
                    "match_corr_mean": float(np.nanmean(c)) if np.isfinite(c).any() else float("nan"),
                    "match_corr_median": float(np.nanmedian(c)) if np.isfinite(c).any() else float("nan"),
                    "n_mutual": match.mutual(threshold)}
    models = {}
    for m in names:
        any_ = np.any(shared_with[m], axis=0)
        all_ = np.all(shared_with[m], axis=0)
        alive = ~silent[m]
        n_alive = max(int(alive.sum()), 1)
        rec = {"n_features": int(len(alive)), "n_silent": int(silent[m].sum()),
               "n_shared_any": int(any_.sum()), "n_shared_all": int(all_.sum()),
               "n_specific": int((alive & ~any_).sum()),
               "shared_any_share": float(any_.sum() / n_alive), "shared_all_share": float(all_.sum() / n_alive),
               "specific_share": float((alive & ~any_).sum() / n_alive)}
        if labels is not None and m in labels:
            rec["pos_shared"] = pos_profile(np.flatnonzero(any_), labels[m])
            rec["pos_specific"] = pos_profile(np.flatnonzero(alive & ~any_), labels[m])
        models[m] = rec
    return CrossModelResult(threshold, "hungarian" if one_to_one else "best", n_words, pairs, models, matches)


__all__ = ["WORD_KEY_BASE", "CrossModelResult", "PairMatch", "WordCodes", "align", "compare_models",
           "feature_correlation", "match_features", "pos_profile", "word_codes"]
