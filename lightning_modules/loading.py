"""Rebuild a trained LightningModule from its checkpoint, whatever module wrote it.

Used by ``export`` and ``evaluate`` alike; it imports neither, so both can import it.
"""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path

import torch

from core.errors import DataError
from lightning_modules.base import EmbeddingModule
from lightning_modules.checkpoints import checkpoint_class, recorded_hparams


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` is a file to load as a checkpoint: named ``*.ckpt``, or a zip archive (what ``torch.save``
    writes) whatever its name, e.g. a checkpoint renamed ``model`` or ``model.pt``."""
    path = Path(path)
    return path.is_file() and (path.suffix == ".ckpt" or zipfile.is_zipfile(path))


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A Lightning checkpoint, memory-mapped (tensors are read only when used); an unreadable file or one that is
    not a Lightning checkpoint is an error naming it."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a text file, a truncated download, a pickle of something else: torch's errors vary
        raise DataError(f"{ckpt_path}: not a readable Lightning checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict in it)")
    return ckpt


def module_class_from_checkpoint(ckpt_path: str | Path, ckpt: dict | None = None) -> type[EmbeddingModule]:
    """The LightningModule class a checkpoint was written by (``RecordsClassPath``; LightningCLI's ``_class_path``)."""
    cls = checkpoint_class(read_checkpoint(ckpt_path) if ckpt is None else ckpt)
    if cls is None:
        raise ValueError(f"{ckpt_path}: the checkpoint does not say which LightningModule wrote it (written by "
                         "another framework?); load it with YourModule.load_from_checkpoint instead")
    return cls


#: Training-speed switches turned off when a checkpoint is rebuilt for export or evaluation (a run compiled on a
#: GPU must not spend minutes compiling on the CPU that exports it).
INFERENCE_OVERRIDES = {"compile": False, "gradient_checkpointing": False}


def load_module(ckpt_path: str | Path) -> EmbeddingModule:
    """Rebuild a trained module from a checkpoint, on CPU, without its training-speed switches (an unreadable file
    is an error naming it: :func:`module_class_from_checkpoint`)."""
    path = Path(ckpt_path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder; give the .ckpt file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    ckpt = read_checkpoint(path)
    cls = module_class_from_checkpoint(path, ckpt)
    accepted = inspect.signature(cls.__init__).parameters
    overrides = {k: v for k, v in INFERENCE_OVERRIDES.items() if k in accepted}
    recorded = recorded_hparams(ckpt)  # options an older version of the module kept elsewhere, where it takes them
    before = ckpt.get("hyper_parameters") or {}
    overrides.update({k: v for k, v in recorded.items() if k in accepted and k not in before})
    return cls.load_from_checkpoint(path, map_location="cpu", **overrides)


