"""The whole interpretability suite as one run that writes files: what the ``InterpretSAE`` callback (end of fit)
and ``python train.py interpret`` (on demand) both call.

Files written to ``output_dir``:

- ``summary.json``: the cache, its layer, the sample (``max_tokens``), every scalar (``interpret/...``,
  ``interpret/pseval/layer<L>/...``, ``interpret/sts_recovered/<task>`` and ``interpret/sts/<task>/...`` with
  ``sts_tasks``) and the seconds each part took;
- ``features.json``: one record per feature (schema in :mod:`evaluation.interpret.report`);
- ``pseval.json``: per layer, the confusion matrix, the metrics and the pair counts (when PS-Eval ran);
- ``features.html``: the feature browser, one static file that opens from disk.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from core.errors import DataError
from core.hub import resolve_model
from core.metrics import DENSITY_BINS, density_histogram, log10_density
from datamodules.activation_cache import ActivationCache
from evaluation.interpret.browser import write_feature_browser
from evaluation.interpret.pseval import PSEvalResult, model_and_tokenizer, ps_eval
from evaluation.interpret.report import Clock, interpret_sae
from evaluation.interpret.sts_recovered import recovered_metrics, sts_recovered
from lightning_modules.components.sparse_coder import SparseCoder, input_dim
from lightning_modules.sae import activations_of


@dataclass
class SuiteResult:
    summary: dict[str, float | str]
    features: list[dict]
    pseval: dict[int, PSEvalResult] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def cache_layer(cache: ActivationCache) -> int | None:
    """The ``hidden_states`` index the cache's vectors come from (its identity; None when it does not say)."""
    return None if cache.meta.get("layer") is None else int(cache.meta["layer"])


def check_sae_reads(sae: SparseCoder, cache: ActivationCache, name: str, same_vectors: bool = True) -> None:
    """A DataError naming ``name`` (the SAE's file, or its argument) and the cache folder when the suite cannot study
    ``sae`` on ``cache``: a cache of sentence vectors (the suite reads tokens), another width, or, with
    ``same_vectors``, other vectors than the SAE was trained on (level, layer, pooling...; the model is compared by
    its weights' fingerprint, and 'keep' and 'drop' caches hold the same vectors)."""
    trained_on = getattr(sae, "activations", None) or {}
    level = cache.meta.get("level")
    if level != "token":
        was = f" ({name} was trained on {trained_on['level']}-level ones)" if trained_on.get("level") else ""
        raise DataError(f"{cache.folder} holds {level}-level vectors{was}; the interpretability suite needs a "
                        "token-level cache (data.level=token)")
    if input_dim(sae) != cache.dim:
        raise DataError(f"{name} takes {input_dim(sae)}-d inputs but {cache.folder} holds {cache.dim}-d vectors: an "
                        "SAE of another model?")
    differ = {k: (v, cache.meta[k]) for k, v in trained_on.items()
              if same_vectors and k not in ("model", "special_tokens") and k in cache.meta and v != cache.meta[k]}
    if differ:
        raise DataError(f"{name} was trained on other vectors than {cache.folder} holds: "
                        + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items()))


#: The scalars shown at the top of the browser page (all of them are in summary.json and the loggers).
HEADLINE = ("n_tokens", "n_features", "alive_share", "l0", "pos_purity_ge_0.8", "pos_purity_mean", "pooling_tokens",
            "pooling_survival_mean", "pooling_feature_share", "pooling_error_share", "stability_mean_cos",
            "stability_method", "group_share_mean", "sts_recovered/stsb", "sts_recovered/sickr")
PSEVAL_HEADLINE = ("precision", "recall", "f1", "accuracy", "specificity")


def headline(summary: Mapping[str, float | str]) -> dict[str, float | str]:
    """The browser's summary line: :data:`HEADLINE` and each layer's PS-Eval metrics, without the prefix."""
    out = {k: summary[f"interpret/{k}"] for k in HEADLINE if f"interpret/{k}" in summary}
    for key, value in summary.items():
        if key.startswith("interpret/pseval/") and key.rsplit("/", 1)[1] in PSEVAL_HEADLINE:
            out[key.removeprefix("interpret/")] = value
    return out


def cache_tokenizer(cache):
    """The tokenizer of the model that wrote ``cache`` (it turns token ids back into the tokens the browser
    highlights), or None with a warning when it does not load (offline, a moved folder)."""

    name = cache.meta.get("model")
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(resolve_model(str(name)))
    except (OSError, ValueError) as err:
        warnings.warn(f"{cache.folder}: the tokenizer of {name!r} did not load ({err}); contexts are shown as whole "
                      "sentences without the activating token highlighted", stacklevel=2)
        return None


