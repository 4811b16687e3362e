"""The seed analyses as one command each: ``python train.py study NAME [options | --config FILE]``.

- ``decomposition`` (Tehenan et al., arXiv 2506.04373): per model, a Brown token cache and a BatchTopK SAE of one
  layer, the interpretability suite on it (POS purity, pooling survival, PS-Eval, the feature browser), POS probes
  per layer (linear and MLP) and on the SAE's codes; then, over the models, shared vs model-specific features
  (matched by activation over the same Brown words) and the POS profile of each group.
- ``frontier`` (Papadimitriou et al., arXiv 2504.11695): SAEs of every k x dictionary size on one cache, explained
  variance against held-out L0, as a table and a plot, with the browser of one of them.
- ``pseval`` (Minegishi et al., arXiv 2501.06254): one SAE per layer, PS-Eval of each on WiC, with a browser each.

Each writes a report folder (:mod:`evaluation.interpret.study_report`): ``study.json``, ``report.md``,
``report.html``, PNG figures, and per SAE its export, ``train.json`` and the suite's folder (``features.html``).
Caches are built on first use and SAEs trained unless the folder already holds one trained with the same settings.
Options are documented by ``python train.py study NAME --help``; a YAML file of them is read with ``--config``
(``configs/studies/``). ``python train.py study report RESULT.json --output_dir DIR`` redraws a report (tables,
figures, pages) from a study's ``study.json`` without measuring anything again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from evaluation.interpret.codes import encode_sparse
from evaluation.interpret.cross_model import compare_models, word_codes
from evaluation.interpret.figures import Series, bar_chart, density_chart, line_chart, require_matplotlib
from evaluation.interpret.frontier import frontier_plot, pareto_front, score_sae, sentence_variance_share
from evaluation.interpret.pos import TAGS, label_features
from evaluation.interpret.probes import PROBE_KINDS, probe_caches
from evaluation.interpret.pseval import model_and_tokenizer
from evaluation.interpret.stability import energy_deciles
from evaluation.interpret.sts_recovered import SweepSTS, baseline_lines, task_name
from evaluation.interpret.study_report import Section, Table, write_report
from evaluation.interpret.suite import run_suite
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from core.errors import DataError
from datamodules.activation_builder import check_layer, model_folder
from datamodules.activation_cache import META_SENTENCE
from datamodules.wic import load_wic
from evaluation.study_build import (
    CacheSpec,
    TrainSpec,
    device_of,
    held_out_vectors,
    sentence_view,
    slug,
    token_cache,
    token_caches,
    token_datamodule,
    train_sae,
    training_vectors,
)
from lightning_modules.components.batch_topk import BatchTopKConfig
from lightning_modules.export import load_sae

#: The SAE a study trains unless told otherwise: configs/sae_minilm_brown_tokens.yaml's.
RECIPE_SAE = BatchTopKConfig(expansion_factor=8, k=32, aux_coef=1 / 32, dead_after=500_000, threshold_start=100)
SUITE_KEYS = ("l0", "alive_share", "pos_purity_mean", "pos_purity_ge_0.8", "pooling_survival_mean",
              "pooling_feature_share", "pooling_error_share", "sts_recovered/stsb", "sts/stsb/spliced")
PSEVAL_KEYS = ("specificity", "f1", "accuracy", "precision", "recall")
#: Training-minus-held-out explained variance above which a study says the SAE memorised its training sentences.
MEMORISED_GAP = 0.05


# ------------------------------------------------------------------------------------------------ options
def common_parser(name: str, doc: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"train.py study {name}", description=doc)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (configs/studies/)")
    p.add_argument("--output_dir", type=str, default=f"runs/study_{name}", help="the report folder")
    p.add_argument("--data_root", type=str | None, default=None, help="folder holding nltk_data/ (Brown) and wic/")
    p.add_argument("--cache_dir", type=str | None, default=None, help="activation caches (default $EMBEDLAB_CACHE)")
    p.add_argument("--max_sentences", type=int | None, default=None,
                   help="the first N Brown sentences for the SAE caches (null: all 57,340)")
    p.add_argument("--max_length", type=int, default=256, help="tokens per sentence")
    p.add_argument("--encode_batch_size", type=int, default=64, help="sentences per encoder pass while caching")
    p.add_argument("--val_fraction", type=float, default=0.02,
                   help="sentences held out of SAE training (a fixed hash of the id); the SAEs are scored on them")
    p.add_argument("--sae", type=BatchTopKConfig, default=RECIPE_SAE, help="the SAE (BatchTopKConfig), e.g. --sae.k 64")
    p.add_argument("--steps", type=int, default=2000, help="training steps per SAE")
    p.add_argument("--batch_size", type=int, default=1024, help="vectors per SAE training step")
    p.add_argument("--lr", type=float | None, default=5e-3, help="Adam learning rate (null: the size-scaled default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite_tokens", type=int | None, default=100_000,
                   help="tokens (whole sentences) the interpretability suite reads per SAE (null: all)")
    p.add_argument("--top_k", type=int, default=500, help="POS labels: top activations per feature")
    p.add_argument("--n_unique", type=int, default=100, help="POS labels: distinct words among them")
    p.add_argument("--n_contexts", type=int, default=10, help="browser: contexts per feature")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda when there is one), cpu, cuda, ...")
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (null: torch's default)")
    p.add_argument("--sts_tasks", type=list[str] | None, default=None,
                   help="STS recovered of every SAE on these test sets under --data_root ([]: none; null: stsb when "
                        "its files are there)")
    p.add_argument("--wandb_project", type=str | None, default=None,
                   help="also log the report to this W&B project (offline without credentials; `wandb sync` later)")
    return p


def parse(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parsed options with ``--sae`` as a :class:`BatchTopKConfig` (its own checks as a one-line error)."""
    args = parser.parse_args(argv)
    try:
        sae = BatchTopKConfig.from_dict(dict(args.sae.as_dict() if isinstance(args.sae, Namespace) else
                                             args.sae.to_dict()))
    except (ValueError, TypeError) as err:
        raise DataError(f"--sae: {err}") from None
    args.sae = sae
    require_matplotlib()  # the figures come last: say it before hours of work
    args.sts_tasks = sts_tasks(args)
    return args


