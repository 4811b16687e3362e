"""Export the best checkpoint when fitting ends, and say where everything is."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from callbacks.mteb import MTEBEvaluator
from callbacks.run_results import (
    checkpoint_metadata,
    evaluation,
    log_artifacts,
    log_evaluation,
    run_folder,
    wandb_loggers,
    write_evaluation,
)
from core.errors import DataError, read_json
from core.files import shown, write_atomic
from evaluation.evaluate import parse_tasks, score_export
from evaluation.interpret.sts_recovered import recovered_metrics, sts_recovered
from lightning_modules.checkpoints import Checkpoint
from lightning_modules.export import export, export_format, prepare_output_dir
from lightning_modules.family import SAE, SENTENCE_TRANSFORMERS
from lightning_modules.loading import best_or_current
from lightning_modules.model_card import DEFAULT_STS_TASKS, checkpoint_facts
from lightning_modules.sae_card import state_metrics

RUN_FILE = "run.json"


class WritesAtFitEnd(pl.Callback):
    """Base of the callbacks that, when ``fit`` ends, write a folder from the best checkpoint's weights (else the
    final ones), on rank 0: ``output_dir``, else ``<run folder>/<subdir>`` (see :func:`run_folder`), so each run
    keeps its own export. The folder records its run in ``run.json``; an ``output_dir`` that holds the export of
    another run is refused when fitting starts (before any training), never replaced. Subclasses implement
    :meth:`write` and name the file that marks their export (``marker``).

    The folder is resolved in ``on_fit_start`` on every rank (the checkpoint folder is known by then): under DDP
    ``trainer.log_dir`` is a broadcast, which hangs when only rank 0 calls it (as from ``on_fit_end``).
    """

    subdir = "output"
    marker = "run.json"

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._out: Path | None = None
        self._run: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run = run_folder(trainer)
        self._out = Path(self.output_dir) if self.output_dir else self._run / self.subdir
        prepare_output_dir(self._out, self.marker, overwrite=True)  # a file, or a folder of something else
        record = self._out / RUN_FILE
        if record.is_file():
            other = read_json(record, f"the export's {RUN_FILE}", f"delete {record} if that folder is yours").get("run")
            if other and Path(other).resolve() != self._run.resolve():
                raise FileExistsError(f"{self._out} holds the export of another run ({other}): give another "
                                      "output_dir (or none: each run then exports into its own folder)")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module, checkpoint = best_or_current(trainer, pl_module)
        self.write(trainer, module, checkpoint, self._out)
        ckpt = str(checkpoint.path) if checkpoint is not None else None
        write_atomic(self._out / RUN_FILE, json.dumps({"run": str(self._run), "checkpoint": ckpt,
                                                       "global_step": trainer.global_step}, indent=1))

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: Checkpoint | None,
              out: Path) -> None:
        """Write ``out`` from ``module`` (built from ``checkpoint``, read once, or the trained module itself when
        ``checkpoint`` is None); an earlier export of the same run there is replaced."""
        raise NotImplementedError


class ExportOnFitEnd(WritesAtFitEnd):
    """At the end of ``fit``, export the best checkpoint (else the last weights) with
    :func:`lightning_modules.export.export`: a sentence-transformers folder (``<run folder>/export``) for encoders
    and MCR2 heads, ``cfg.json`` + ``sae.safetensors`` (``<run folder>/sae``) for SAEs, with ``sae_metrics.json``
    beside them (the threshold, the dead-latent count, and the last logged ``sae/*`` and ``val/sae/*`` values, or
    the checkpoint's own when it is from an earlier step: :func:`sae_metrics`).

    Prints the checkpoint, the exported folder and the logger locations (W&B run folder and ``wandb sync`` hint
    when offline).

    An SAE's figures include STS recovered (:mod:`evaluation.interpret.sts_recovered`: the STS test sets of
    ``sts_tasks`` scored with the SAE spliced in, against the clean and the zero-ablated encoder) when the datamodule
    names a data root.

    A sentence-transformers export carries a model card (README.md, :mod:`lightning_modules.model_card`) written
    from this run (:func:`fit_facts`): with the STS test sets of ``sts_tasks`` scored on the exported folder when
    the run names a data root (its STSEvaluator's or datamodule's ``data_root``), else the dev metric it logged.

    Those numbers (an SAE: ``sae_metrics.json``'s) are also written to ``<run folder>/eval.json`` and, on every W&B
    logger, logged as the table ``eval/sts`` and summary values (``eval/<task>_spearman``,
    ``eval/dev/<task>_spearman``, ``eval/checkpoint_step``; an SAE's ``eval/<figure>``); and the best checkpoint
    (type ``model``) and the export (type ``sentence-transformers`` or ``sae``) are logged as W&B artefacts, once the
    export exists (:mod:`callbacks.run_results`).

    Args:
        output_dir: target folder; default ``<run folder>/export`` (``<run folder>/sae`` for an SAE).
        sts_tasks: STS test sets the card scores (an SAE: its STS recovered) when a data root is known (``[]``:
            none; all seven take about a minute on MiniLM); default STS-B and SICK-R.
        format: SAEs only: ``sparsify`` (default) or ``saelens`` (a JumpReLU folder that
            ``sae_lens.SAE.load_from_disk`` opens, with the global threshold); see ``export_sae``. The SAE folder's
            README.md is generated from the SAE and ``sae_metrics.json``'s figures.
        log_artifacts: log the checkpoint and the export as W&B artefacts (the checkpoint as a reference to its
            file, the export uploaded from its folder when the run is online or synced; see
            :mod:`callbacks.run_results`).
    """

    def __init__(self, output_dir: str | None = None, sts_tasks: list[str] | None = None,
                 format: str | None = None, log_artifacts: bool = True) -> None:
        super().__init__(output_dir)
        self.log_artifacts = log_artifacts
        self.format = export_format(None, format, "ExportOnFitEnd format")  # a misspelt name fails at parse time
        self.sts_tasks = list(DEFAULT_STS_TASKS if sts_tasks is None else sts_tasks)
        if self.sts_tasks:
            parse_tasks(self.sts_tasks)  # a misspelt task fails before training, not at its end
        self.exported: Path | None = None
        self.eval_record: dict | None = None  # eval.json's content, once written
        self._export_type, self._load_hint = SENTENCE_TRANSFORMERS, ""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        export_format(pl_module, self.format, "ExportOnFitEnd format")  # an SAE format for an encoder: before training
        if pl_module.export_type not in FIT_RECORDS:  # named before training, not when the fit ends
            raise DataError(f"ExportOnFitEnd: no end-of-fit record for {type(pl_module).__name__}'s export type "
                            f"{pl_module.export_type!r} (callbacks/export.py FIT_RECORDS knows {sorted(FIT_RECORDS)})")
        self.subdir, self.marker = pl_module.export_subdir, pl_module.export_marker
        super().on_fit_start(trainer, pl_module)

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: Checkpoint | None,
              out: Path) -> None:
        facts, metrics = FIT_RECORDS[module.export_type](self, trainer, module, checkpoint)
        self.exported = export(module, out, overwrite=True, card=facts if facts is not None else metrics,
                               format=self.format)
        if metrics is not None:
            write_atomic(out / "sae_metrics.json", json.dumps(metrics, indent=1))
        # the numbers the card shows (scored here once, on the written folder) or the SAE's figures
        facts = score_export(self.exported, module, facts, self.sts_tasks)
        step = facts["step"] if facts is not None else metrics["global_step"]  # the exported weights' step
        ckpt = str(checkpoint.path) if checkpoint is not None else None
        self.eval_record = evaluation(ckpt, step, facts, metrics, trainer.callbacks)
        eval_file = write_evaluation(self._run or out.parent, self.eval_record)
        log_evaluation(wandb_loggers(trainer), self.eval_record, trainer.global_step)
        self._export_type = module.export_type
        self._load_hint = module.how_to_load(self.exported)
        lines = [f"checkpoint:     {shown(ckpt) if ckpt else '(none saved; exported the final weights)'}",
                 f"exported:       {shown(self.exported)}  ({module.how_to_load(shown(self.exported))})",
                 f"evaluation:     {shown(eval_file)}"]
        for logger in trainer.loggers:
            wandb = wandb_run(logger)
            if wandb is not None and wandb["disabled"]:
                lines.append("W&B run:        none (WANDB_MODE=disabled: nothing was logged to W&B)")
            elif wandb is not None:
                hint = f"  (offline: `wandb sync {wandb['dir']}` uploads it later)" if wandb["offline"] else ""
                lines.append(f"W&B run:        {wandb['dir']}{hint}")
            elif getattr(logger, "log_dir", None):
                lines.append(f"{type(logger).__name__}:{' ' * max(1, 15 - len(type(logger).__name__))}{logger.log_dir}")
        print("\n".join(lines), flush=True)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)  # the export, its run.json, eval.json, the W&B table and summaries
        loggers = wandb_loggers(trainer)
        if not (self.log_artifacts and loggers and self.exported is not None and self.eval_record is not None):
            return
        ckpt = self.eval_record["checkpoint"]
        meta = checkpoint_metadata(trainer, ckpt, self.eval_record["checkpoint_step"])
        fmt = export_format(pl_module, self.format)
        log_artifacts(loggers, ckpt, self.exported, self._export_type, meta,
                      {"format": fmt, "load": self._load_hint, "eval": self.eval_record["summary"]})


def wandb_run(logger) -> dict | None:
    """A WandbLogger's run: id, project, local folder and whether it is offline; None for other loggers."""
    run = getattr(logger, "experiment", None) if type(logger).__name__ == "WandbLogger" else None
    if run is None:
        return None
    offline = getattr(run.settings, "_offline", False) or getattr(run.settings, "mode", "") == "offline"
    return {"id": run.id, "project": run.project, "dir": shown(Path(run.dir).parent), "offline": bool(offline),
            "disabled": bool(getattr(run, "disabled", False))}


def datamodule_config(dm: pl.LightningDataModule) -> dict:
    """A datamodule's class path and the init arguments it keeps as attributes of the same name (plain values)."""
    params = [p for p in inspect.signature(type(dm).__init__).parameters if p != "self"]
    args = {p: getattr(dm, p) for p in params
            if isinstance(getattr(dm, p, None), (str, int, float, bool, list, tuple))}
    return {"class_path": f"{type(dm).__module__}.{type(dm).__qualname__}", "init_args": args}


def fit_facts(trainer: pl.Trainer, checkpoint: Checkpoint | None, run_dir: Path | None,
              sts_tasks: list[str]) -> dict:
    """The run facts of a fit-end export's model card (see :mod:`lightning_modules.model_card`): what the
    exported checkpoint holds (:func:`~lightning_modules.model_card.checkpoint_facts`), completed from the live run:
    the steps taken in all, the W&B run's folder, the datamodule, and the dev metric of the final weights when no
    checkpoint was kept."""
    facts = checkpoint_facts(checkpoint) if checkpoint is not None else {"step": trainer.global_step}
    facts.update(run_steps=trainer.global_step, sts_tasks=list(sts_tasks))
    if run_dir is not None:
        facts["run_dir"] = str(run_dir)
    runs = [r for r in map(wandb_run, trainer.loggers) if r is not None and not r["disabled"]]  # disabled: no run
    if runs:
        facts["wandb"] = runs[0]
    dm = getattr(trainer, "datamodule", None)
    if "data" not in facts and dm is not None:
        facts["data"] = datamodule_config(dm)
    evaluators = [cb for cb in trainer.callbacks if hasattr(cb, "history") and hasattr(cb, "metric_name")]
    if "dev_metric" not in facts:
        for cb in evaluators:
            value = dict(cb.history).get(facts["step"])
            if value is not None:
                facts["dev_metric"] = {"name": cb.metric_name, "value": float(value), "step": facts["step"],
                                       "selected": False}
                break
    if "sts_data_root" not in facts:
        roots = [getattr(cb, "data_root", None) for cb in evaluators] + [getattr(dm, "data_root", None)]
        root = next((r for r in roots if r), None)
        if root:
            facts["sts_data_root"] = str(root)
    folders = [cb.results_dir for cb in trainer.callbacks if isinstance(cb, MTEBEvaluator) and cb.results_dir]
    if folders:
        facts["mteb_results_dir"] = folders[0]
    return facts


def sae_metrics(trainer: pl.Trainer, module: pl.LightningModule, checkpoint: Checkpoint | None) -> dict:
    """The figures written beside an SAE's export: the last logged ``sae/*`` values and the SAE's state. When the
    exported checkpoint is from an earlier step than the last one, those logged values describe other weights: the
    figures are then the checkpoint's own (the module's ``card_record``: its step, its monitored value, its buffers),
    and the last logged values are kept apart under ``last_logged`` with their step, which the card does not read."""
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if "sae/" in k}
    if checkpoint is not None and checkpoint.step != trainer.global_step:
        return {**module.card_record(checkpoint), "last_logged": {"global_step": trainer.global_step, **logged}}
    return {**logged, "checkpoint": str(checkpoint.path) if checkpoint is not None else None,
            "global_step": trainer.global_step, **state_metrics(module.sae)}


def sae_sts(trainer: pl.Trainer, module: pl.LightningModule, tasks: list[str]) -> dict:
    """The SAE's STS recovered on ``tasks`` as ``sae_metrics.json`` figures (``sts_recovered/<task>``,
    ``sts/<task>/{clean,spliced,ablated}``), when the datamodule names a data root and the SAE knows what it reads;
    nothing otherwise. STS files missing there: a warning, and ``sts_recovered_error`` says why (as it does for a
    smoke run, which is not made to wait minutes for it)."""
    dm = getattr(trainer, "datamodule", None)
    root = getattr(dm, "data_root", None)
    if not tasks or not root or not getattr(module.sae, "activations", None):
        return {}
    if trainer.fast_dev_run or (getattr(getattr(dm, "cache", None), "meta", None) or {}).get("partial"):
        return {"sts_recovered_error": "a smoke run (fast_dev_run or a partial activation cache): not measured"}
    try:
        sae = copy.deepcopy(module.sae).to(trainer.strategy.root_device)  # the training device, not the export's
        result = sts_recovered(sae, tasks, root, max_length=getattr(dm, "max_length", 128),
                               batch_size=getattr(dm, "encode_batch_size", 64))
    except (DataError, OSError) as err:
        rank_zero_warn(f"STS recovered not measured: {err}")
        return {"sts_recovered_error": str(err)}
    return recovered_metrics(result)


def encoder_record(callback: ExportOnFitEnd, trainer: pl.Trainer, module: pl.LightningModule,
                   checkpoint: Checkpoint | None) -> tuple[dict, None]:
    """A sentence encoder's card: its run facts (:func:`fit_facts`)."""
    return fit_facts(trainer, checkpoint, callback._run, callback.sts_tasks), None


def sae_record(callback: ExportOnFitEnd, trainer: pl.Trainer, module: pl.LightningModule,
               checkpoint: Checkpoint | None) -> tuple[None, dict]:
    """An SAE's card: its figures (:func:`sae_metrics`) and its STS recovered (:func:`sae_sts`)."""
    return None, {**sae_metrics(trainer, module, checkpoint), **sae_sts(trainer, module, callback.sts_tasks)}


#: What a fit-end export records of the run, by the module family's ``export_type``: (run facts, SAE figures).
FIT_RECORDS = {SENTENCE_TRANSFORMERS: encoder_record, SAE: sae_record}