def run_suite(sae: SparseCoder, cache: ActivationCache, output_dir: str | Path, *, sae_b: SparseCoder | None = None,
              wic_pairs: Sequence | None = None, pseval_saes: Mapping[int, SparseCoder] | None = None,
              encoder=None, max_tokens: int | None = None, sample_seed: int = 0, title: str = "SAE features",
              sts_tasks: Sequence[str] = (), data_root: str | None = None, **interpret_kwargs) -> SuiteResult:
    """Run codes, POS labels, pooling decomposition, stability (with ``sae_b``), group share and PS-Eval (with
    ``wic_pairs``), and write the files listed in the module docstring.

    Args:
        sae: the SAE under study, trained on ``cache``'s vectors.
        cache: token-level activation cache; ``max_tokens`` keeps whole sentences drawn at random
            (``sample_seed``) up to that many tokens (:meth:`ActivationCache.sample_sentences`).
        output_dir: folder for the files (created).
        sae_b: the same SAE trained with another seed, for stability; None skips it.
        wic_pairs: WiC pairs (:func:`datamodules.wic.load_wic`); None skips PS-Eval.
        pseval_saes: ``{layer: SAE}`` of other layers of the same encoder, scored by PS-Eval next to ``sae``
            (whose layer is the cache's).
        encoder: model name / folder, ``(model, tokenizer)`` or ``Encoder`` for PS-Eval and for naming special
            tokens; default: the cache's model (loads offline when installed).
        sts_tasks, data_root: STS test sets (their files under ``data_root``) on which STS recovered is measured
            (:mod:`~evaluation.interpret.sts_recovered`); none by default.
        interpret_kwargs: passed to :func:`~evaluation.interpret.report.interpret_sae`.
    """
    for name, other, same_vectors in [("sae", sae, True), ("sae_b", sae_b, True),
                                      *((f"pseval_saes[{k}]", v, False) for k, v in (pseval_saes or {}).items())]:
        if other is not None:
            check_sae_reads(other, cache, name, same_vectors)
    layer = cache_layer(cache)
    if wic_pairs is not None and layer is None:
        raise ValueError(f"{cache.folder}: its meta.json names no layer, so PS-Eval cannot know which hidden states "
                         "the SAE reads")
    if layer is not None and int(layer) in {int(k) for k in (pseval_saes or {})}:
        raise ValueError(f"pseval_saes[{layer}]: layer {layer} is the cache's own, which PS-Eval scores with the SAE "
                         "under study; give only other layers")
    n_all = len(cache)
    if max_tokens:
        cache = cache.sample_sentences(max_tokens, seed=sample_seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if wic_pairs is not None or encoder is not None:
        encoder = model_and_tokenizer(encoder if encoder is not None else cache.meta["model"])
        tokenizer = encoder[1]
    else:  # no model needed, but the tokenizer names the activating token of caches without words
        tokenizer = cache_tokenizer(cache)
    report = interpret_sae(sae, cache, sae_b, tokenizer=tokenizer, **interpret_kwargs)
    summary = dict(report.summary)
    clock = Clock()
    results: dict[int, PSEvalResult] = {}
    if wic_pairs is not None:
        results = ps_eval(encoder, {layer: sae, **dict(pseval_saes or {})}, wic_pairs,
                          text_prefix=cache.meta.get("text_prefix") or "")
        for res in results.values():
            summary.update(res.to_dict("interpret/pseval"))
        clock("pseval")
    if sts_tasks:
        loaded = encoder if isinstance(encoder, tuple) else None
        result = sts_recovered(sae, sts_tasks, data_root, loaded=loaded, reads=activations_of(cache.meta),
                               max_length=int(cache.meta.get("max_length") or 128))
        summary.update(recovered_metrics(result, "interpret/"))
        clock("sts_recovered")
    files = {"summary": output_dir / "summary.json", "features": output_dir / "features.json",
             "browser": output_dir / "features.html"}
    fires = torch.tensor([f["fires"] for f in report.features], dtype=torch.float64)
    hist = density_histogram(log10_density(fires / max(float(summary["interpret/n_tokens"]), 1.0)))
    summary.update({f"interpret/log10_density_hist/{b}": int(n) for b, n in hist.items()})
    density = {"edges": [*DENSITY_BINS, 0], "counts": [int(n) for n in hist.values()]}
    write_feature_browser(report.features, files["browser"], title=title, summary=headline(summary), density=density)
    files["features"].write_text(json.dumps(report.features))
    if results:
        files["pseval"] = output_dir / "pseval.json"
        files["pseval"].write_text(json.dumps(
            {str(k): {**dataclasses.asdict(r), "layer": k} for k, r in results.items()}, indent=1))
    clock("write")
    summary.update({f"interpret/seconds/{k}": v for k, v in clock.seconds.items()})
    sample = {"max_tokens": max_tokens, "sample_seed": sample_seed, "cache_tokens": n_all} if max_tokens else None
    files["summary"].write_text(json.dumps({"cache": str(cache.folder), "layer": layer, "sample": sample, **summary},
                                           indent=1))
    return SuiteResult(summary, report.features, results, files)


__all__ = ["SuiteResult", "cache_layer", "check_sae_reads", "run_suite"]