def sts_tasks(args: Namespace) -> list[str]:
    """The STS test sets STS recovered is measured on: ``--sts_tasks``, else STS-B when its files are under
    ``--data_root`` (a printed note when they are not)."""
    if args.sts_tasks is not None:
        return list(args.sts_tasks) if args.data_root or not args.sts_tasks else _no_root(args.sts_tasks)
    if args.data_root and (Path(args.data_root) / "stsb" / "sts-test.csv").is_file():
        return ["stsb"]
    print(f"  STS recovered skipped: no stsb/sts-test.csv under --data_root {args.data_root}", flush=True)
    return []


def _no_root(tasks: list[str]) -> list[str]:
    raise DataError(f"--sts_tasks {tasks}: needs --data_root (the STS files are read from there, never the hub)")


def settings_of(args: Namespace) -> dict:
    """The options, as plain values, for study.json."""
    return {k: (v.to_dict() if isinstance(v, BatchTopKConfig) else v) for k, v in vars(args).items()
            if k not in ("config", "__path__")}


def positive(args: Namespace, *names: str) -> None:
    for name in names:
        value = args[name]
        if value is not None and (value if isinstance(value, int | float) else min(value, default=1)) < 1:
            raise DataError(f"--{name} {value}: must be >= 1")


def specs(args: Namespace) -> tuple[CacheSpec, TrainSpec]:
    positive(args, "max_sentences", "max_length", "steps", "batch_size", "suite_tokens", "encode_batch_size")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val_fraction {args.val_fraction}: must be in (0, 1)")
    cache = CacheSpec(args.data_root, args.cache_dir, args.max_length, "keep", args.encode_batch_size, args.device,
                      args.batch_size, args.val_fraction)
    device = device_of(args.device)
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return cache, TrainSpec(args.steps, args.lr, seed=args.seed, accelerator=accelerator, device=device)


