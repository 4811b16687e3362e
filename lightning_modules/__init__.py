"""LightningModules and their plain building blocks (components, losses).

The modules are imported on first use (``lightning_modules.ContrastiveModule`` in a config works as before): the
building blocks in ``components`` and ``losses`` are the house's lowest floor, which ``datamodules`` imports, while
the modules stand above ``datamodules``; importing them eagerly here would make importing a component import the
datamodules that import it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_MODULES = {"EmbeddingModule": "base", "ContrastiveModule": "contrastive", "MCR2Module": "mcr2",
            "SAEModule": "sae"}
__all__ = ["EmbeddingModule", "ContrastiveModule", "MCR2Module", "SAEModule"]

if TYPE_CHECKING:
    from lightning_modules.base import EmbeddingModule
    from lightning_modules.contrastive import ContrastiveModule
    from lightning_modules.mcr2 import MCR2Module
    from lightning_modules.sae import SAEModule


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"lightning_modules.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
