"""The interpretability suite in one call: codes, POS labels, pooling decomposition, stability and group share of
an SAE over a token-level activation cache, as W&B scalars and per-feature records for the HTML browser.

Record schema (one dict per feature; the browser codes against it)::
    {"id": int, "label": str (dominant tag or "dead"), "purity": float, "energy": float, "fires": int,
     "pos_dist": {tag: share}, "hist": {"edges": [float, ...], "counts": [int, ...]},
     "contexts": [{"tokens": [str, ...], "index": int, "value": float}],
     "contribution": float | None, "survival": float | None, "stability_cos": float | None}

Context tokens are the sentence's Brown words with ``index`` the activating wordpiece's word; a special token
activating is shown as ``[CLS]`` / ``[SEP]`` (the tokenizer's own name when one is given) before / after the words.
Caches without words show the cached wordpieces when a tokenizer is given, else the whole text with index -1.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Literal, NamedTuple

import numpy as np

from datamodules.activation_cache import META_SENTENCE, META_TOKEN, ActivationCache
from evaluation.interpret.codes import SparseCodes, encode_sparse
from evaluation.interpret.pooling import PoolingStats, pooling_contributions, pooling_summary
from evaluation.interpret.pos import TAGS, Context, PosLabels, label_features, purity_summary
from evaluation.interpret.stability import (
    IMAGINATIVE,
    INFORMATIVE,
    Matching,
    brown_groups,
    group_share,
    group_share_summary,
    match_decoders,
    stability_by_decile,
)
from lightning_modules.components.sparse_coder import SparseCoder


class InterpretReport(NamedTuple):
    summary: dict[str, float | str]
    """Scalars for W&B, keys ``interpret/...`` (``interpret/stability_method`` and ``interpret/pooling_tokens``
    are strings); ``interpret/seconds/<part>`` is the time each part took."""
    features: list[dict]
    """One record per feature (schema in the module docstring)."""


class Clock:
    """Seconds since the previous call, recorded under the name given: ``clock("codes")``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def context_tokens(ctx: Context, sentence: dict, meta: np.ndarray, tokenizer=None) -> tuple[list[str], int]:
    """Readable tokens of a context's sentence and the index of the activating item among them."""
    if "words" in sentence:
        words = list(sentence["words"])
        if ctx.word_index >= 0:
            return words, ctx.word_index
        name = tokenizer.convert_ids_to_tokens(int(meta[ctx.row, META_TOKEN])) if tokenizer is not None else None
        if ctx.position == 0:
            return [name or "[CLS]", *words], 0
        return [*words, name or "[SEP]"], len(words)
    if tokenizer is None:
        return [sentence.get("text", "")], -1
    sid = meta[:, META_SENTENCE]
    lo, hi = np.searchsorted(sid, ctx.sentence_id), np.searchsorted(sid, ctx.sentence_id, side="right")
    return tokenizer.convert_ids_to_tokens(meta[lo:hi, META_TOKEN].tolist()), int(ctx.row - lo)


def feature_records(codes: SparseCodes, labels: PosLabels, sentences: list[dict], pooling: PoolingStats | None = None,
                    matching: Matching | None = None, tokenizer=None) -> list[dict]:
    """Per-feature records for the browser (schema in the module docstring)."""
    edges = [float(e) for e in codes.hist_edges]
    out = []
    for f in range(codes.n_features):
        contexts = []
        for ctx in labels.contexts[f]:
            tokens, index = context_tokens(ctx, sentences[ctx.sentence_id], codes.meta, tokenizer)
            contexts.append({"tokens": tokens, "index": index, "value": ctx.value})
        out.append({
            "id": f, "label": labels.label(f), "purity": float(labels.purity[f]), "energy": float(codes.energy[f]),
            "fires": int(codes.fires[f]),
            "pos_dist": {TAGS[t]: float(s) for t, s in enumerate(labels.dist[f]) if s > 0},
            "hist": {"edges": edges, "counts": [int(c) for c in codes.hist_counts[f]]},
            "contexts": contexts,
            "contribution": _finite(pooling.contribution[f]) if pooling is not None else None,
            "survival": _finite(pooling.survival[f]) if pooling is not None else None,
            "stability_cos": _finite(matching.cos[f]) if matching is not None else None,
        })
    return out


