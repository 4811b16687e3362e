"""Rebuild a trained LightningModule from its checkpoint, whatever module wrote it.

Used by ``export`` and ``evaluate`` alike; it imports neither, so both can import it.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from lightning_modules.base import CLASS_PATH_KEY, EmbeddingModule
from lightning_modules.components.errors import DataError


def module_class_from_checkpoint(ckpt_path: str | Path) -> type[EmbeddingModule]:
    """The LightningModule class a checkpoint was written by (``RecordsClassPath``; LightningCLI's ``_class_path``)."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # a text file, a truncated download, a pickle of something else: torch's errors vary
        raise DataError(f"{ckpt_path}: not a readable Lightning checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict in it)")
    class_path = ckpt.get(CLASS_PATH_KEY) or ckpt.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise ValueError(f"{ckpt_path}: the checkpoint does not say which LightningModule wrote it (written by "
                         "another framework?); load it with YourModule.load_from_checkpoint instead")
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


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
    cls = module_class_from_checkpoint(path)
    accepted = inspect.signature(cls.__init__).parameters
    overrides = {k: v for k, v in INFERENCE_OVERRIDES.items() if k in accepted}
    upgrade = getattr(cls, "upgrade_hparams", None)  # options an older version of the module kept elsewhere
    if upgrade is not None:
        recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
        overrides.update(upgrade(recorded))
    return cls.load_from_checkpoint(path, map_location="cpu", **overrides)
