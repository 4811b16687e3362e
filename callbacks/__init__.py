"""Callbacks. They reach a module only through ``encode`` / ``encoder`` (see docs/design.md)."""

from callbacks.export import ExportOnFitEnd
from callbacks.interpret import InterpretSAE
from callbacks.mteb import MTEBEvaluator
from callbacks.sts import STSEvaluator
from callbacks.throughput import Throughput

__all__ = ["ExportOnFitEnd", "InterpretSAE", "MTEBEvaluator", "STSEvaluator", "Throughput"]
