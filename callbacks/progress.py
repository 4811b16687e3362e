"""Progress bars that show the training metrics without a host sync per step.

``self.log(..., prog_bar=True)`` makes Lightning turn the value into a Python number at every batch end, even with
the bar off, and the bar reads those numbers several times a step: on a GPU each is a host sync that stops the CPU
from queueing the next step while this one runs. Here the modules log without ``prog_bar`` and the bar reads the
metrics it shows (``show``) from ``trainer.callback_metrics`` once every ``log_every_n_steps`` steps, when the
loggers read them anyway, and shows the same numbers in between. It also redraws at most every ``redraw_seconds``
during training rather than at every step: each redraw writes to the terminal, which W&B copies into the run's
console log, and that cost 5-10 % of a tiny model's steps on 2 CPU cores (``benchmarks/periodic_work.py``).
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

#: The metrics the bar shows when a run logs them.
SHOWN = ("train/loss", "train/sentences_per_sec", "sae/fvu", "sae/l0")


class PeriodicMetrics:
    """Mixin for a Lightning progress bar: :data:`SHOWN` metrics read on the steps the loggers write (every
    ``log_every_n_steps``) and outside training, once a step at most, not at every refresh; training batches redraw
    the bar at most every :attr:`redraw_seconds`, and always at the last batch of an epoch or of the run."""

    show: tuple[str, ...] = SHOWN
    redraw_seconds: float = 0.5
    _read_at: int | None = None
    _values: dict[str, float] = {}
    _drawn_at: float = -float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer._logger_connector.should_update_logs:  # the loggers' steps (Lightning's own test): read the values
            self._read(trainer)                             # whether or not this step redraws
        now = time.monotonic()
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.should_stop \
            or 0 < trainer.max_steps <= trainer.global_step
        # the time limit opens only on batches Lightning's bar draws at all (tqdm's: every ``refresh_rate``-th; Rich
        # draws every batch), or the two limits would stack
        draws = getattr(self, "_should_update", None)
        due = now - self._drawn_at >= self.redraw_seconds and (
            draws is None or draws(batch_idx + 1, trainer.num_training_batches))
        if last or due:  # a bar sets its position absolutely: nothing lost
            self._drawn_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if not trainer.training or self._read_at is None:  # outside training, and before the first logging step
            self._read(trainer)
        return {**items, **self._values}

    def _read(self, trainer: pl.Trainer) -> None:
        """Turn the shown metrics into Python numbers (a host sync each on a GPU), at most once a step."""
        if self._read_at != trainer.global_step:
            metrics = trainer.callback_metrics
            self._values = {name.rpartition("/")[2]: float(metrics[name]) for name in self.show if name in metrics}
            self._read_at = trainer.global_step


class RichMetricsBar(PeriodicMetrics, RichProgressBar):
    """Lightning's Rich progress bar with :class:`PeriodicMetrics`."""


class TQDMMetricsBar(PeriodicMetrics, TQDMProgressBar):
    """Lightning's tqdm progress bar with :class:`PeriodicMetrics`."""
