"""Training throughput in the progress bar and the loggers."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Logs ``train/sentences_per_sec`` (rows of the batch x world size, per wall-clock second; for an SAE's batch of
    vectors, vectors per second).

    Timed between consecutive batch ends on the host, smoothed with an exponential moving average; no device
    synchronisation is added to the step (on a GPU the measurement settles once the kernel queue is full). Logged
    only on the steps the loggers write (``log_every_n_steps``): logging a Python number copies it to the device.

    Args:
        smoothing: weight of the newest step in the moving average.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self.rate: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            rows = (batch["input_ids"] if isinstance(batch, dict) else batch).shape[0] * trainer.world_size
            rate = rows / max(now - self._last, 1e-9)
            self.rate = rate if self.rate is None else self.smoothing * rate + (1 - self.smoothing) * self.rate
            if trainer._logger_connector.should_update_logs:  # the loggers' steps (Lightning's own test)
                pl_module.log("train/sentences_per_sec", self.rate, on_step=True, on_epoch=False)
        self._last = now
