"""Export the best checkpoint when fitting ends, and say where everything is."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from datamodules.base import read_json, write_atomic
from lightning_modules.export import best_or_current, export, how_to_load, is_sae, prepare_output_dir

RUN_FILE = "run.json"


def run_folder(trainer: pl.Trainer) -> Path:
    """The folder of this run: the one that holds its checkpoint folder (``<save_dir>/<name>/<version>`` by
    default; the same folder when the run is resumed), else the trainer's log folder."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)


class WritesAtFitEnd(pl.Callback):
    """Base of the callbacks that, when ``fit`` ends, write a folder from the best checkpoint's weights (else the
    final ones), on rank 0: ``output_dir``, else ``<run folder>/<subdir>`` (see :func:`run_folder`), so each run
    keeps its own export. The folder records its run in ``run.json``; an ``output_dir`` that holds the export of
    another run is refused when fitting starts (before any training), never replaced. Subclasses implement
    :meth:`write` and name the file that marks their export (``marker``).

    The folder is resolved in ``on_fit_start`` on every rank (the checkpoint folder is known by then): under DDP
    ``trainer.log_dir`` is a broadcast, which hangs when only rank 0 calls it (as from ``on_fit_end``).
    """

    subdir = "output"
    marker = "run.json"

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._out: Path | None = None
        self._run: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run = run_folder(trainer)
        self._out = Path(self.output_dir) if self.output_dir else self._run / self.subdir
        prepare_output_dir(self._out, self.marker, overwrite=True)  # a file, or a folder of something else
        record = self._out / RUN_FILE
        if record.is_file():
            other = read_json(record, f"the export's {RUN_FILE}", f"delete {record} if that folder is yours").get("run")
            if other and Path(other).resolve() != self._run.resolve():
                raise FileExistsError(f"{self._out} holds the export of another run ({other}): give another "
                                      "output_dir (or none: each run then exports into its own folder)")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module, ckpt = best_or_current(trainer, pl_module)
        self.write(trainer, module, ckpt, self._out)
        write_atomic(self._out / RUN_FILE, json.dumps({"run": str(self._run), "checkpoint": ckpt or None,
                                                       "global_step": trainer.global_step}, indent=1))

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None, out: Path) -> None:
        """Write ``out`` from ``module`` (loaded from ``ckpt``, or the trained module itself when ``ckpt`` is None);
        an earlier export of the same run there is replaced."""
        raise NotImplementedError


class ExportOnFitEnd(WritesAtFitEnd):
    """At the end of ``fit``, export the best checkpoint (else the last weights) with
    :func:`lightning_modules.export.export`: a sentence-transformers folder (``<run folder>/export``) for encoders
    and MCR2 heads, ``cfg.json`` + ``sae.safetensors`` (``<run folder>/sae``) for SAEs, with ``sae_metrics.json``
    beside them (the last logged ``sae/*`` and ``val/sae/*`` values, the threshold, the dead-latent count).

    Prints the checkpoint, the exported folder and the logger locations (W&B run folder and ``wandb sync`` hint
    when offline).

    Args:
        output_dir: target folder; default ``<run folder>/export`` (``<run folder>/sae`` for an SAE).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(output_dir)
        self.exported: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.subdir, self.marker = ("sae", "cfg.json") if is_sae(pl_module) else ("export", "modules.json")
        super().on_fit_start(trainer, pl_module)

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None, out: Path) -> None:
        self.exported = export(module, out, overwrite=True)
        if is_sae(module):
            (out / "sae_metrics.json").write_text(json.dumps(sae_metrics(trainer, module, ckpt), indent=1))
        lines = [f"checkpoint:     {ckpt or '(none saved; exported the final weights)'}",
                 f"exported:       {self.exported}  ({how_to_load(module, self.exported)})"]
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


def sae_metrics(trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None) -> dict:
    """The SAE's final figures written beside its export: logged ``sae/*`` values and its state."""
    sae = module.sae
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "sae/" in k}
    metrics.update({
        "checkpoint": ckpt or None,
        "global_step": trainer.global_step,
        "threshold_input_units": float(sae.threshold * sae.input_scale) if sae.threshold >= 0 else None,
        "dead_latents": int((sae.tokens_since_fired >= sae.cfg.dead_after).sum()),
        "num_latents": sae.num_latents,
    })
    return metrics
