"""Part-of-speech labels of SAE features (Tehenan et al., arXiv 2506.04373; docs/methods.md 5a).

For each feature: its ``top_k`` (500) largest activations over the corpus, in decreasing order (ties: lower row
first); the first ``n_unique`` (100) distinct words among them, in that order; each word's universal tag is the tag
of its first (strongest) occurrence; the dominant tag is the most frequent tag among those words (ties: the earlier
tag of :data:`TAGS`) and its share is the feature's purity. A "word" is the lower-cased Brown word a wordpiece
belongs to (the cache's ``word_index`` into ``texts.jsonl`` words), so the pieces of one word count once; tokens
without a word (special tokens, plain-text caches) are distinct by token id.

The triplets are sorted once by (feature, -value); the rest is a loop over features with small numpy calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from datamodules.activation_cache import META_POSITION, META_SENTENCE, META_TAG, META_TOKEN, META_WORD, POS_TAGS
from evaluation.interpret.codes import SparseCodes

#: Columns of :attr:`PosLabels.dist`: the cache's tags, then ``UNTAGGED`` for tokens without a tag (tag id -1).
TAGS = (*POS_TAGS, "UNTAGGED")


class Context(NamedTuple):
    """One top-activating context of a feature: the best activation of the feature in one sentence."""

    row: int
    sentence_id: int
    position: int
    word_index: int
    value: float


@dataclass
class PosLabels:
    """Per-feature POS profile; dead features have ``dominant = -1``, ``purity = 0`` and a zero ``dist`` row."""

    dominant: np.ndarray
    """(F,) int index into :data:`TAGS` of the dominant tag, -1 for dead features."""
    purity: np.ndarray
    """(F,) float64 share of the unique words carrying the dominant tag."""
    dist: np.ndarray
    """(F, len(TAGS)) float64 share of the unique words per tag (rows of alive features sum to 1)."""
    n_words: np.ndarray
    """(F,) int64 unique words considered (at most ``n_unique``)."""
    contexts: list[list[Context]]
    """Per feature, its top distinct sentences in decreasing activation (at most ``n_contexts``)."""

    def label(self, feature: int) -> str:
        return "dead" if self.dominant[feature] < 0 else TAGS[self.dominant[feature]]


def word_keys(meta: np.ndarray, sentences: list[dict] | None = None) -> np.ndarray:
    """(N,) int64 identity of each row's word: an id >= 0 of the lower-cased Brown word (``sentences[sid]["words"]
    [word_index]``), or ``-(token_id + 1)`` for rows without a word (special tokens, texts without ``words``)."""
    keys = -(meta[:, META_TOKEN].astype(np.int64) + 1)
    if not sentences or "words" not in sentences[0]:
        return keys
    vocab: dict[str, int] = {}
    flat = [vocab.setdefault(w.lower(), len(vocab)) for s in sentences for w in s["words"]]
    flat_ids = np.asarray(flat, dtype=np.int64)
    lengths = np.asarray([len(s["words"]) for s in sentences], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sid, wi = meta[:, META_SENTENCE].astype(np.int64), meta[:, META_WORD].astype(np.int64)
    ok = (wi >= 0) & (sid >= 0) & (sid < len(sentences))
    ok[ok] &= wi[ok] < lengths[sid[ok]]
    keys[ok] = flat_ids[starts[sid[ok]] + wi[ok]]
    return keys


def feature_order(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray]:
    """Triplet indices sorted by (feature, -value, row) and the start of each feature's run (F + 1,).

    One stable two-key sort: ties in value keep the triplets' own order, which is by row (``SparseCodes.rows`` is
    ascending)."""
    order = np.lexsort((-codes.values, codes.features))
    counts = np.bincount(codes.features, minlength=codes.n_features)
    return order, np.concatenate([[0], np.cumsum(counts)])


def label_features(codes: SparseCodes, sentences: list[dict] | None = None, top_k: int = 500,
                   n_unique: int = 100, n_contexts: int = 10) -> PosLabels:
    """POS profile and top contexts of every feature (see the module docstring).

    Args:
        codes: sparse codes with their ``meta`` (from an ``ActivationCache``).
        sentences: ``cache.sentences()``; Brown records (with ``words``) make words the unit of uniqueness.
        top_k: activations considered per feature. n_unique: distinct words kept among them.
        n_contexts: distinct sentences kept per feature for the browser.
    """
    if codes.meta is None:
        raise ValueError("POS labels need the metadata of every row (encode an ActivationCache)")
    meta = codes.meta
    keys = word_keys(meta, sentences)
    tag_of_row = np.where(meta[:, META_TAG] < 0, len(TAGS) - 1, meta[:, META_TAG]).astype(np.int64)
    order, starts = feature_order(codes)
    n_feat, n_tags = codes.n_features, len(TAGS)
    dominant = np.full(n_feat, -1, dtype=np.int64)
    purity = np.zeros(n_feat)
    dist = np.zeros((n_feat, n_tags))
    n_words = np.zeros(n_feat, dtype=np.int64)
    contexts: list[list[Context]] = [[] for _ in range(n_feat)]
    for f in np.flatnonzero(starts[1:] > starts[:-1]):
        sel = order[starts[f] : min(starts[f] + top_k, starts[f + 1])]
        rows = codes.rows[sel]
        _, first = np.unique(keys[rows], return_index=True)
        first = np.sort(first)[:n_unique]
        counts = np.bincount(tag_of_row[rows[first]], minlength=n_tags)
        dominant[f] = int(np.argmax(counts))
        n_words[f] = len(first)
        dist[f] = counts / len(first)
        purity[f] = dist[f, dominant[f]]
        _, best = np.unique(meta[rows, META_SENTENCE], return_index=True)
        for i in np.sort(best)[:n_contexts]:
            r = int(rows[i])
            contexts[f].append(Context(r, int(meta[r, META_SENTENCE]), int(meta[r, META_POSITION]),
                                       int(meta[r, META_WORD]), float(codes.values[sel[i]])))
    return PosLabels(dominant, purity, dist, n_words, contexts)


def purity_summary(labels: PosLabels, min_purity: float = 0.8, prefix: str = "interpret/") -> dict[str, float]:
    """Share of alive features with purity >= ``min_purity``, overall and per dominant tag, the mean purity, and the
    share of alive features whose dominant tag is each tag (tags no feature has are left out)."""
    alive = labels.dominant >= 0
    n_alive = int(alive.sum())
    out = {f"{prefix}pos_purity_ge_{min_purity}": float((labels.purity[alive] >= min_purity).mean())
           if n_alive else 0.0,
           f"{prefix}pos_purity_mean": float(labels.purity[alive].mean()) if n_alive else 0.0}
    for t, tag in enumerate(TAGS):
        is_t = alive & (labels.dominant == t)
        if is_t.any():
            out[f"{prefix}pos_dominant_share/{tag}"] = float(is_t.sum() / n_alive)
            out[f"{prefix}pos_purity_ge_{min_purity}/{tag}"] = float((labels.purity[is_t] >= min_purity).mean())
    return out


__all__ = ["TAGS", "Context", "PosLabels", "feature_order", "label_features", "purity_summary", "word_keys"]
