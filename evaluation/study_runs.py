"""The studies' measurements (``train.py study NAME``; :mod:`commands.study` parses the options): each builds the
caches it needs, trains or reloads its SAEs (:mod:`evaluation.study_build`), runs the interpretability suite, probes
and scores on them, and returns the results a report is drawn from (:mod:`evaluation.study_sections`) and that are
written as ``study.json``. ``args`` is the study's parsed options (:func:`commands.study.common_parser` and the
study's own), read as attributes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from jsonargparse import Namespace

from core.errors import DataError
from datamodules.activation_builder import check_layer
from datamodules.activation_cache import META_SENTENCE
from datamodules.wic import load_wic
from evaluation.interpret.codes import encode_sparse
from evaluation.interpret.cross_model import compare_models, word_codes
from evaluation.interpret.frontier import pareto_front, score_sae, sentence_variance_share
from evaluation.interpret.pos import label_features
from evaluation.interpret.probes import probe_caches
from evaluation.interpret.pseval import model_and_tokenizer
from evaluation.interpret.stability import energy_deciles
from evaluation.interpret.sts_recovered import SweepSTS
from evaluation.interpret.suite import SuiteResult, run_suite
from evaluation.study_build import (
    CacheSpec,
    TrainSpec,
    held_out_vectors,
    sentence_view,
    slug,
    token_cache,
    token_caches,
    token_datamodule,
    train_sae,
    training_vectors,
)
from evaluation.study_sections import PSEVAL_KEYS, memorised
from lightning_modules.components.sparse_coder import input_dim
from lightning_modules.export import load_sae

#: The suite's numbers a study keeps per SAE (its ``interpret/...`` summary keys).
SUITE_KEYS = ("l0", "alive_share", "pos_purity_mean", "pos_purity_ge_0.8", "pooling_survival_mean",
              "pooling_feature_share", "pooling_error_share", "sts_recovered/stsb", "sts/stsb/spliced")


def settings_of(args: Namespace) -> dict:
    """The options, as plain values, for study.json."""
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in vars(args).items()
            if k not in ("config", "__path__")}


def wic_pairs(args: Namespace, required: bool) -> list | None:
    """WiC dev pairs from ``data_root``, or None (with a printed note) when they do not load and are optional."""
    try:
        return load_wic("dev", args.data_root, hub=False)
    except (DataError, OSError) as err:
        if required:
            raise DataError(f"--data_root {args.data_root}: WiC did not load ({err})") from None
        print(f"  PS-Eval skipped: WiC did not load ({err})", flush=True)
        return None


def suite(sae, dm, folder: Path, args: Namespace, pairs, sae_b=None, encoder=None, sts: bool = True) -> SuiteResult:
    """The interpretability suite on ``sae`` (its browser and files under ``folder``; stability against ``sae_b``,
    the same SAE trained with another seed, when given; PS-Eval on ``pairs``, with ``encoder`` when the caller
    loaded it once for several SAEs; STS recovered on ``--sts_tasks`` unless ``sts`` is False); its
    :class:`SuiteResult`."""
    return run_suite(sae, dm.cache, folder, sae_b=sae_b, wic_pairs=pairs, encoder=encoder,
                     max_tokens=args.suite_tokens, sample_seed=args.seed, top_k=args.top_k, n_unique=args.n_unique,
                     n_contexts=args.n_contexts, sts_tasks=args.sts_tasks if sts else (), data_root=args.data_root,
                     title=f"{Path(dm.model_name_or_path).name} layer {dm.cache.meta['layer']}: BatchTopK "
                           f"{sae.num_latents} x k{sae.cfg.k}")


def per_model(mapping: dict, model: str, default):
    """``mapping``'s value for ``model``: its key as listed, else a key with the same :func:`slug` (the folder name
    with runs of other characters than letters, digits and dots as ``-``: ``bge_small_en``, ``/models/bge_small_en``
    and ``BAAI/bge-small-en`` all match), else ``default``."""
    if model in mapping:
        return mapping[model]
    return next((v for k, v in mapping.items() if slug(k) == slug(model)), default)


def fit_scores(sae, dm, name: str, seed: int, max_rows: int = 50_000) -> dict:
    """``held_out`` and ``train`` scores of ``sae`` (:func:`score_sae`, as many training vectors as held-out ones)
    and ``gap``, the training explained variance minus the held-out one; prints :func:`memorised`'s note."""
    held = score_sae(sae, held_out_vectors(dm, max_rows, seed))
    train = score_sae(sae, training_vectors(dm, held["n"], seed))
    if note := memorised(name, train["explained_variance"], held["explained_variance"]):
        print(f"  note: {note}", flush=True)
    return {"held_out": held, "train": train, "gap": train["explained_variance"] - held["explained_variance"]}