def wic_pairs(args: Namespace, required: bool) -> list | None:
    """WiC dev pairs from ``data_root``, or None (with a printed note) when they do not load and are optional."""
    try:
        return load_wic("dev", args.data_root, hub=False)
    except (DataError, OSError) as err:
        if required:
            raise DataError(f"--data_root {args.data_root}: WiC did not load ({err})") from None
        print(f"  PS-Eval skipped: WiC did not load ({err})", flush=True)
        return None


def suite(sae, dm, folder: Path, args: Namespace, pairs, sae_b=None, encoder=None, sts: bool = True):
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


def memorised(name: str, train_ev: float | None, held_ev: float, detail: str = "") -> str | None:
    """The sentence a study prints and reports when an SAE explains more than :data:`MEMORISED_GAP` more variance
    of its training vectors than of held-out ones; None when it does not."""
    if train_ev is None or not train_ev - held_ev > MEMORISED_GAP:
        return None
    return (f"{name} explains {train_ev:.3f} of its training vectors' variance but {held_ev:.3f} of held-out ones: "
            f"it memorised training sentences{detail}; give it more sentences or fewer latents.")


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
    return {k.rsplit("/", 1)[1]: v for k, v in summary.items()
            if k.startswith("interpret/pseval/") and k.rsplit("/", 1)[1] in PSEVAL_KEYS}


# ------------------------------------------------------------------------------------------ decomposition
def decomposition(argv: list[str]) -> dict:
    """Decomposition study: SAE, suite and probes per model, then shared vs model-specific features."""
    p = common_parser("decomposition", decomposition.__doc__)
    p.add_argument("--models", type=str, nargs="+", required=True, help="encoders (hub names or folders), >= 1")
    p.add_argument("--layer", type=int, default=-1, help="hidden_states index the SAEs read (-1: last)")
    p.add_argument("--text_prefixes", type=dict[str, str], default={},
                   help='per model (its name, or its folder name), e.g. {"intfloat/multilingual-e5-large": "query: "}')
    p.add_argument("--lrs", type=dict[str, float], default={},
                   help='per-model learning rates replacing --lr, keyed like --text_prefixes, e.g. '
                        '{"all-mpnet-base-v2": 2.0e-3}')
    p.add_argument("--probe_layers", type=list[int] | None, default=None, help="layers probed (null: 0 .. last)")
    p.add_argument("--probe_sentences", type=int, default=5000, help="first N Brown sentences of the probe caches")
    p.add_argument("--probe_tokens", type=int | None, default=50_000, help="probe words (whole sentences) drawn")
    p.add_argument("--probe_kinds", type=list[str], default=list(PROBE_KINDS))
    p.add_argument("--mlp_epochs", type=int, default=5)
    p.add_argument("--mlp_hidden", type=int, default=256)
    p.add_argument("--compare_sentences", type=int, default=4000,
                   help="sentences (drawn from those all models cached) the features are matched over")
    p.add_argument("--match_threshold", type=float, default=0.5, help="correlation at which a feature is shared")
    p.add_argument("--one_to_one", type=bool, default=False, help="Hungarian matching instead of best match")
    args = parse(p, argv)
    cache_spec, train_spec = specs(args)
    positive(args, "probe_sentences", "probe_tokens", "compare_sentences", "mlp_epochs", "mlp_hidden")
    if not args.models:
        raise DataError("--models: give at least one encoder")
    if len(set(map(slug, args.models))) < len(args.models):
        raise DataError(f"--models {args.models}: two models would share a report folder (same name)")
    if bad := [k for k in args.probe_kinds if k not in PROBE_KINDS]:
        raise DataError(f"--probe_kinds: unknown {bad}; choose from {list(PROBE_KINDS)}")
    for option in ("text_prefixes", "lrs"):
        if stray := [k for k in args[option] if slug(k) not in map(slug, args.models)]:
            raise DataError(f"--{option}: {stray} name none of --models {args.models} (give a model as listed, or "
                            "its folder name)")
    if not -1 <= args.match_threshold <= 1:
        raise DataError(f"--match_threshold {args.match_threshold}: a correlation, in [-1, 1]")
    for model in args.models:
        model_folder(model)  # a folder that is no model is named before hours go into the models before it
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
    return report_decomposition(out, data, args.wandb_project)


