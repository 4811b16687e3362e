"""sentence-transformers' module classes (Transformer, Pooling, Dense, Normalize, ...) across its versions.

sentence-transformers 6 moved them to ``sentence_transformers.sentence_transformer.modules`` and renamed the
Transformer's ``config_args`` to ``config_kwargs``; 5.x (5.2 is the floor in pyproject.toml, the first 5.x that
allows transformers 5) has them in ``sentence_transformers.models``. Either version loads a folder the other wrote
(modules.json names the class path; 6.x maps the old paths). Imported when used: sentence-transformers takes ~3 s.
"""

from __future__ import annotations

import inspect
from types import ModuleType


def st_modules() -> ModuleType:
    """The module that holds sentence-transformers' module classes in the installed version."""
    try:
        from sentence_transformers.sentence_transformer import modules  # >= 6
    except ImportError:
        from sentence_transformers import models as modules  # 5.x
    return modules


def transformer(path: str, max_seq_length: int, config_kwargs: dict | None = None):
    """``Transformer(path, max_seq_length, config_kwargs)``, the config keyword as the installed version names it."""
    cls = st_modules().Transformer
    key = "config_kwargs" if "config_kwargs" in inspect.signature(cls.__init__).parameters else "config_args"
    return cls(path, max_seq_length=max_seq_length, **({key: config_kwargs} if config_kwargs else {}))
