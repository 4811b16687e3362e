"""Datamodules: text in, token ids out. They know a model only through the tokenizer handed to ``connect``."""

from datamodules.base import DataError, TextDataModule
from datamodules.nli import NLIDataModule
from datamodules.sentences import SentencesDataModule
from datamodules.sts import STS_TASKS, STSDataModule, STSPairs, load_sts

__all__ = [
    "DataError",
    "TextDataModule",
    "NLIDataModule",
    "SentencesDataModule",
    "STSDataModule",
    "STSPairs",
    "STS_TASKS",
    "load_sts",
]