def report_decomposition(out: Path, data: dict, wandb_project: str | None = None) -> dict:
    """The decomposition study's report folder from its results (what :func:`decomposition` measured, or its
    ``study.json``): the models' table, the probes by layer and the shared and model-specific features."""
    models, cross = data["models"], data["cross_model"]
    head = Table(["model", "layer", "SAE", "held-out EV", "training EV", "never active (held out)", "L0",
                  "POS purity", "purity >= 0.8", "pooling survival", "feature share", "PS-Eval specificity",
                  "PS-Eval F1", "PS-Eval accuracy", "STS-B recovered"],
                 [[n, m["layer"], f"{m['num_latents']} x k{m['k']}, lr {m['lr'] or 'default'}",
                   m["held_out"]["explained_variance"],
                   m["train_fit"]["explained_variance"], m["held_out"]["never_active"], m["held_out"]["l0"],
                   m["suite"]["pos_purity_mean"],
                   m["suite"]["pos_purity_ge_0.8"], m["suite"]["pooling_survival_mean"],
                   m["suite"]["pooling_feature_share"], m["pseval"].get("specificity"), m["pseval"].get("f1"),
                   m["pseval"].get("accuracy"), m["suite"].get("sts_recovered/stsb")] for n, m in models.items()])
    rows, series = [], []
    for n, m in models.items():
        res = m["probes"]["results"]
        for kind in next(iter(res.values())):
            layers = sorted(int(k[5:]) for k in res if k.startswith("layer"))
            series.append(Series(f"{n} {kind}", layers, [res[f"layer{L}"][kind]["accuracy"] for L in layers]))
            series.append(Series(f"{n} {kind} SAE codes", [m["layer"]], [res["sae"][kind]["accuracy"]]))
        for inp, by_kind in res.items():
            rows.append([n, inp] + [v for k in by_kind.values() for v in (k["accuracy"], k["macro_f1"])]
                        + [next(iter(by_kind.values()))["majority_accuracy"]])
    kinds = list(next(iter(next(iter(models.values()))["probes"]["results"].values())))
    probe_table = Table(["model", "input"] + [f"{k} {s}" for k in kinds for s in ("accuracy", "macro-F1")]
                        + ["majority"], rows)
    line_chart(out / "probes.png", series, "POS probe accuracy by layer", "layer (hidden_states index)",
               "test accuracy (split by sentence)")
    first = next(iter(models.values()))["probes"]
    notes = [memorised(n, m["train_fit"]["explained_variance"], m["held_out"]["explained_variance"],
                       f" (its cache's variance is {m['sentence_variance_share']:.0%} between sentences; "
                       f"{m['cache_sentences']:,} cached sentences, held-out ones included, for {m['num_latents']:,} "
                       "latents), so its features describe those sentences more than the model")
             for n, m in models.items()]
    shares = ", ".join(f"{n} {m['sentence_variance_share']:.0%}" for n, m in models.items())
    sections = [Section("Models", [f"Brown token caches ([CLS]/[SEP] kept); SAE settings in study.json; the suite on "
                                   f"{data['settings']['suite_tokens']} tokens per model. Explained variance (EV) on "
                                   "held-out sentences and on as many training vectors; share of each cache's variance "
                                   f"that lies between sentences: {shares}.", *filter(None, notes)], [head],
                        links=[(f"{n}: feature browser", m["browser"]) for n, m in models.items()]),
                Section("POS probes", [f"Universal POS tag of each word's first wordpiece; {first['n_train']:,} train "
                                       f"and {first['n_test']:,} test words of {first['n_sentences']:,} sentences, "
                                       "split by sentence. 'sae' is the probe on the SAE's codes of the SAE's layer."],
                        [probe_table], ["probes.png"])]
    if cross:
        pair_rows = [[k.replace("|", " vs "), v["n_features"], v["n_silent"], v["n_shared"], v["shared_share"],
                      v["match_corr_mean"], v["match_corr_median"], v["n_mutual"]] for k, v in cross["pairs"].items()]
        model_rows = [[n, v["n_features"], v["n_silent"], v["shared_any_share"], v["shared_all_share"],
                       v["specific_share"], v["pos_shared"]["purity_mean"], v["pos_specific"]["purity_mean"]]
                      for n, v in cross["models"].items()]
        tags = [t for t in TAGS if any(t in v[g]["dominant"] for v in cross["models"].values()
                                       for g in ("pos_shared", "pos_specific"))]
        pos_rows = [[f"{n} {g[4:]}"] + [v[g]["dominant"].get(t, 0.0) for t in tags]
                    for n, v in cross["models"].items() for g in ("pos_shared", "pos_specific")]
        bar_chart(out / "cross_model_pos.png", tags, {r[0]: r[1:] for r in pos_rows},
                  "Dominant POS of shared and specific features", "share of the group's features")
        sections.append(Section(
            "Shared and model-specific features",
            [f"Features matched by the correlation of their activations over {cross['sentences']:,} Brown sentences' "
             f"words (max over a word's pieces); shared: match correlation >= {cross['threshold']} "
             f"({cross['method']} match). Silent: no activation on those words."],
            [Table(["model vs other", "features", "silent", "shared", "shared share", "mean match corr",
                    "median match corr", "mutual pairs"], pair_rows),
             Table(["model", "features", "silent", "shared (any)", "shared (all)", "specific", "purity shared",
                    "purity specific"], model_rows),
             Table(["group"] + tags, pos_rows)], ["cross_model_pos.png"]))
    return report(out, "Decomposition study", sections, data, wandb_project)


