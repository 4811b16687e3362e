"""Export the best checkpoint when fitting ends, and say where everything is."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


class WritesAtFitEnd(pl.Callback):
    """Base of the callbacks that, when ``fit`` ends, write a folder from the best checkpoint's weights (else the
    final ones), on rank 0: ``output_dir``, else ``<log_dir>/<subdir>``. Subclasses implement :meth:`write`.

    The folder is resolved in ``setup``, on every rank: under DDP ``trainer.log_dir`` is a broadcast, which hangs
    when only rank 0 calls it (as from a ``rank_zero_only`` ``on_fit_end``).
    """

    subdir = "output"

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._out: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._out = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / self.subdir)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_modules.export import best_or_current

        module, ckpt = best_or_current(trainer, pl_module)
        self.write(trainer, module, ckpt, self._out)

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None, out: Path) -> None:
        """Write ``out`` from ``module`` (loaded from ``ckpt``, or the trained module itself when ``ckpt`` is None)."""
        raise NotImplementedError


class ExportOnFitEnd(WritesAtFitEnd):
    """At the end of ``fit``, export the best checkpoint (else the last weights) as a sentence-transformers folder.

    Prints the checkpoint, the exported folder and the logger locations (W&B run folder and ``wandb sync`` hint
    when offline).

    Args:
        output_dir: target folder; default ``<log_dir>/export``.
    """

    subdir = "export"

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(output_dir)
        self.exported: Path | None = None

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None, out: Path) -> None:
        from lightning_modules.export import export_sentence_transformer

        self.exported = export_sentence_transformer(module, out)
        lines = [f"checkpoint:     {ckpt or '(none saved; exported the final weights)'}",
                 f"exported model: {self.exported}  (SentenceTransformer('{self.exported}'))"]
        for logger in trainer.loggers:
            run = getattr(logger, "experiment", None)
            if type(logger).__name__ == "WandbLogger" and run is not None:
                run_dir = Path(run.dir).parent
                offline = getattr(run.settings, "_offline", False) or getattr(run.settings, "mode", "") == "offline"
                hint = f"  (offline: `wandb sync {run_dir}` uploads it later)" if offline else ""
                lines.append(f"W&B run:        {run_dir}{hint}")
            elif getattr(logger, "log_dir", None):
                lines.append(f"{type(logger).__name__}:{' ' * max(1, 15 - len(type(logger).__name__))}{logger.log_dir}")
        print("\n".join(lines), flush=True)
