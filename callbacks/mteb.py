"""MTEB evaluation of the module being trained: any MTEB tasks by name, every N steps and at the end."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from callbacks.run_results import run_folder
from evaluation.mteb_eval import LOCAL_STS, encoder, evaluate_tasks, load_tasks

__all__ = ["LOCAL_STS", "MTEBEvaluator", "module_encoder"]

log = logging.getLogger(__name__)


def module_encoder(module: pl.LightningModule, batch_size: int, name: str, revision: str,
                   prompts: dict[str, str] | None = None):
    """MTEB's encoder interface over ``module.encode(list[str]) -> (N, D)`` (:func:`evaluation.mteb_eval.
    encoder`; ``prompts`` as there)."""
    return encoder(lambda texts: module.encode(texts, batch_size=batch_size), name, revision, prompts)


class MTEBEvaluator(pl.Callback):
    """Logs ``mteb/<task>`` (MTEB's main score x 100) every ``every_n_steps`` steps and when training ends.

    Only global rank 0 evaluates; the scores are broadcast to every rank (``trainer.strategy.broadcast``), so
    every rank holds the same value in ``trainer.callback_metrics`` and ``ModelCheckpoint(monitor=
    "mteb/STSBenchmark")`` or ``EarlyStopping`` work under DDP. MTEB's result cache is never read
    (``overwrite_strategy="always"``): a cached result for the same model name would be returned instead of the
    current weights' score (docs/pitfalls.md #6). Each task's ``TaskResult`` is written, as ``mteb.evaluate`` writes it,
    under ``results_dir`` (a ``ResultCache`` folder: ``<run folder>/mteb`` by default, model name
    ``embedlab/<module class>``, revision ``step<N>``); ``ExportOnFitEnd`` builds the card's model-index from those
    of the exported step. Each evaluation also goes to W&B as a table ``mteb/results`` (step, task,
    split, subset, main score, every score as JSON) when a WandbLogger is attached.

    Offline, the STS tasks of :data:`LOCAL_STS` take their pairs from ``data_root`` and keep their official
    names (``task.dataset`` is set and ``task.data_loaded = True``), in MTEB's text form (``text="mteb"`` in
    datamodules/sts.py); ``local_data`` maps any MTEB STS task to a local task or a TSV.

    Args:
        tasks: MTEB task names, e.g. ``["STSBenchmark", "SICK-R"]``.
        every_n_steps: evaluation period in optimiser steps; 0: only at the end.
        at_end: also evaluate when training ends (skipped if the last step was just evaluated).
        data_root: folder with the local STS copies; None loads every task from the hub.
        local_data: MTEB task name -> local task (``stsb``, ``sickr``, ...) or TSV path (sentence1, sentence2,
            score); overrides :data:`LOCAL_STS`.
        eval_splits: splits to score instead of each task's official ones (e.g. ``["validation"]`` to select
            checkpoints on STS-B dev); None keeps MTEB's.
        batch_size: sentences per encoding batch.
        prompts: text put before the inputs, keyed as MTEB keys prompts (``query`` / ``document``, a task name or
            type; see :func:`evaluation.mteb_eval.encoder`), e.g. ``{"query": "query: ", "document":
            "passage: "}`` for a model trained with e5's prefixes.
        results_dir: the ``ResultCache`` folder the TaskResults go to; default ``<run folder>/mteb`` during
            ``fit``; '' keeps none.
    """

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int = 0,
        at_end: bool = True,
        data_root: str | None = None,
        local_data: dict[str, str] | None = None,
        eval_splits: list[str] | None = None,
        batch_size: int = 128,
        prompts: dict[str, str] | None = None,
        results_dir: str | None = None,
    ) -> None:
        if not tasks:
            raise ValueError(f"MTEBEvaluator needs at least one task, e.g. {list(LOCAL_STS)}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.task_names = list(tasks)
        self.every_n_steps, self.at_end, self.batch_size = every_n_steps, at_end, batch_size
        self.data_root, self.eval_splits = data_root, eval_splits
        self.local_data = dict(local_data or {})
        self.prompts = dict(prompts or {})
        self.results_dir = results_dir
        self._tasks: list | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------------------- tasks
    def load_tasks(self) -> list:
        """MTEB task objects, data loaded once (:func:`evaluation.mteb_eval.load_tasks`)."""
        if self._tasks is None:
            self._tasks = load_tasks(self.task_names, self.data_root, self.local_data, self.eval_splits)
        return self._tasks

    # ---------------------------------------------------------------------------------------- evaluation
    def run(self, pl_module: pl.LightningModule, step: int = 0) -> tuple[dict[str, float], list[list[Any]]]:
        """Evaluate ``pl_module`` now: (``{"mteb/<task>": main score x 100}``, W&B table rows)."""
        model = module_encoder(pl_module, self.batch_size, self.model_name(pl_module), f"step{step}", self.prompts)
        task_results = evaluate_tasks(model, self.load_tasks(), self.results_dir or None, self.batch_size)
        scores, rows = {}, []
        for task_result in task_results:
            scores[f"mteb/{task_result.task_name}"] = float(task_result.get_score()) * 100
            for split, per_subset in task_result.scores.items():
                for s in per_subset:
                    rows.append(
                        [
                            step,
                            task_result.task_name,
                            split,
                            s["hf_subset"],
                            float(s["main_score"]) * 100,
                            json.dumps({k: v for k, v in s.items() if k not in ("hf_subset", "languages")}),
                        ]
                    )
        return scores, rows

    def evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Rank 0 evaluates, every rank receives the scores; they go to ``trainer.callback_metrics`` on every
        rank (what ModelCheckpoint / EarlyStopping read) and to the loggers at this step.

        The loggers are written directly rather than through ``self.log``: ``self.log`` is not allowed in
        ``on_train_end``, and inside a batch it reaches the loggers only on ``log_every_n_steps`` boundaries.
        """
        payload: tuple = ("ok", {}, [])
        if trainer.is_global_zero:
            try:
                payload = ("ok", *self.run(pl_module, trainer.global_step))
            except Exception as err:  # every rank must reach the broadcast, then all raise together
                payload = ("error", f"{type(err).__name__}: {err}", [])
        status, scores, rows = trainer.strategy.broadcast(payload, src=0)
        if status == "error":
            raise RuntimeError(f"MTEB evaluation failed on rank 0: {scores}")
        self.history.append((trainer.global_step, scores))
        for key, value in scores.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)
            self._log_table(trainer, rows)
        return scores

    @staticmethod
    def _log_table(trainer: pl.Trainer, rows: list[list[Any]]) -> None:
        columns = ["step", "task", "split", "subset", "main_score", "scores"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="mteb/results", columns=columns, data=rows, step=trainer.global_step)

    def _done(self, trainer: pl.Trainer) -> bool:
        return bool(self.history) and self.history[-1][0] == trainer.global_step

    @staticmethod
    def model_name(pl_module: pl.LightningModule) -> str:
        """The model name the results are stored under (with revision ``step<N>``)."""
        return f"embedlab/{type(pl_module).__name__}"

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # fail on a bad task name or missing data before training starts, on every rank (none left waiting)
        if stage != "fit":
            return
        failure = None
        if trainer.is_global_zero:
            try:
                self.load_tasks()
            except Exception as err:
                failure = err
        message = trainer.strategy.broadcast(
            None if failure is None else f"{type(failure).__name__}: {failure}"
        )
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"MTEBEvaluator could not load its tasks on rank 0: {message}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank, once the checkpoint folder is known (trainer.log_dir is a broadcast under DDP)
        if self.results_dir is None:
            self.results_dir = str(run_folder(trainer) / "mteb")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not self._done(trainer):
            self.evaluate_and_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and not self._done(trainer):
            self.evaluate_and_log(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
