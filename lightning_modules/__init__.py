"""LightningModules and their plain building blocks (components, losses)."""

from lightning_modules.base import EmbeddingModule
from lightning_modules.contrastive import ContrastiveModule

__all__ = ["EmbeddingModule", "ContrastiveModule"]