def report(out: Path, title: str, sections: list, data: dict, project: str | None) -> dict:
    """Write a study's report folder, say where its page is, log it to W&B ``project`` when given, and return the
    numbers."""
    files = write_report(out, title, sections, data)
    print(f"report: {files['html']}", flush=True)
    if project:
        try:
            log_wandb(project, out, sections, data, files["html"])
        except Exception as err:  # noqa: BLE001 - hours of study are already on disk; say why W&B missed them
            print(f"warning: --wandb_project {project}: the report was not logged to W&B ({type(err).__name__}: "
                  f"{err}); {out} holds all of it", flush=True)
    return data


def numbers(data, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a study's results as flat ``a/b/c`` keys (lists of records keyed by their ``name``)."""
    out: dict[str, float] = {}
    items = (data.items() if isinstance(data, dict) else
             ((d.get("name", i) if isinstance(d, dict) else i, d) for i, d in enumerate(data)))
    for key, value in items:
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, dict | list):
            out.update(numbers(value, f"{prefix}{key}/"))
    return out


def log_wandb(project: str, out: Path, sections: list, data: dict, page: Path) -> None:
    """One W&B run per study (job type ``study``, grouped by study): its options as the config, every table of the
    report as a W&B table, every figure as a ``wandb.Image``, the page as an HTML panel, every number in the run
    summary. Offline when
    nothing says how to reach W&B (``wandb sync`` uploads it later)."""
    import wandb  # ~1 s to import: only when asked

    from commands.run_defaults import wandb_mode_default

    wandb_mode_default()
    name = data["study"]
    run = wandb.init(project=project, name=f"study-{name}", group=f"study_{name}", job_type="study",
                     dir=str(out.resolve()), config=data["settings"])
    try:
        logged: dict = {"report": wandb.Html(page.read_text(encoding="utf-8"))}
        for section in sections:
            key = slug(section.title).lower()
            for i, table in enumerate(section.tables):
                logged[f"{key}/table{i}"] = wandb.Table(columns=table.headers, data=table.rows, allow_mixed_types=True)
            for figure in section.figures:  # the PNG matplotlib wrote (Pillow comes with matplotlib)
                logged[f"{key}/{Path(figure).stem}"] = wandb.Image(str(out / figure))
        run.log(logged)
        skip = ("settings", "argv")
        run.summary.update(numbers({k: v for k, v in data.items() if k not in skip}))
        folder, offline = Path(run.dir).parent, run.settings.mode in ("offline", "dryrun")
    finally:
        run.finish()
    hint = f"  (offline: `wandb sync {folder}` uploads it later)" if offline else ""
    print(f"W&B run: {folder}{hint}", flush=True)


