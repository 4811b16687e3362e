"""The seed analyses as one command each: ``python train.py study NAME [options | --config FILE]``.

- ``decomposition`` (Tehenan et al., arXiv 2506.04373): per model, a Brown token cache and a BatchTopK SAE of one
  layer, the interpretability suite on it (POS purity, pooling survival, PS-Eval, the feature browser), POS probes
  per layer (linear and MLP) and on the SAE's codes; then, over the models, shared vs model-specific features
  (matched by activation over the same Brown words) and the POS profile of each group.
- ``frontier`` (Papadimitriou et al., arXiv 2504.11695): SAEs of every k x dictionary size on one cache, explained
  variance against held-out L0, as a table and a plot, with the browser of one of them.
- ``pseval`` (Minegishi et al., arXiv 2501.06254): one SAE per layer, PS-Eval of each on WiC, with a browser each.

This module parses each study's options and calls the library: :mod:`evaluation.study_runs` measures,
:mod:`evaluation.study_sections` draws the report, :mod:`evaluation.interpret.study_report` writes it. Each writes a
report folder: ``study.json``, ``report.md``, ``report.html``, PNG figures, and per SAE its export, ``train.json``
and the suite's folder (``features.html``).
Caches are built on first use and SAEs trained unless the folder already holds one trained with the same settings.
Options are documented by ``python train.py study NAME --help``; a YAML file of them is read with ``--config``
(``configs/studies/``). ``python train.py study report RESULT.json --output_dir DIR`` redraws a report (tables,
figures, pages) from a study's ``study.json`` without measuring anything again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from commands.run_defaults import wandb_mode_default
from core.errors import DataError
from datamodules.activation_builder import model_folder
from evaluation.interpret.figures import require_matplotlib
from evaluation.interpret.probes import PROBE_KINDS
from evaluation.interpret.study_report import write_report
from evaluation.study_build import CacheSpec, TrainSpec, device_of, slug
from evaluation.study_runs import run_decomposition, run_frontier, run_pseval
from evaluation.study_sections import REPORTS
from lightning_modules.components.batch_topk import BatchTopKConfig

#: The SAE a study trains unless told otherwise: configs/sae_minilm_brown_tokens.yaml's.
RECIPE_SAE = BatchTopKConfig(expansion_factor=8, k=32, aux_coef=1 / 32, dead_after=500_000, threshold_start=100)


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


# ------------------------------------------------------------------------------------------ the studies
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
    return redraw(Path(args.output_dir), run_decomposition(args, cache_spec, train_spec, argv), args.wandb_project)


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
    return redraw(Path(args.output_dir), run_frontier(args, cache_spec, train_spec, argv), args.wandb_project)


def pseval(argv: list[str]) -> dict:
    """PS-Eval study: one SAE per layer of one encoder, PS-Eval of each on the WiC dev pairs."""
    p = common_parser("pseval", pseval.__doc__)
    p.add_argument("--model", type=str, default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--layers", type=list[int] | None, default=None, help="layers with an SAE (null: 1 .. last)")
    p.add_argument("--text_prefix", type=str, default="")
    args = parse(p, argv)
    cache_spec, train_spec = specs(args)
    return redraw(Path(args.output_dir), run_pseval(args, cache_spec, train_spec, argv), args.wandb_project)


#: The studies, by name: ``python train.py study NAME ...``.
STUDIES: dict[str, Callable[[list[str]], dict]] = {"decomposition": decomposition, "frontier": frontier,
                                                   "pseval": pseval}


# ----------------------------------------------------------------------------------------------- reports
def redraw(out: Path, data: dict, wandb_project: str | None = None) -> dict:
    """A study's report folder from its results (what a study measured, or its ``study.json``): its figures, tables
    and pages (:data:`~evaluation.study_sections.REPORTS`), logged to W&B ``wandb_project`` when given."""
    title, sections = REPORTS[data["study"]]
    return report(out, title, sections(out, data), data, wandb_project)


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
        return redraw(Path(args.output_dir), data, args.wandb_project)
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


__all__ = ["RECIPE_SAE", "STUDIES", "log_wandb", "redraw", "report", "report_main", "study_main"]
