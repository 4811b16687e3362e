"""What every benchmark script shares: its command line's ``--threads`` option and writing its JSON result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_threads(ap: argparse.ArgumentParser, default: int = 0) -> None:
    """``--threads N``: torch's intra-op threads for the run (0 keeps torch's default); :func:`parse` applies it."""
    ap.add_argument("--threads", type=int, default=default, help="torch threads; 0 keeps torch's default")


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads`` (when the script has it and it is not 0)."""
    args = ap.parse_args()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return args


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
