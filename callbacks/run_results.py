"""The results a fit ends with, kept where runs are compared: ``eval.json`` beside the run, and on every W&B logger
an evaluation table, ``eval/...`` summary values, and the best checkpoint and the export as artefacts.

:class:`callbacks.ExportOnFitEnd` calls these on rank 0, once, when its export exists. The numbers are the ones the
export's caller measured for its model card (the STS test sets, :func:`evaluation.evaluate.measure_sts`), else the
dev metric the run logged for the exported weights, else (an SAE) the figures of its ``sae_metrics.json``: nothing
is scored twice, and the table, the summaries, ``eval.json`` and the card agree.

Artefacts leave the files where they are (a checkpoint can be GBs). The export is added with
``policy="immutable"``: wandb makes no staging copy and uploads the folder from its place when the run is online or
synced (``wandb sync``), so the model can be downloaded from W&B. The checkpoint (optimiser state included, needed
only where training runs) is a ``file://`` reference: the artefact records its path, size and MD5, and nothing is
uploaded. An offline run keeps both records in its ``.wandb`` file, with absolute paths; the files must stay there
until the run is synced (a resumed run exports again into the same folder, replacing the files of the first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from core.files import write_atomic
from lightning_modules.checkpoints import read_checkpoint

#: The file beside the run (the folder that holds its checkpoints) with what the exported weights score.
EVAL_FILE = "eval.json"
#: The W&B key of the evaluation table, and its columns.
TABLE_KEY = "eval/sts"
COLUMNS = ["task", "split", "spearman", "n_pairs", "checkpoint_step"]


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def checkpoint_step(ckpt: str | None, default: int) -> int:
    """The optimiser steps a checkpoint was written at (:attr:`Checkpoint.step`), ``default`` without one."""
    return read_checkpoint(ckpt).step if ckpt else default


def _finite(value):
    """A number as JSON takes it: NaN and infinities become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sts_rows(facts: dict, evaluators: Sequence[pl.Callback]) -> list[dict]:
    """The evaluation table as rows (:data:`COLUMNS`): the STS test sets the export measured, else the STS dev
    metric the run logged for the exported weights (``facts["dev_metric"]``, a ``val/<task>_spearman``), else none.

    Args:
        facts: the model card's run facts after the export (``callbacks.export.fit_facts``, with ``sts`` filled in
            when the test sets were measured).
        evaluators: the run's callbacks; an ``STSEvaluator`` logging the dev metric gives its split and pair count.
    """
    step = facts.get("step")
    measured = (facts.get("sts") or {}).get("tasks") or {}
    if measured:
        return [{"task": task, "split": "test", "spearman": _finite(float(s["spearman"])), "n_pairs": int(s["n_pairs"]),
                 "checkpoint_step": step} for task, s in measured.items()]
    dev = facts.get("dev_metric")
    if not dev or not str(dev.get("name", "")).endswith("_spearman"):
        return []
    source = next((cb for cb in evaluators if getattr(cb, "metric_name", None) == dev["name"]), None)
    pairs = getattr(source, "pairs", None)
    return [{"task": dev["name"].removeprefix("val/").removesuffix("_spearman"),
             "split": getattr(source, "split", None) or "dev", "spearman": _finite(float(dev["value"])),
             "n_pairs": len(pairs.scores) if pairs is not None else None,
             "checkpoint_step": dev.get("step", step)}]


def summary_key(row: dict) -> str:
    """``eval/<task>_spearman`` for a test set, ``eval/<split>/<task>_spearman`` otherwise (a dev score never takes
    the name of a test score, so runs compare like with like)."""
    split = "" if row["split"] == "test" else f"{row['split']}/"
    return f"eval/{split}{row['task']}_spearman"


