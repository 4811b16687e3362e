"""Datamodules: text in, token ids out. They know a model only through the tokenizer handed to ``connect``."""

from core.errors import DataError
from datamodules.activation_cache import ActivationCache
from datamodules.activations import ActivationsDataModule
from datamodules.base import TextDataModule
from datamodules.brown import UNIVERSAL_TAGS, read_brown
from datamodules.groups import GroupedTextDataModule, kmeans_groups
from datamodules.nli import NLIDataModule
from datamodules.sentences import SentencesDataModule
from datamodules.sts import STS_TASKS, STSDataModule, STSPairs, load_sts
from datamodules.wic import WiCDataModule, WiCPair, load_wic, read_wic

__all__ = [
    "ActivationCache",
    "ActivationsDataModule",
    "UNIVERSAL_TAGS",
    "read_brown",
    "DataError",
    "TextDataModule",
    "GroupedTextDataModule",
    "kmeans_groups",
    "NLIDataModule",
    "SentencesDataModule",
    "STSDataModule",
    "STSPairs",
    "STS_TASKS",
    "load_sts",
    "WiCDataModule",
    "WiCPair",
    "load_wic",
    "read_wic",
]
