"""What a recipe need not say: the folders, loggers, checkpointing and learning-rate monitoring of every run.

A recipe holds what makes it that recipe (model, data, evaluation, steps, precision). ``train.py fit`` supplies
the rest, named after the recipe (the stem of the first ``--config``), wherever the recipe and the command line
leave it unset (``null``):

- ``trainer.default_root_dir``: ``runs/<recipe>``.
- ``trainer.logger``: a W&B logger (project ``embedlab``; run name and group ``<recipe>``; job type ``fit``; tags
  naming the method, the base model and the data) and a CSV logger, both under ``runs/<recipe>``. A recipe's own
  list replaces both; ``logger: false`` turns logging off. Without W&B credentials (``WANDB_API_KEY`` or a
  ``wandb login``) and without ``WANDB_MODE`` set, W&B runs offline (``wandb sync`` uploads them later).
- ``ModelCheckpoint`` when no callback is one: on the STS evaluator's metric (max, at its period, the file named
  after the step and the score), else on an SAE's ``val/sae/fvu`` (min); ``last.ckpt`` is kept either way. The SAE
  recipes name theirs in YAML (configs/defaults/sae.yaml); the STS one is computed because its period and metric
  follow the evaluator's. ``enable_checkpointing: false`` removes any ModelCheckpoint, the defaults' included.
- ``LearningRateMonitor`` (per step) when a logger is on and no callback is one.
- :class:`~callbacks.wandb_summary.WandbSummaries` for the best value of every monitored metric.
- a progress bar that reads the metrics it shows every ``log_every_n_steps`` steps, not at every step, and redraws
  at most twice a second (:mod:`callbacks.progress`: Rich when installed, else tqdm), unless the recipe has one or
  turns it off.
- :class:`~callbacks.preemption.PreemptionCheckpoint`: SIGTERM saves the step reached (unless checkpointing is
  off) and the run exits non-zero.

They are filled into the parsed config before anything is built, so resuming (``--ckpt_path``) treats them like
options a recipe wrote, and the config every logger records holds them.
"""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import Namespace
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE

from callbacks.sts import metric_name
from lightning_modules.checkpoints import config_entries
from lightning_modules.family import entry_name, family_class

PROJECT = "embedlab"
WANDB = "pytorch_lightning.loggers.WandbLogger"
CSV = "pytorch_lightning.loggers.CSVLogger"
CHECKPOINT = "pytorch_lightning.callbacks.ModelCheckpoint"
LR_MONITOR = "pytorch_lightning.callbacks.LearningRateMonitor"
SUMMARIES = "callbacks.WandbSummaries"
PREEMPTION = "callbacks.preemption.PreemptionCheckpoint"
RICH_BAR, TQDM_BAR = "callbacks.progress.RichMetricsBar", "callbacks.progress.TQDMMetricsBar"