# ------------------------------------------------------------------------------------------------ frontier
def frontier(argv: list[str]) -> dict:
    """Frontier study: SAEs of each k x dictionary size on one cache, explained variance against held-out L0."""
    p = common_parser("frontier", frontier.__doc__)
    p.add_argument("--model", type=str, default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--text_prefix", type=str, default="")
    p.add_argument("--ks", type=list[int], default=[8, 16, 32, 64, 128], help="training k of the sweep")
    p.add_argument("--expansions", type=list[int], default=[4, 8, 16], help="dictionary sizes, as multiples of d")
    p.add_argument("--eval_tokens", type=int, default=50_000, help="held-out vectors every SAE is scored on")
    p.add_argument("--recipe_sae", type=str | None, default=None, help="an exported SAE of this cache, shown too")
    p.add_argument("--browse", type=str | None, default=None,
                   help="EXPANSIONxK of the SAE that gets the suite and browser (default: the --sae's, else the first)")
    p.add_argument("--stability_seed", type=int | None, default=1,
                   help="train the browsed SAE again with this seed: decoder stability across seeds by feature energy "
                        "(null: skip)")
    args = parse(p, argv)
    cache_spec, train_spec = specs(args)
    positive(args, "ks", "expansions", "eval_tokens")
    if args.stability_seed is not None and args.stability_seed == args.seed:
        raise DataError(f"--stability_seed {args.stability_seed}: the same as --seed; stability needs another seed")
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
            cfgs[name] = BatchTopKConfig.from_dict({**args.sae.to_dict(), "expansion_factor": e, "num_latents": 0,
                                                    "k": k})
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
        if sae.cfg.d_in != dm.dim:
            raise DataError(f"--recipe_sae {args.recipe_sae}: takes {sae.cfg.d_in}-d inputs, the cache holds "
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
    return report_frontier(out, data, args.wandb_project)


def report_frontier(out: Path, data: dict, wandb_project: str | None = None) -> dict:
    """The frontier study's report folder from its results (what :func:`frontier` measured, or its ``study.json``):
    the sweep's table, explained variance and STS recovered against L0, the browsed SAE's density and energy."""
    points, extra, browse, settings = data["points"], data["extra"], data["browsed"], data["settings"]
    model = Path(data["model"]).name
    frontier_plot(points + extra, out / "frontier.png", f"{model} layer {data['layer']}: explained variance vs L0")
    figures = ["frontier.png"]
    if sts := data.get("sts"):  # absent in results of studies older than STS recovered
        frontier_plot(points + extra, out / "frontier_sts.png",
                      f"{model} layer {data['layer']}: STS recovered ({task_name(sts['task'])}) vs L0",
                      "sts_recovered", f"STS recovered on {task_name(sts['task'])} (1: nothing lost)")
        figures.append("frontier_sts.png")
    text = [f"{model} hidden_states[{data['layer']}] Brown tokens; every SAE trained {settings['steps']} steps of "
            f"{settings['batch_size']} vectors; scored with the inference threshold on {data['eval_vectors']:,} "
            "held-out vectors.", *baseline_lines(sts)]
    sections = [Section("Explained variance against L0", text, figures=figures),
                Section("Table", ["Training EV: the same scores on as many training vectors (much above the "
                                  "held-out one: the SAE memorised its training sentences).",
                                  *filter(None, (memorised(q["name"], q.get("train_explained_variance"),
                                                           q["explained_variance"]) for q in points + extra))],
                        [Table(["SAE", "latents", "k", "L0", "explained variance", "training EV", "FVU",
                                "never active", "STS recovered", "frontier"],
                               [[q["name"], q["num_latents"], q["k"], q["l0"], q["explained_variance"],
                                 q.get("train_explained_variance"), q["fvu"], q["never_active"],
                                 q.get("sts_recovered"), "yes" if q.get("on_front") else ""]
                                for q in points + extra])])]
    if density := data.get("browsed_density"):  # absent in results of studies older than the density histogram
        latents = next(q["num_latents"] for q in points if q["name"] == browse)
        density_chart(out / "density.png", {int(b): n for b, n in density.items()},
                      f"{browse}: feature density on {data['eval_vectors']:,} held-out vectors", latents)
        sections.append(Section("Feature density", [f"The {browse} SAE's latents by the log10 share of the held-out "
                                                    "vectors they fire on (SAELens' feature density; 'never': silent "
                                                    "on all)."],
                                [Table(["log10 firing frequency", "latents"], [[b, n] for b, n in density.items()])],
                                ["density.png"]))
    sections.append(energy_section(out, data, browse))
    return report(out, "Sparsity frontier", sections, data, wandb_project)


def energy_section(out: Path, data: dict, browse: str) -> Section:
    """The browsed SAE's features by energy E[z_i]: stability across seeds per energy decile, and the share of each
    feature's energy on informative vs imaginative Brown prose."""
    stab, deciles, groups = data["stability"], data["energy_deciles"], data["group_share"]
    text = [f"The suite on the {browse} SAE; features ranked by energy E[z_i] (mean code over the suite's tokens, "
            "zeros included) and cut into ten equal deciles."]
    figures = []
    if stab:
        text.append(f"Stability: the decoder rows of seeds {stab['seeds'][0]} and {stab['seeds'][1]} matched one to "
                    f"one ({stab['method']}): mean cosine {stab['mean_cos']:.3f}.")
        line_chart(out / "stability.png",
                   [Series("matched decoder cosine", list(range(10)), [d["stability_cos"] for d in deciles])],
                   f"{browse}: stability across seeds by energy decile", "energy decile (0: lowest)",
                   "mean matched cosine", y_range=(0, 1))
        figures.append("stability.png")
    tables = [Table(["energy decile", "mean energy", "matched cosine"],
                    [[d["decile"], d["energy_mean"], d["stability_cos"]] for d in deciles])]
    if groups:
        text.append(f"Group share E_a[z_i] / (E_a[z_i] + E_b[z_i]), a = informative prose (Brown A-J), b = imaginative "
                    f"(K-R): mean {groups['mean']:.3f}; {groups['specific_a']:.0f} features above 0.9, "
                    f"{groups['specific_b']:.0f} below 0.1.")
        tables.append(Table(["group share", "features"], [[f"{b / 10:.1f}-{(b + 1) / 10:.1f}", int(groups[f"hist/{b}"])]
                                                           for b in range(10)]))
    return Section("Features: energy, stability, groups", text, tables, figures,
                   [(f"{browse}: feature browser", f"saes/{browse}/interpret/features.html")])


# -------------------------------------------------------------------------------------------------- pseval
def pseval(argv: list[str]) -> dict:
    """PS-Eval study: one SAE per layer of one encoder, PS-Eval of each on the WiC dev pairs."""
    p = common_parser("pseval", pseval.__doc__)
    p.add_argument("--model", type=str, default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--layers", type=list[int] | None, default=None, help="layers with an SAE (null: 1 .. last)")
    p.add_argument("--text_prefix", type=str, default="")
    args = parse(p, argv)
    cache_spec, train_spec = specs(args)
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
    return report_pseval(out, data, args.wandb_project)


def report_pseval(out: Path, data: dict, wandb_project: str | None = None) -> dict:
    """The PS-Eval study's report folder from its results (what :func:`pseval` measured, or its ``study.json``,
    whose layers are strings)."""
    results = dict(sorted((int(L), r) for L, r in data["layers"].items()))

    def train_ev(r: dict) -> float | None:  # None in results of studies older than the training scores
        return r.get("train_fit", {}).get("explained_variance")

    layers = list(results)
    line_chart(out / "pseval.png", [Series({"f1": "F1"}.get(k, k), layers,
                                           [results[L]["pseval"].get(k, float("nan")) for L in layers])
                                    for k in ("specificity", "f1", "accuracy")],
               f"PS-Eval by layer: {Path(data['model']).name}", "layer (hidden_states index)", "score", y_range=(0, 1))
    table = Table(["layer", "balanced pairs", *PSEVAL_KEYS, "held-out EV", "training EV", "L0", "POS purity",
                   "STS-B recovered"],
                  [[L, r["pairs"], *(r["pseval"].get(k) for k in PSEVAL_KEYS), r["held_out"]["explained_variance"],
                    train_ev(r), r["held_out"]["l0"], r["suite"]["pos_purity_mean"],
                    r["suite"].get("sts_recovered/stsb")] for L, r in results.items()])
    notes = [memorised(f"the layer-{L} SAE", train_ev(r), r["held_out"]["explained_variance"])
             for L, r in results.items()]
    sections = [Section("PS-Eval by layer", ["WiC dev pairs whose target is one token in both contexts, T/F balanced; "
                                            "'same top feature' predicts 'same sense'.", *filter(None, notes)],
                        [table], ["pseval.png"],
                        [(f"layer {L}: feature browser", r["browser"]) for L, r in results.items()])]
    return report(out, "PS-Eval by layer", sections, data, wandb_project)


#: The studies, by name: ``python train.py study NAME ...``.
STUDIES: dict[str, Callable[[list[str]], dict]] = {"decomposition": decomposition, "frontier": frontier,
                                                   "pseval": pseval}
#: Each study's report from its results: ``python train.py study report RESULT.json``.
REPORTS: dict[str, Callable[..., dict]] = {"decomposition": report_decomposition, "frontier": report_frontier,
                                           "pseval": report_pseval}


def report_main(argv: list[str]) -> dict:
    """Redraw a study's report (tables, figures, pages) from its results, measuring nothing again."""
    p = ArgumentParser(prog="train.py study report", description=report_main.__doc__)
    p.add_argument("result", type=str, help="a study's study.json (or a copy of it, e.g. in benchmarks/results/)")
    p.add_argument("--output_dir", type=str, required=True,
                   help="the report folder (its links to feature browsers are relative to the study's own folder)")
    p.add_argument("--wandb_project", type=str | None, default=None, help="also log the report to this W&B project")
    args = p.parse_args(argv)
    require_matplotlib()
    try:
        data = json.loads(Path(args.result).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"study report {args.result}: not readable as a study's JSON ({err})") from None
    if not isinstance(data, dict) or data.get("study") not in REPORTS:
        raise DataError(f"study report {args.result}: not a study's results (its \"study\" names none of "
                        f"{', '.join(REPORTS)})")
    try:
        return REPORTS[data["study"]](Path(args.output_dir), data, args.wandb_project)
    except KeyError as err:  # results of an earlier version of the study, which recorded less
        raise DataError(f"study report {args.result}: the results lack {err}, which the {data['study']} report "
                        "needs (written by an earlier version of the study: run it again)") from None


def study_main(argv: list[str]) -> dict | None:
    """``study NAME [options]``: run one study (``--help`` after the name lists its options); ``study report
    RESULT.json --output_dir DIR``: redraw a study's report from its results."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: train.py study {{{','.join(STUDIES)}}} [options]  (train.py study NAME --help)\n"
              f"       train.py study report RESULT.json --output_dir DIR  (redraw a report from its results)\n\n"
              f"{__doc__}")
        return None
    if argv[0] == "report":
        return report_main(argv[1:])
    if argv[0] not in STUDIES:
        raise DataError(f"study: unknown study {argv[0]!r}; choose from {', '.join(STUDIES)} (or report)")
    return STUDIES[argv[0]](argv[1:])


__all__ = ["RECIPE_SAE", "REPORTS", "STUDIES", "report_main", "study_main"]