def cache_sentence_share(dm) -> float:
    """Share of the cache's variance between sentences (:func:`sentence_variance_share`)."""
    return sentence_variance_share(dm.cache.vectors(), dm.cache.metadata()[:, META_SENTENCE])


def pseval_of(summary: dict) -> dict[str, float]:
    """The PS-Eval scores in a suite summary, by their short names (:data:`PSEVAL_KEYS`)."""
    return {k.rsplit("/", 1)[1]: v for k, v in summary.items()
            if k.startswith("interpret/pseval/") and k.rsplit("/", 1)[1] in PSEVAL_KEYS}


def run_decomposition(args: Namespace, cache_spec: CacheSpec, train_spec: TrainSpec, argv: list[str]) -> dict:
    """The decomposition study's results: SAE, suite and probes per model, then shared vs model-specific
    features (``argv``: the command line, recorded in them)."""
    out = Path(args.output_dir)
    pairs = wic_pairs(args, required=False)
    models, dms, saes = {}, {}, {}
    for model in args.models:
        name = slug(model)
        prefix = per_model(args.text_prefixes, model, "")
        spec = dataclasses.replace(train_spec, lr=per_model(args.lrs, model, train_spec.lr))
        print(f"[{name}] cache, SAE, suite", flush=True)
        t = time.perf_counter()
        dm = token_cache(model, args.layer, cache_spec, args.max_sentences, prefix)
        layer = int(dm.cache.meta["layer"])
        sae, record = train_sae(dm, args.sae, spec, out / name / f"L{layer}" / "sae")
        fit = fit_scores(sae, dm, name, args.seed)
        summary = suite(sae, dm, out / name / f"L{layer}" / "interpret", args, pairs).summary
        print(f"[{name}] probes", flush=True)
        n_layers = int(dm.cache.meta["num_hidden_layers"])
        probe_layers = sorted({check_layer(v, n_layers, model) for v in (
            args.probe_layers if args.probe_layers is not None else range(n_layers + 1))})
        others = token_caches(model, [L for L in probe_layers if L != layer], cache_spec, args.probe_sentences,
                              prefix)  # one encoder pass for all of them
        caches = {f"layer{L}": dm.cache if L == layer else others[L].cache for L in probe_layers}
        if f"layer{layer}" not in caches:
            caches[f"layer{layer}"] = dm.cache
        probes = probe_caches(caches, sae=sae, sae_input=f"layer{layer}", kinds=args.probe_kinds,
                              max_tokens=args.probe_tokens, seed=args.seed,
                              mlp={"epochs": args.mlp_epochs, "hidden": args.mlp_hidden, "seed": args.seed})
        models[name] = {"model": model, "layer": layer, "num_layers": n_layers, "text_prefix": prefix,
                        "num_latents": sae.num_latents, "k": sae.cfg.k, "lr": spec.lr,
                        "cache": str(dm.cache.folder), "cache_vectors": len(dm.cache),
                        "cache_sentences": int(dm.cache.meta["n_sentences"]), "sae": record,
                        "held_out": fit["held_out"], "train_fit": fit["train"], "fit_gap": fit["gap"],
                        "sentence_variance_share": cache_sentence_share(dm),
                        "suite": {k: summary.get(f"interpret/{k}") for k in SUITE_KEYS},
                        "pseval": pseval_of(summary), "probes": probes.to_dict(),
                        "probe_caches": {k: str(c.folder) for k, c in caches.items()},
                        "browser": f"{name}/L{layer}/interpret/features.html", "seconds": time.perf_counter() - t}
        dms[name], saes[name] = dm, sae
    cross = None
    if len(models) > 1:
        print("[cross-model] matching features over the same Brown words", flush=True)
        common = None
        for dm in dms.values():
            ids = np.unique(dm.cache.metadata()[:, META_SENTENCE])
            common = ids if common is None else np.intersect1d(common, ids)
        rng = np.random.default_rng(args.seed)
        chosen = np.sort(rng.permutation(common)[: args.compare_sentences])
        words, labels = {}, {}
        for name, dm in dms.items():
            view = sentence_view(dm.cache, chosen)
            codes = encode_sparse(saes[name], view)
            labels[name] = label_features(codes, dm.cache.sentences(), top_k=args.top_k, n_unique=args.n_unique,
                                          n_contexts=0)
            words[name] = word_codes(codes)
        result = compare_models(words, labels, args.match_threshold, args.one_to_one)
        cross = {**result.to_dict(), "sentences": int(len(chosen))}
    data = {"study": "decomposition", "argv": argv, "models": models, "cross_model": cross,
            "settings": settings_of(args)}
    return data