def sae_summary(metrics: dict) -> dict:
    """``sae_metrics.json``'s figures as ``eval/<name>`` summary values (numbers only; not the run's step count)."""
    return {f"eval/{k}": _finite(float(v) if isinstance(v, float) else v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "global_step"}


def evaluation(ckpt: str | None, step: int, facts: dict | None = None, sae_metrics: dict | None = None,
               evaluators: Sequence[pl.Callback] = ()) -> dict:
    """What the exported weights score, as written to ``eval.json``: the checkpoint and its step, where the numbers
    come from, the table's rows and the summary values.

    Args:
        ckpt: the exported checkpoint ("" or None: the final weights).
        step: its optimiser steps.
        facts: an encoder's run facts after the export (see :func:`sts_rows`).
        sae_metrics: an SAE's ``sae_metrics.json`` figures.
        evaluators: the run's callbacks.
    """
    rows = sts_rows(facts, evaluators) if facts is not None else []
    summary = {summary_key(row): row["spearman"] for row in rows} if facts is not None else sae_summary(
        sae_metrics or {})
    summary["eval/checkpoint_step"] = step
    sts = (facts or {}).get("sts") or {}
    source = ("STS test sets, measured at export" if sts.get("tasks") else "the dev metric logged for these weights"
              if rows else "sae_metrics.json" if sae_metrics is not None else "nothing measured")
    record = {"checkpoint": ckpt or None, "checkpoint_step": step, "source": source, "columns": COLUMNS,
              "rows": rows, "summary": summary}
    if sts:
        record.update(data_root=sts.get("data_root"), missing=sts.get("missing") or [])
    return record


def write_evaluation(run_dir: Path, record: dict) -> Path:
    """Write ``record`` to ``<run_dir>/eval.json`` atomically and return the path."""
    path = Path(run_dir) / EVAL_FILE
    write_atomic(path, json.dumps(record, indent=1, allow_nan=False))
    return path


def log_evaluation(loggers: list[WandbLogger], record: dict, step: int) -> None:
    """Log the table (at ``step``, the run's last) and set the summary values on each W&B run."""
    for logger in loggers:
        if record["rows"]:
            logger.log_table(TABLE_KEY, columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in record["rows"]],
                             step=step)
        logger.experiment.summary.update(record["summary"])


def checkpoint_metadata(trainer: pl.Trainer, ckpt: str | None, step: int) -> dict:
    """The metadata of both artefacts: the checkpoint's step, the run's, and the metric it was kept by."""
    meta = {"step": step, "run_steps": trainer.global_step, "checkpoint": str(Path(ckpt).resolve()) if ckpt else None}
    callback = trainer.checkpoint_callback
    if ckpt and callback is not None and getattr(callback, "monitor", None):
        score = callback.best_model_score
        meta.update(monitor=callback.monitor, mode=callback.mode,
                    score=_finite(float(score)) if score is not None else None)
    return meta


def log_artifacts(loggers: list[WandbLogger], ckpt: str | None, export_dir: Path, export_type: str,
                  metadata: dict, export_metadata: dict | None = None) -> None:
    """Log the checkpoint (type ``model``, a reference, aliased ``best`` when a metric chose it) and the export
    folder (type ``export_type``, uploaded from where it is) to each W&B run; see the module docstring.

    Args:
        loggers: the W&B loggers. One created with ``log_model`` gets no checkpoint artefact from here (Lightning
            logs its checkpoints itself, under the same ``model-<run id>`` name).
        ckpt: the exported checkpoint ("" or None: none was kept, so only the export is logged).
        export_dir: the export folder.
        export_type: the export's artefact type (``sentence-transformers``, ``sae``).
        metadata: both artefacts' metadata (:func:`checkpoint_metadata`).
        export_metadata: added to the export's.
    """
    # imported when used: wandb (~1 s to import) only where a W&B logger is on
    import wandb

    folder = Path(export_dir).resolve()  # the offline record keeps the path as given: absolute, for `wandb sync`
    for logger in loggers:
        run = logger.experiment
        if ckpt and not getattr(logger, "_log_model", False):
            model = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
            model.add_reference(Path(ckpt).resolve().as_uri(), name=Path(ckpt).name)
            run.log_artifact(model, aliases=["best"] if "monitor" in metadata else None)
        export = wandb.Artifact(f"export-{run.id}", type=export_type, metadata={**metadata, **(export_metadata or {})})
        export.add_dir(str(folder), policy="immutable")
        run.log_artifact(export)


def run_folder(trainer: pl.Trainer) -> Path:
    """The folder of this run: the one that holds its checkpoint folder (``<save_dir>/<name>/<version>`` by
    default; the same folder when the run is resumed), else the trainer's log folder."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)