def interpret_sae(sae: SparseCoder, cache: ActivationCache, sae_b: SparseCoder | None = None, *, tokenizer=None,
                  chunk_rows: int = 4096, top_k: int = 500, n_unique: int = 100, n_contexts: int = 10,
                  pooling: Literal["auto", "model", "words", "none"] = "auto",
                  groups: Literal["auto"] | tuple[tuple[str, ...], tuple[str, ...]] | None = "auto",
                  match: Literal["auto", "hungarian", "top_m"] = "auto") -> InterpretReport:
    """Run the suite (docs/methods.md 5a, 5c) over a token-level cache and return scalars and per-feature records.

    Args:
        sae: the SAE to analyse (its inference threshold must be set). sae_b: the same SAE trained with another seed
            (stability); None skips stability.
        cache: token-level ``ActivationCache`` (Brown gives POS tags, words and categories).
        tokenizer: optional, names special tokens and shows wordpieces of caches without words.
        chunk_rows, top_k, n_unique, n_contexts: see :func:`encode_sparse` and :func:`label_features`.
        pooling: ``model`` averages every token incl. [CLS]/[SEP] (needs a ``special_tokens='keep'`` cache, else an
            error); ``words`` the word tokens only; ``auto`` is ``model`` when the cache kept the special tokens and
            ``words`` (with a warning) otherwise; ``none`` skips it.
        groups: two tuples of categories for the group share; ``auto`` = Brown informative vs imaginative prose when
            the sentences have those categories; None skips it.
        match: decoder matching method of :func:`match_decoders`.
    """
    clock = Clock()
    sentences = cache.sentences()
    clock("load_sentences")
    codes = encode_sparse(sae, cache, chunk_rows=chunk_rows)
    clock("codes")
    labels = label_features(codes, sentences, top_k=top_k, n_unique=n_unique, n_contexts=n_contexts)
    clock("pos_labels")
    summary: dict[str, float | str] = {
        "interpret/n_tokens": float(codes.n_rows), "interpret/n_features": float(codes.n_features),
        "interpret/alive_share": float(codes.alive.mean()), "interpret/l0": len(codes.values) / max(codes.n_rows, 1),
        "interpret/energy_mean": float(codes.energy.mean()), "interpret/hist_clipped": float(codes.n_clipped)}
    summary.update(purity_summary(labels))
    stats = None
    if pooling == "auto":
        pooling = "model" if cache.meta.get("special_tokens") == "keep" else "words"
        if pooling == "words":
            warnings.warn("the cache dropped [CLS]/[SEP]: the pooling decomposition averages word tokens only, not "
                          "the model's pooling (build the cache with special_tokens=keep for that)", stacklevel=2)
    if pooling != "none":
        stats = pooling_contributions(sae, codes, cache, include_special=pooling == "model")
        summary["interpret/pooling_tokens"] = "all" if pooling == "model" else "words"
        summary.update(pooling_summary(stats, labels))
        clock("pooling")
    matching = None
    if sae_b is not None:
        matching = match_decoders(sae.W_dec, sae_b.W_dec, method=match)
        summary["interpret/stability_mean_cos"] = matching.mean_cos
        summary["interpret/stability_method"] = matching.method
        for k, c in enumerate(stability_by_decile(matching, codes.energy)):
            summary[f"interpret/stability_mean_cos/decile_{k}"] = float(c)
        clock("stability")
    if groups == "auto":
        in_rows = np.unique(codes.meta[:, META_SENTENCE]) if codes.meta is not None else range(len(sentences))
        present = {sentences[i].get("category") for i in in_rows}
        groups = (INFORMATIVE, IMAGINATIVE) if present & set(INFORMATIVE) and present & set(IMAGINATIVE) else None
    if groups is not None:
        score = group_share(codes, brown_groups(codes.meta, sentences, tuple(groups[0]), tuple(groups[1])))
        summary.update(group_share_summary(score))
        clock("group_share")
    records = feature_records(codes, labels, sentences, stats, matching, tokenizer)
    clock("records")
    summary.update({f"interpret/seconds/{k}": v for k, v in clock.seconds.items()})
    return InterpretReport(summary, records)


__all__ = ["InterpretReport", "context_tokens", "feature_records", "interpret_sae"]
