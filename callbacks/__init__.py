"""Callbacks. They reach a module only through ``encode`` / ``encoder`` (see docs/design.md)."""

from callbacks.export import ExportOnFitEnd
from callbacks.interpret import InterpretSAE
from callbacks.mteb import MTEBEvaluator
from callbacks.sts import STSEvaluator
from callbacks.throughput import Throughput
from callbacks.wandb_summary import WandbSummaries

__all__ = ["ExportOnFitEnd", "InterpretSAE", "MTEBEvaluator", "STSEvaluator", "Throughput", "WandbSummaries"]

#: Names that older recipes used, with what replaced them: a config naming one gets an error saying so.
RENAMED = {"SAEReport": "callbacks.ExportOnFitEnd (it exports SAEs too, with sae_metrics.json)"}


def __getattr__(name: str):
    if name in RENAMED:
        raise AttributeError(f"callbacks.{name} is gone: use {RENAMED[name]}")
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
