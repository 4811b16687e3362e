"""Progress bars that show the training metrics without a host sync per step.

``self.log(..., prog_bar=True)`` makes Lightning turn the value into a Python number at every batch end, even with
the bar off, and the bar reads those numbers several times a step: on a GPU each is a host sync that stops the CPU
from queueing the next step while this one runs. Here the modules log without ``prog_bar`` and the bar reads the
metrics it shows (``show``) from ``trainer.callback_metrics`` once every ``log_every_n_steps`` steps, when the
loggers read them anyway, and shows the same numbers in between.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

#: The metrics the bar shows when a run logs them.
SHOWN = ("train/loss", "train/sentences_per_sec", "sae/fvu", "sae/l0")


class PeriodicMetrics:
    """Mixin for a Lightning progress bar: :data:`SHOWN` metrics read on the steps the loggers write (every
    ``log_every_n_steps``) and outside training, once a step at most, not at every refresh."""

    show: tuple[str, ...] = SHOWN
    _read_at: int | None = None
    _values: dict[str, float] = {}

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        step = trainer.global_step
        # the loggers' steps (Lightning's own test), when they convert the values anyway; outside training, always
        if (not trainer.training or self._read_at is None or trainer._logger_connector.should_update_logs) \
                and self._read_at != step:
            metrics = trainer.callback_metrics
            self._values = {name.rpartition("/")[2]: float(metrics[name]) for name in self.show if name in metrics}
            self._read_at = step
        return {**items, **self._values}


class RichMetricsBar(PeriodicMetrics, RichProgressBar):
    """Lightning's Rich progress bar with :class:`PeriodicMetrics`."""


class TQDMMetricsBar(PeriodicMetrics, TQDMProgressBar):
    """Lightning's tqdm progress bar with :class:`PeriodicMetrics`."""