def config_paths(argv: list[str]) -> list[tuple[int, int, str]]:
    """Where each ``--config`` stands on a command line: (index, number of items it takes, path)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            found.append((i, 2, argv[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, 1, arg.split("=", 1)[1]))
    return found


def recipe_name(argv: list[str]) -> str:
    """The stem of the first ``--config`` on the command line ("embedlab" without one)."""
    paths = config_paths(argv)
    return Path(paths[0][2]).stem if paths else PROJECT


def entry(class_path: str, dict_kwargs: dict | None = None, **init_args) -> Namespace:
    """A config entry as the parser writes one (``dict_kwargs``: arguments a class takes through ``**kwargs``)."""
    out = Namespace(class_path=class_path, init_args=Namespace(**init_args))
    if dict_kwargs:
        out.dict_kwargs = dict_kwargs
    return out


def run_tags(cfg: Namespace) -> list[str]:
    """W&B tags from the config: the method, the base model and the data (for grouping and filtering runs)."""
    model, data = cfg.get("model"), cfg.get("data")
    margs = (model.get("init_args") if model is not None else None) or Namespace()
    dargs = (data.get("init_args") if data is not None else None) or Namespace()
    tags = []
    family = family_class(getattr(model, "class_path", "") or "")
    if family is not None:  # the module's family names its method
        tags += family.run_tags(margs)
    elif model is not None and entry_name(model):
        tags.append(entry_name(model).removesuffix("Module").lower())
    base = margs.get("model_name_or_path") or dargs.get("model_name_or_path")
    if base:
        tags.append(f"model:{Path(str(base)).name}")
    if data is not None:
        tags.append(f"data:{entry_name(data).removesuffix('DataModule').lower()}")
        source = dargs.get("source")
        if isinstance(source, str) and source:
            tags.append(f"source:{Path(source).name}")
        if dargs.get("level"):
            tags.append(f"level:{dargs.level}")
    return [t[:64] for t in tags]  # W&B's limit per tag


def sts_metric(callback: Namespace) -> str:
    """The metric an ``STSEvaluator`` entry logs (``callbacks.sts.STSEvaluator.metric_name``, before setup)."""
    args = callback.get("init_args") or Namespace()
    return metric_name(args.get("task") or "stsb")


def default_checkpoint(cfg: Namespace) -> Namespace:
    """The ModelCheckpoint a recipe without one gets (see the module docstring)."""
    for callback in config_entries(cfg.trainer.get("callbacks")):
        if entry_name(callback) == "STSEvaluator":
            metric = sts_metric(callback)
            every = (callback.get("init_args") or Namespace()).get("every_n_steps", 250)
            return entry(CHECKPOINT, monitor=metric, mode="max", save_last=True, every_n_train_steps=every or None,
                         filename=f"step{{step}}-rho{{{metric}:.2f}}", auto_insert_metric_name=False)
    model = cfg.get("model")
    family = family_class(getattr(model, "class_path", "") or "")
    monitor = family.checkpoint_monitor(model.get("init_args") or Namespace()) if family is not None else None
    if monitor:  # the metric the module's family is kept by
        return entry(CHECKPOINT, monitor=monitor["monitor"], mode=monitor["mode"], save_last=True,
                     filename=monitor["filename"], auto_insert_metric_name=False)
    return entry(CHECKPOINT, save_last=True)


def wandb_mode_default() -> str | None:
    """Set ``WANDB_MODE=offline`` when nothing says how to reach W&B (no mode, no key, no login); return the mode
    set, or None when the environment already decides."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return None
    except OSError:
        pass
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def apply_run_defaults(cfg: Namespace, recipe: str) -> None:
    """Fill a parsed ``fit`` config's unset folders, loggers and callbacks, in place (see the module docstring)."""
    trainer = cfg.trainer
    if trainer.get("default_root_dir") is None:
        trainer.default_root_dir = f"runs/{recipe}"
    root = trainer.default_root_dir
    if trainer.get("logger") is None:
        trainer.logger = [
            # absolute: wandb's service resolves a relative folder against the directory IT started in, so a
            # later run of the same process in another working directory would lose its run file
            entry(WANDB, project=PROJECT, name=recipe, save_dir=os.path.abspath(root),
                  dict_kwargs={"group": recipe, "job_type": "fit", "tags": run_tags(cfg)}),
            entry(CSV, save_dir=root, name="csv"),
        ]
    callbacks = config_entries(trainer.get("callbacks"))
    if trainer.get("enable_checkpointing") is False:  # e.g. configs/trainer/debug.yaml over a recipe whose defaults
        callbacks = [c for c in callbacks if entry_name(c) != "ModelCheckpoint"]  # name one (configs/defaults/)
    names = {entry_name(c) for c in callbacks}
    if "ModelCheckpoint" not in names and trainer.get("enable_checkpointing") is not False:
        callbacks.append(default_checkpoint(cfg))
    loggers = config_entries(trainer.logger)
    if not any(name.endswith(("ProgressBar", "MetricsBar")) for name in names) \
            and trainer.get("enable_progress_bar") is not False:
        callbacks.append(entry(RICH_BAR if _RICH_AVAILABLE else TQDM_BAR))
    if "PreemptionCheckpoint" not in names:  # with checkpointing off too: it owns the signals until training
        callbacks.append(entry(PREEMPTION))
    if loggers and "LearningRateMonitor" not in names:
        callbacks.append(entry(LR_MONITOR, logging_interval="step"))
    if any(entry_name(lg) == "WandbLogger" for lg in loggers):
        wandb_mode_default()
        if "WandbSummaries" not in names:
            callbacks.append(entry(SUMMARIES))
    trainer.callbacks = callbacks
