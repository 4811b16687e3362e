"""Fast STS metric during training: Spearman of cosine similarity on a dev split, every N steps."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from core.errors import DataError
from core.metrics import SentenceIndex
from datamodules.sts import STSPairs, load_sts


def metric_name(task: str) -> str:
    """What :class:`STSEvaluator` logs for ``task``: ``val/<task>_spearman``, a file's stem standing for its path."""
    name = Path(task).stem if task.endswith((".tsv", ".txt", ".csv")) else task
    return f"val/{name}_spearman"


class STSEvaluator(pl.Callback):
    """Logs ``val/<task>_spearman`` (Spearman x 100) every ``every_n_steps`` optimiser steps.

    Made for checkpoint selection: ``ModelCheckpoint(monitor="val/stsb_spearman", mode="max",
    every_n_train_steps=<every_n_steps>)`` (what ``train.py`` adds when a recipe names no checkpoint). An epoch's end is
    scored too when something reads the score there: with ``every_n_steps: 0``, or when an ``EarlyStopping`` or a
    ``ModelCheckpoint`` without ``every_n_train_steps`` monitors it (or with ``at_epoch_end: true``); otherwise the
    steps' schedule is the whole schedule, as with Lightning's ``val_check_interval``, and an evaluation at an epoch's
    end would cost a training step's worth of encoding that nothing reads. The final weights are scored once at the
    end of training for the curve when the last step was not on the schedule. A ``ModelCheckpoint`` on the metric that
    saves at steps the schedule does not score (``every_n_train_steps`` not a multiple of ``every_n_steps``, or
    ``train_time_interval``) is refused at setup: it would file new weights under an old score. Encoding runs
    without dropout, in length-sorted batches; each distinct sentence is tokenised once (at fit start) and encoded
    once per evaluation. Every rank computes the same number (the dev set is small), so no broadcast is needed.
    A module whose embedding nests smaller ones (``selection_dims``, e.g. a Matryoshka MCR2 head: [32, ..., 256])
    is scored by the mean over those prefixes, so the checkpoint kept is good at every size.

    Args:
        task: an STS task name (``stsb``, ``sickr``, ...) or a TSV path (``sentence1, sentence2, score``).
        split: the split to score (the dev split: never select checkpoints on test).
        data_root: folder with the local STS copies.
        every_n_steps: evaluation period in optimiser steps; 0 evaluates only at epoch ends.
        batch_size: sentences per encoding batch.
        at_start: also evaluate before the first step (the starting point of the curve).
        at_epoch_end: also evaluate at each epoch's end; null (the default): when something reads the score there
            (see above).
    """

    def __init__(self, task: str = "stsb", split: str = "dev", data_root: str | None = None,
                 every_n_steps: int = 250, batch_size: int = 256, at_start: bool = True,
                 at_epoch_end: bool | None = None) -> None:
        if every_n_steps < 0:
            raise ValueError(f"STSEvaluator every_n_steps must be >= 0 (0: at epoch ends only), got {every_n_steps}")
        if every_n_steps == 0 and at_epoch_end is False:
            raise ValueError("STSEvaluator with every_n_steps: 0 and at_epoch_end: false would never evaluate")
        self.task, self.split, self.data_root = task, split, data_root
        self.every_n_steps, self.batch_size, self.at_start = every_n_steps, batch_size, at_start
        self.at_epoch_end = at_epoch_end
        self._at_epoch_end = every_n_steps == 0 or bool(at_epoch_end)  # at fit setup: also the callbacks' needs
        self.pairs: STSPairs | None = None
        self._ids: list[list[int]] | None = None
        self._sentences: SentenceIndex | None = None
        self.history: list[tuple[int, float]] = []

    @property
    def metric_name(self) -> str:
        return metric_name(self.task)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pairs is None:
            self.pairs = load_sts(self.task, self.split, self.data_root)
            if len(set(self.pairs.scores)) < 2:
                raise DataError(f"STSEvaluator task={self.task!r}: every gold score is the same, so Spearman's "
                                "correlation is undefined and cannot select checkpoints")
        if self._ids is None:
            self._sentences = SentenceIndex([self.pairs])
            self._ids = pl_module.encoder.tokenize(self._sentences.sentences)
        if stage == "fit":
            self._at_epoch_end = self._epoch_end_wanted(trainer)

    def _epoch_end_wanted(self, trainer: pl.Trainer) -> bool:
        """Whether epoch ends are scored (see the class docstring); refuses a checkpoint that would read a stale
        score. Reads ``ModelCheckpoint``'s trigger attributes (private, the same from pytorch-lightning 2.5 on: no
        public getter exists)."""
        every_n = self.every_n_steps
        read_at_epoch_end = []  # the callbacks that read the score at epoch ends
        for callback in trainer.callbacks:
            if getattr(callback, "monitor", None) != self.metric_name:
                continue
            if isinstance(callback, EarlyStopping):  # without a validation loop it reads at each epoch's end
                read_at_epoch_end.append(f"EarlyStopping(monitor={self.metric_name!r})")
            elif isinstance(callback, ModelCheckpoint):
                every, interval = callback._every_n_train_steps, callback._train_time_interval
                if interval is not None or (every and (not every_n or every % every_n)):
                    when = (f"train_time_interval={interval}" if interval is not None
                            else f"every_n_train_steps={every}")
                    fix = (f"set its every_n_train_steps to a multiple of {every_n}" if every_n else
                           "drop its every_n_train_steps (it then saves at epoch ends), or give STSEvaluator an "
                           "every_n_steps")
                    raise ValueError(
                        f"ModelCheckpoint(monitor={self.metric_name!r}, {when}) saves at steps STSEvaluator "
                        f"(every_n_steps={every_n}) does not score, filing those weights under an older score: {fix}")
                if not every and callback._every_n_epochs > 0:
                    read_at_epoch_end.append(f"ModelCheckpoint(monitor={self.metric_name!r})")
        if self.at_epoch_end is False and read_at_epoch_end:
            reader = read_at_epoch_end[0]
            other = (f"give the checkpoint every_n_train_steps={every_n}" if reader.startswith("ModelCheckpoint")
                     else "remove the EarlyStopping")
            raise ValueError(f"{reader} reads the score at epoch ends, which STSEvaluator (at_epoch_end: false) does "
                             f"not score: drop at_epoch_end, or {other}")
        return every_n == 0 or bool(self.at_epoch_end) or bool(read_at_epoch_end)

    def evaluate(self, pl_module: pl.LightningModule) -> float:
        """Spearman x 100 of the module's current weights on the configured pairs (the mean over the module's
        ``selection_dims`` prefixes when it has them)."""
        z_ND = pl_module.encode_ids(self._ids, batch_size=self.batch_size)
        return self._sentences.score(z_ND, self.pairs, getattr(pl_module, "selection_dims", None))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch_end: bool) -> None:
        rho = self._record(trainer, pl_module)
        # self.log feeds ModelCheckpoint / EarlyStopping and the progress bar; not the loggers, which Lightning would
        # send the value again at every later logging step of the epoch (it keeps step values until the epoch ends)
        pl_module.log(self.metric_name, rho, prog_bar=True, logger=False, on_step=not epoch_end, on_epoch=epoch_end)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Evaluate, keep the point in ``history`` and log it once, at the number of optimiser steps taken."""
        rho = self.evaluate(pl_module)
        self.history.append((trainer.global_step, rho))
        for logger in trainer.loggers:
            logger.log_metrics({self.metric_name: rho}, step=trainer.global_step)
        return rho

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not self._done_this_step(trainer):
            self._log(trainer, pl_module, epoch_end=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at_epoch_end and not self._done_this_step(trainer):
            self._log(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the end point of the curve (no checkpoint reads it: Lightning saves nothing after training ends)
        if trainer.global_step > 0 and not self._done_this_step(trainer):
            self._record(trainer, pl_module)

    def _done_this_step(self, trainer: pl.Trainer) -> bool:
        return bool(self.history) and self.history[-1][0] == trainer.global_step and trainer.global_step > 0

    def state_dict(self) -> dict:
        # metric and data_root: for the model card of an export from a checkpoint (lightning_modules.model_card)
        root = None if self.data_root is None else str(self.data_root)
        return {"history": self.history, "metric": self.metric_name, "data_root": root}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