def run_frontier(args: Namespace, cache_spec: CacheSpec, train_spec: TrainSpec, argv: list[str]) -> dict:
    """The frontier study's results: SAEs of each k x dictionary size on one cache, explained variance against
    held-out L0, the suite on the browsed one (``argv``: the command line, recorded in them)."""
    out = Path(args.output_dir)
    dm = token_cache(args.model, args.layer, cache_spec, args.max_sentences, args.text_prefix)
    layer = int(dm.cache.meta["layer"])
    x_eval = held_out_vectors(dm, args.eval_tokens, args.seed)
    x_fit = training_vectors(dm, len(x_eval), args.seed)
    sts = SweepSTS(args.sts_tasks, args.data_root, dm.cache.meta, args.max_length)
    points, saes, cfgs = [], {}, {}
    for e in args.expansions:
        for k in args.ks:
            name = f"{e}x{k}"
            cfgs[name] = dataclasses.replace(args.sae, expansion_factor=e, num_latents=0, k=k)
            sae, record = train_sae(dm, cfgs[name], train_spec, out / "saes" / name)
            saes[name] = sae
            points.append({"name": name, "num_latents": sae.num_latents, "k": k, **score_sae(sae, x_eval),
                           "train_explained_variance": score_sae(sae, x_fit)["explained_variance"],
                           "train_seconds": record.get("train_seconds"), **sts(sae)})
            print(f"  {name}: EV {points[-1]['explained_variance']:.4f} at L0 {points[-1]['l0']:.1f}"
                  + (f", STS recovered {points[-1]['sts_recovered']:.3f}" if sts.tasks else ""), flush=True)
            if note := memorised(name, points[-1]["train_explained_variance"], points[-1]["explained_variance"]):
                print(f"  note: {note}", flush=True)
    front = pareto_front([q["l0"] for q in points], [q["explained_variance"] for q in points])
    for q, on in zip(points, front):
        q["on_front"] = bool(on)
    extra = []
    if args.recipe_sae:
        sae = load_sae(args.recipe_sae, device=train_spec.device)
        if input_dim(sae) != dm.dim:
            raise DataError(f"--recipe_sae {args.recipe_sae}: takes {input_dim(sae)}-d inputs, the cache holds "
                            f"{dm.dim}-d vectors")
        extra.append({"name": "recipe", "group": "recipe SAE", "num_latents": sae.num_latents, "k": sae.cfg.k,
                      **score_sae(sae, x_eval), "path": args.recipe_sae, **sts(sae)})
    default = f"{args.sae.expansion_factor}x{args.sae.k}"
    browse = args.browse or (default if default in saes else next(iter(saes)))
    if browse not in saes:
        raise DataError(f"--browse {browse}: not one of the SAEs of the sweep ({', '.join(saes)})")
    other = None
    if args.stability_seed is not None:
        other, _ = train_sae(dm, cfgs[browse], dataclasses.replace(train_spec, seed=args.stability_seed),
                             out / "saes" / f"{browse}_seed{args.stability_seed}")
    browsed = suite(saes[browse], dm, out / "saes" / browse / "interpret", args, None, other,
                    sts=False)  # measured with the sweep
    summary = browsed.summary
    energy = np.array([f["energy"] for f in browsed.features])
    bins = energy_deciles(energy)
    by_decile = [{"decile": b, "energy_mean": float(energy[bins == b].mean()),
                  "stability_cos": summary.get(f"interpret/stability_mean_cos/decile_{b}")} for b in range(10)]
    groups = {k.removeprefix("interpret/group_share_"): v for k, v in summary.items()
              if k.startswith("interpret/group_share_")}
    density = score_sae(saes[browse], x_eval, density=True)["log10_density_hist"]
    data = {"study": "frontier", "argv": argv, "output_dir": str(out), "model": args.model, "layer": layer,
            "cache": str(dm.cache.folder),
            "eval_vectors": len(x_eval), "points": points, "extra": extra, "browsed": browse,
            "browsed_suite": {k: summary.get(f"interpret/{k}") for k in SUITE_KEYS},
            "stability": None if other is None else {
                "seeds": [args.seed, args.stability_seed], "mean_cos": summary["interpret/stability_mean_cos"],
                "method": summary["interpret/stability_method"]},
            "energy_deciles": by_decile, "group_share": groups or None, "settings": settings_of(args),
            "sts": sts.baseline(), "browsed_density": density}
    return data


