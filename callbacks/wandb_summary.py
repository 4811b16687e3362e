"""W&B summaries that compare runs by the value their checkpoint was chosen on, not by the last one logged."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from callbacks.run_results import checkpoint_step, wandb_loggers


class WandbSummaries(pl.Callback):
    """For every metric a ``ModelCheckpoint`` monitors: ``define_metric`` with a ``max`` / ``min`` summary when fit
    starts (the dashboard's run table then shows the best value, not the last), and at fit end
    ``best/<metric>`` and ``best/<metric>/step``: the best checkpoint's score and the step it was written at.

    ``train.py fit`` adds it to any run with a W&B logger (``commands.run_defaults``).
    """

    @staticmethod
    def monitored(trainer: pl.Trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for run in (lg.experiment for lg in wandb_loggers(trainer)):
            for ckpt in self.monitored(trainer):
                run.define_metric(ckpt.monitor, summary=ckpt.mode)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        runs = [lg.experiment for lg in wandb_loggers(trainer)]
        for ckpt in self.monitored(trainer) if runs else []:
            if ckpt.best_model_score is None or not ckpt.best_model_path:
                continue
            step = checkpoint_step(ckpt.best_model_path, trainer.global_step)
            for run in runs:
                run.summary[f"best/{ckpt.monitor}"] = float(ckpt.best_model_score)
                run.summary[f"best/{ckpt.monitor}/step"] = int(step)
