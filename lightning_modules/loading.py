"""Rebuild a trained LightningModule from its checkpoint, whatever module wrote it.

Used by ``export`` and ``evaluate`` alike; it imports neither, so both can import it. The file is read by
:func:`~lightning_modules.checkpoints.read_checkpoint`, the one reader of checkpoints.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytorch_lightning as pl

from lightning_modules.checkpoints import Checkpoint, read_checkpoint


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` is a file to load as a checkpoint: named ``*.ckpt``, or a zip archive (what ``torch.save``
    writes) whatever its name, e.g. a checkpoint renamed ``model`` or ``model.pt``."""
    path = Path(path)
    return path.is_file() and (path.suffix == ".ckpt" or zipfile.is_zipfile(path))


def load_module(ckpt_path: str | Path) -> pl.LightningModule:
    """Rebuild a trained module from a checkpoint, on CPU, without its training-speed switches (an unreadable file
    is an error naming it: :func:`~lightning_modules.checkpoints.read_checkpoint`)."""
    return read_checkpoint(ckpt_path).module()


def best_or_current(trainer: pl.Trainer, pl_module: pl.LightningModule
                    ) -> tuple[pl.LightningModule, Checkpoint | None]:
    """The module of the trainer's best checkpoint, or ``pl_module`` itself when no checkpoint was kept; and that
    checkpoint, read once (None when none): what the end-of-fit export callbacks export and describe."""
    path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not path:
        return pl_module, None
    checkpoint = read_checkpoint(path)
    return checkpoint.module(), checkpoint
