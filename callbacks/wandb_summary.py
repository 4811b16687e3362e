"""W&B summaries that compare runs by the value their checkpoint was chosen on, not by the last one logged."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only


def wandb_runs(trainer: pl.Trainer) -> list:
    """The W&B runs of the trainer's loggers (started on first use)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class WandbSummaries(pl.Callback):
    """For every metric a ``ModelCheckpoint`` monitors: ``define_metric`` with a ``max`` / ``min`` summary when fit
    starts (the dashboard's run table then shows the best value, not the last), and at fit end
    ``best/<metric>`` and ``best/<metric>/step``: the best checkpoint's score and the step it was written at.

    ``train.py fit`` adds it to any run with a W&B logger (``callbacks.run_defaults``).
    """

    @staticmethod
    def monitored(trainer: pl.Trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for run in wandb_runs(trainer):
            for ckpt in self.monitored(trainer):
                run.define_metric(ckpt.monitor, summary=ckpt.mode)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        runs = wandb_runs(trainer)
        for ckpt in self.monitored(trainer) if runs else []:
            if ckpt.best_model_score is None or not ckpt.best_model_path:
                continue
            # the step is in the checkpoint itself (mmap: nothing but that scalar is read)
            step = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            for run in runs:
                run.summary[f"best/{ckpt.monitor}"] = float(ckpt.best_model_score)
                run.summary[f"best/{ckpt.monitor}/step"] = int(step)
