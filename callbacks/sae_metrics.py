"""End-of-fit report for sparse autoencoders: export the SAE and record its final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl

from callbacks.export import WritesAtFitEnd


class SAEReport(WritesAtFitEnd):
    """When ``fit`` ends: export the SAE of the best checkpoint (else the final weights) as ``cfg.json`` +
    ``sae.safetensors`` (``lightning_modules.export.export_sae``) and write ``sae_metrics.json`` beside it with the
    last logged ``sae/*`` and ``val/sae/*`` values, the threshold and the dead-latent count.

    Args:
        output_dir: target folder; default ``<run folder>/sae``, beside the run's checkpoints.
    """

    subdir = "sae"
    marker = "cfg.json"

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(output_dir)
        self.exported: Path | None = None

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: str | None, out: Path) -> None:
        from lightning_modules.export import export_sae

        self.exported = export_sae(module, out, overwrite=True)
        sae = module.sae
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "sae/" in k}
        metrics.update({
            "checkpoint": ckpt or None,
            "global_step": trainer.global_step,
            "threshold_input_units": float(sae.threshold * sae.input_scale) if sae.threshold >= 0 else None,
            "dead_latents": int((sae.tokens_since_fired >= sae.cfg.dead_after).sum()),
            "num_latents": sae.num_latents,
        })
        (out / "sae_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"checkpoint:   {ckpt or '(none saved; exported the final weights)'}\n"
              f"exported SAE: {self.exported}  (lightning_modules.export.load_sae('{self.exported}'))", flush=True)