def run_pseval(args: Namespace, cache_spec: CacheSpec, train_spec: TrainSpec, argv: list[str]) -> dict:
    """The PS-Eval study's results: one SAE per layer of one encoder, PS-Eval of each on the WiC dev pairs
    (``argv``: the command line, recorded in them)."""
    out = Path(args.output_dir)
    pairs = wic_pairs(args, required=True)
    layers = args.layers
    results = {}
    n_layers = int(token_datamodule(args.model, -1, cache_spec).identity()["num_hidden_layers"])
    layers = sorted({check_layer(v, n_layers, args.model) for v in (layers if layers is not None
                                                                     else range(1, n_layers + 1))})
    print(f"caches of layers {layers} (one encoder pass for those missing)", flush=True)
    dms = token_caches(args.model, layers, cache_spec, args.max_sentences, args.text_prefix)
    encoder = model_and_tokenizer(args.model)  # once: PS-Eval of every layer reads the same model
    for L in layers:
        print(f"[layer {L}] SAE, suite with PS-Eval", flush=True)
        dm = dms[L]
        sae, record = train_sae(dm, args.sae, train_spec, out / f"L{L}" / "sae")
        summary = suite(sae, dm, out / f"L{L}" / "interpret", args, pairs, encoder=encoder).summary
        fit = fit_scores(sae, dm, f"the layer-{L} SAE", args.seed)
        results[L] = {"pseval": pseval_of(summary), "held_out": fit["held_out"], "train_fit": fit["train"],
                      "suite": {k: summary.get(f"interpret/{k}") for k in SUITE_KEYS}, "sae": record,
                      "pairs": summary.get(f"interpret/pseval/layer{L}/balanced"),
                      "browser": f"L{L}/interpret/features.html"}
    data = {"study": "pseval", "argv": argv, "model": args.model, "layers": results,
            "settings": settings_of(args)}
    return data


__all__ = ["SUITE_KEYS", "cache_sentence_share", "fit_scores", "per_model", "pseval_of", "run_decomposition",
           "run_frontier", "run_pseval", "settings_of", "suite", "wic_pairs"]
