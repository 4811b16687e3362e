"""MTEB evaluation of the module being trained: any MTEB tasks by name, every N steps and at the end."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from datamodules.sts import SICK_FILES, STSPairs, concat_pairs, load_sts

log = logging.getLogger(__name__)

#: MTEB task -> the local STS task whose files hold the same pairs (see datamodules/sts.py for the layouts).
#: MTEB's SICK-R is the train, trial and test files together (9,927 pairs), hence all three here.
LOCAL_STS = {
    "STS12": "sts12",
    "STS13": "sts13",
    "STS14": "sts14",
    "STS15": "sts15",
    "STS16": "sts16",
    "STSBenchmark": "stsb",
    "SICK-R": "sickr",
}
#: MTEB split names -> ours.
SPLIT_NAMES = {"validation": "dev"}


def _local_pairs(source: str, split: str, data_root: str | None) -> STSPairs:
    """One MTEB split's pairs from local files (a local task name or a TSV path), in MTEB's text form."""
    if source == "sickr" and split == "test":
        parts = [load_sts("sickr", s, data_root, hub=False, text="mteb") for s in SICK_FILES]
        return concat_pairs("sickr", parts)
    return load_sts(source, SPLIT_NAMES.get(split, split), data_root, hub=False, text="mteb")


def _get_task(name: str, eval_splits: Sequence[str] | None):
    # imported when used: mteb takes ~4 s to import; only MTEB evaluation needs it
    import mteb

    try:
        return mteb.get_task(name, eval_splits=list(eval_splits) if eval_splits else None)
    except KeyError:
        known = sorted(t.metadata.name for t in mteb.get_tasks())
        close = difflib.get_close_matches(name, known, n=5)
        raise ValueError(
            f"unknown MTEB task {name!r}"
            f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} Tasks with local data "
            f"offline (data_root): {', '.join(LOCAL_STS)}. All {len(known)} MTEB names: "
            "[t.metadata.name for t in mteb.get_tasks()]"
        ) from None


def module_encoder(module: pl.LightningModule, batch_size: int, name: str, revision: str):
    """MTEB's encoder interface over ``module.encode(list[str]) -> (N, D)`` (docs/pitfalls.md #6).

    A subclass of ``mteb.models.abs_encoder.AbsEncoder`` (which supplies the similarity functions from
    ``mteb_model_meta``: cosine here), built here so that importing this file does not import mteb.
    """
    # imported when used: mteb takes ~4 s to import; only MTEB evaluation needs it
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction

    class ModuleEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.model = module
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites={
                    "name": name,
                    "revision": revision,
                    "similarity_fn_name": ScoringFunction.COSINE,
                    "framework": ["PyTorch"],
                }
            )

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [text for batch in inputs for text in batch["text"]]
            return module.encode(texts, batch_size=batch_size).float().numpy()

    return ModuleEncoder()


class MTEBEvaluator(pl.Callback):
    """Logs ``mteb/<task>`` (MTEB's main score x 100) every ``every_n_steps`` steps and when training ends.

    Only global rank 0 evaluates; the scores are broadcast to every rank (``trainer.strategy.broadcast``), so
    every rank holds the same value in ``trainer.callback_metrics`` and ``ModelCheckpoint(monitor=
    "mteb/STSBenchmark")`` or ``EarlyStopping`` work under DDP. MTEB's result cache is never used
    (``cache=None``): a cached result for the same model name would be returned instead of the current
    weights' score (docs/pitfalls.md #6). Each evaluation also goes to W&B as a table ``mteb/results`` (step, task,
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
    ) -> None:
        if not tasks:
            raise ValueError(f"MTEBEvaluator needs at least one task, e.g. {list(LOCAL_STS)}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.task_names = list(tasks)
        self.every_n_steps, self.at_end, self.batch_size = every_n_steps, at_end, batch_size
        self.data_root, self.eval_splits = data_root, eval_splits
        self.local_data = dict(local_data or {})
        self._tasks: list | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------------------- tasks
    def load_tasks(self) -> list:
        """MTEB task objects, data loaded once (local pairs when available, else MTEB's own loader)."""
        if self._tasks is not None:
            return self._tasks
        # imported when used: datasets (~1 s to import): only MTEB tasks given local data need it
        from datasets import Dataset, DatasetDict

        tasks = []
        for name in self.task_names:
            task = _get_task(name, self.eval_splits)
            source = self.local_data.get(name) or (LOCAL_STS.get(name) if self.data_root else None)
            if source is not None:
                if task.metadata.type != "STS":
                    raise ValueError(
                        f"local_data[{name!r}]: only STS tasks take local pairs, {name} is "
                        f"{task.metadata.type}"
                    )
                splits = {}
                for split in task.eval_splits:
                    p = _local_pairs(source, split, self.data_root)
                    splits[split] = Dataset.from_dict(
                        {"sentence1": p.sentences1, "sentence2": p.sentences2, "score": p.scores}
                    )
                task.dataset = DatasetDict(splits)
                task.data_loaded = True
            else:
                task.load_data()  # once: evaluate() does not unload data it did not load itself
            tasks.append(task)
        self._tasks = tasks
        return tasks

    # ---------------------------------------------------------------------------------------- evaluation
    def run(self, pl_module: pl.LightningModule, step: int = 0) -> tuple[dict[str, float], list[list[Any]]]:
        """Evaluate ``pl_module`` now: (``{"mteb/<task>": main score x 100}``, W&B table rows)."""
        # imported when used: mteb takes ~4 s to import; only MTEB evaluation needs it
        import mteb

        model = module_encoder(
            pl_module, self.batch_size, f"embedlab/{type(pl_module).__name__}", f"step{step}"
        )
        result = mteb.evaluate(
            model,
            self.load_tasks(),
            cache=None,
            overwrite_strategy="always",
            encode_kwargs={"batch_size": self.batch_size},
            show_progress_bar=False,
            co2_tracker=False,
        )
        scores, rows = {}, []
        for task_result in result.task_results:
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
