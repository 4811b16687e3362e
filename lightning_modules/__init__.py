"""LightningModules and their plain building blocks (``components``, ``losses``), checkpoints and export.

``lightning_modules.ContrastiveModule`` and the rest are the names recipes use as ``model.class_path``.
"""

from lightning_modules.base import EmbeddingModule
from lightning_modules.contrastive import ContrastiveModule
from lightning_modules.mcr2 import MCR2Module
from lightning_modules.sae import SAEModule

__all__ = ["EmbeddingModule", "ContrastiveModule", "MCR2Module", "SAEModule"]
