"""What a family of LightningModules answers for itself, so that export, the cards, the run defaults and
``train.py`` ask the module (or its class) instead of testing which class it is.

A family is a LightningModule class that subclasses :class:`ModuleFamily` and fills in its answers:
``EmbeddingModule`` (sentence encoders: ``ContrastiveModule``, ``MCR2Module``) exports a sentence-transformers
folder, ``SAEModule`` an SAE folder. A new family (or a new architecture inside one) answers here, in its own file;
no caller changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from lightning_modules.checkpoints import Checkpoint

#: The export type of a sentence encoder (a sentence-transformers folder; also its W&B artefact type).
SENTENCE_TRANSFORMERS = "sentence-transformers"
#: The export type of a sparse autoencoder (cfg.json + weights; also its W&B artefact type).
SAE = "sae"


def entry_name(entry: Any) -> str:
    """The class name a config entry (its ``class_path``) or an object stands for."""
    return str(getattr(entry, "class_path", "") or type(entry).__name__).rpartition(".")[2]


def family_class(class_path: str) -> type[ModuleFamily] | None:
    """The family a config's ``class_path`` names (a bare class name: one of ``lightning_modules``), without
    building it; None when it names no class that imports, or one that is no family."""
    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_modules"), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, ModuleFamily) else None


class ModuleFamily:
    """The questions every module family answers (class attributes, class methods over its init arguments, and
    methods of a built module).

    Attributes:
        export_type: what its export is (``sentence-transformers``, ``sae``), also the W&B artefact type.
        export_subdir: the run folder's subfolder an end-of-fit export goes to.
        export_marker: the file that marks a folder as one of its exports (an existing one may be replaced).
        export_formats: the formats its export can be written in, the default first; () when there is no choice.
        moved_options: init arguments that moved, old name -> new one (an old recipe is told the new key).
    """

    export_type: ClassVar[str] = SENTENCE_TRANSFORMERS
    export_subdir: ClassVar[str] = "export"
    export_marker: ClassVar[str] = "modules.json"
    export_formats: ClassVar[tuple[str, ...]] = ()
    moved_options: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def run_tags(cls, init_args: Mapping) -> list[str]:
        """W&B tags naming the method, from the init arguments of the config (the class is not built)."""
        return [cls.__name__.removesuffix("Module").lower()]

    @classmethod
    def checkpoint_monitor(cls, init_args: Mapping) -> dict | None:
        """``ModelCheckpoint``'s ``monitor``, ``mode`` and ``filename`` for a run whose recipe names no metric to
        keep the best checkpoint by (no ``STSEvaluator``); None: the last checkpoint only."""
        return None

    def how_to_load(self, folder: str | Path) -> str:
        """The call that opens this module's export at ``folder`` (printed after exporting)."""
        raise NotImplementedError

    def write_export(self, output_dir: str | Path, overwrite: bool = False, format: str | None = None,
                     card: dict | None = None) -> Path:
        """Write the export into ``output_dir`` (``format``: one of :attr:`export_formats`; ``card``: what its
        README.md says of the run, as :meth:`card_record` gives it) and return the folder. Writes only: nothing is
        measured here."""
        raise NotImplementedError

    def card_record(self, checkpoint: Checkpoint) -> dict:
        """What the export's card says of the run, as far as ``checkpoint`` (this module's) records it."""
        raise NotImplementedError
