"""SAEModule: trains a BatchTopK sparse autoencoder on cached encoder activations (datamodules.ActivationsDataModule).

There is no text encoder to train here, so this is a plain LightningModule (not an EmbeddingModule). The maths is in
``components/batch_topk.py`` and ``losses/sae.py``; this module wires it to the data, the optimiser, DDP and logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from core.errors import DataError
from core.metrics import FVU, LatentCounts, PrefixFVU, density_histogram, log10_density
from core.tensors import eval_mode
from lightning_modules.base import GuardsDivergence, can_fuse
from lightning_modules.checkpoints import Checkpoint
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE, positive_min
from lightning_modules.export import SAE_FORMATS, export_format, export_sae
from lightning_modules.family import SAE, ModuleFamily
from lightning_modules.losses.sae import dead_fraction, mean_cosine, total_variance
from lightning_modules.sae_card import checkpoint_metrics

ACTIVATIONS_KEY = "embedlab_activations"
DENSITY_KEY = "embedlab_log10_density"


def activations_of(meta: dict) -> dict:
    """The identity of the vectors an SAE reads, from an activation cache's ``meta.json`` (a sentence-level one's
    pooling and normalisation too: STS recovered recomputes those vectors)."""
    keys = ("model", "model_fingerprint", "layer", "level", "special_tokens", "text_prefix")
    keys += ("pooling", "normalize") if meta.get("level") == "sentence" else ()
    return {k: meta.get(k) for k in keys}


class SAEModule(ModuleFamily, GuardsDivergence, pl.LightningModule):
    """Train a :class:`~lightning_modules.components.batch_topk.BatchTopKSAE`.

    Batches are (B, d) float tensors. Training logs ``sae/loss``, ``sae/mse``, ``sae/fvu``,
    ``sae/explained_variance`` (= 1 - FVU), ``sae/l0`` (non-zeros per row), ``sae/dead_fraction`` (no firing for
    ``dead_after`` tokens), ``sae/aux_loss`` and ``sae/threshold`` (input units; -1 until estimated). Validation
    uses the inference threshold and logs ``val/sae/fvu``, ``val/sae/explained_variance`` (torchmetrics states,
    exact over the whole split and all ranks), ``val/sae/l0``, ``val/sae/dead_fraction`` (latents that never fire
    on the split), ``val/sae/cosine``, and the feature density: each latent's ``log10`` firing frequency on the
    split (:func:`log10_density`, SAELens' measure), as a ``wandb.Histogram`` ``val/sae/log10_density`` on W&B
    loggers and, for every logger (CSV included), the number of latents per decade
    ``val/sae/log10_density_hist/<lower edge>`` (-10: never fires). The last measured density travels with the SAE
    (``sae.log10_density``: checkpoints, and ``sparsity.safetensors`` in exports).

    The SAE family (:class:`~lightning_modules.family.ModuleFamily`): exports an SAE folder in sparsify's or
    SAELens' layout (:func:`~lightning_modules.export.export_sae`), keeps the checkpoint of the lowest held-out FVU.

    Under DDP each rank selects its own batch's top k * B_local; firing statistics, the threshold's batch minimum
    and token counts are reduced over ranks, so every rank keeps identical buffers.

    Args:
        sae: the SAE's :class:`~lightning_modules.components.batch_topk.BatchTopKConfig`, whole (``sae: {k: 32,
            expansion_factor: 8, ...}`` in YAML); its ``d_in`` left null is taken from the datamodule (``dim``) and
            recorded in the hyper-parameters. A dict (as checkpoints store it) is accepted too. A Matryoshka SAE
            (``matryoshka_widths``) also logs ``sae/prefix_fvu/<width>`` in training and
            ``val/sae/prefix_fvu/<width>`` (exact over the split) in validation.
        lr: Adam learning rate; None uses ``2e-4 / sqrt(F / 2**14)`` (dictionary_learning / sparsify scaling).
        warmup_ratio: fraction of the steps with a linear warm-up from 0.
        decay_ratio: fraction of the steps at the end with a linear decay to 0 (dictionary_learning: last 20%).
        init_samples: vectors drawn from the datamodule (``sample``) to set the input scale and ``b_dec``; the first
            batch is used when the datamodule cannot sample.
        seed: seed of that draw.
        check_finite_every_n_steps: how often the divergence records (non-finite loss or gradient norm) are read;
            see :class:`~lightning_modules.base.GuardsDivergence`.
    """

    export_type = SAE
    export_subdir = "sae"
    export_marker = "cfg.json"
    export_formats = SAE_FORMATS
    #: the BatchTopKConfig fields, once init arguments of their own, now under ``sae``
    moved_options = {name: f"sae.{name}" for name in BatchTopKConfig.__dataclass_fields__}

    @classmethod
    def run_tags(cls, init_args: Mapping) -> list[str]:
        sae = init_args.get("sae")
        widths = sae.get("matryoshka_widths") if hasattr(sae, "get") else None
        return ["matryoshka-batchtopk-sae" if widths else "batchtopk-sae"]

    @classmethod
    def checkpoint_monitor(cls, init_args: Mapping) -> dict | None:
        return {"monitor": "val/sae/fvu", "mode": "min", "filename": "step{step}-fvu{val/sae/fvu:.4f}"}

    def how_to_load(self, folder: str | Path) -> str:
        return f"lightning_modules.export.load_sae('{folder}')"

    def write_export(self, output_dir: str | Path, overwrite: bool = False, format: str | None = None,
                     card: dict | None = None) -> Path:
        return export_sae(self, output_dir, overwrite=overwrite, format=export_format(self, format), metrics=card)

    def card_record(self, checkpoint: Checkpoint) -> dict:
        return checkpoint_metrics(checkpoint, self.sae)

    def __init__(
        self,
        sae: BatchTopKConfig | None = None,
        lr: float | None = None,
        warmup_ratio: float = 0.05,
        decay_ratio: float = 0.2,
        init_samples: int = 16384,
        seed: int = 0,
        check_finite_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.init_guard(check_finite_every_n_steps, max_mean_cosine=None)
        if not (0 <= warmup_ratio < 1 and 0 <= decay_ratio < 1 and warmup_ratio + decay_ratio <= 1):
            raise ValueError(f"warmup_ratio and decay_ratio must be in [0, 1) and sum to <= 1, got "
                             f"{warmup_ratio}, {decay_ratio}")
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0 (or null for the size-scaled default), got {lr}")
        if sae is None:
            sae = BatchTopKConfig()
        elif isinstance(sae, dict):
            sae = BatchTopKConfig.from_dict(sae, drop_extra_fields=False)
        self.save_hyperparameters(ignore=["sae"])
        self.hparams["sae"] = sae.to_dict()  # plain values: checkpoints load with weights_only=True
        self.sae: BatchTopKSAE | None = None
        self._initialized = False
        if sae.d_in is not None:
            self._build(sae.d_in)

    @staticmethod
    def upgrade_hparams(recorded: dict) -> dict:
        """Checkpoints written before the module took its config whole keep the BatchTopKConfig fields flat among
        its hyper-parameters: nested under ``sae`` here, so ``load_module`` rebuilds them (Lightning would drop the
        unknown flat keys and build a default SAE)."""
        if "sae" in recorded:
            return {}
        flat = {k: v for k, v in recorded.items() if k in BatchTopKConfig.__dataclass_fields__}
        return {"sae": flat} if flat else {}

    def _sae_config(self, d_in: int) -> BatchTopKConfig:
        return BatchTopKConfig.from_dict({**self.hparams["sae"], "d_in": d_in}, drop_extra_fields=False)

    def _build(self, d_in: int) -> None:
        try:
            cfg = self._sae_config(d_in)
        except ValueError as err:  # raised at setup when d_in comes from the data: after the config was parsed
            raise DataError(f"model.init_args.sae: {err}") from None
        self.sae = BatchTopKSAE(cfg)
        self.val_fvu = FVU(d_in)
        self.val_counts = LatentCounts(self.sae.num_latents)
        self.val_prefix_fvu = PrefixFVU(d_in, len(cfg.matryoshka_widths))

    # --------------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dim = getattr(dm, "dim", None)
        if self.sae is None:
            if dim is None:
                raise ValueError("SAEModule: d_in is not set and the datamodule has no `dim`: set model.sae.d_in")
            self.hparams["sae"]["d_in"] = int(dim)
            self._build(int(dim))
        elif dim is not None and dim != self.sae.cfg.d_in:
            raise ValueError(f"SAEModule was built for d_in={self.sae.cfg.d_in} but the datamodule yields "
                             f"{dim}-dimensional vectors: set model.sae.d_in to {dim} or null")
        meta = getattr(getattr(dm, "cache", None), "meta", None)
        if meta:  # what the SAE reads: kept in checkpoints and cfg.json, checked by the interpretability suite
            self.sae.activations = activations_of(meta)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.sae is not None and self.sae.activations:
            checkpoint[ACTIVATIONS_KEY] = self.sae.activations
        if self.sae is not None and self.sae.log10_density is not None:
            checkpoint[DENSITY_KEY] = self.sae.log10_density

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.sae is not None:
            self.sae.activations = checkpoint.get(ACTIVATIONS_KEY)
            self.sae.log10_density = checkpoint.get(DENSITY_KEY)

    def on_fit_start(self) -> None:
        if bool(self.sae.initialized):
            return
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "sample"):
            self.sae.initialize(dm.sample(self.hparams.init_samples, seed=self.hparams.seed).to(self.device))

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, x_BD: Tensor, batch_idx: int) -> Tensor:
        sae = self.sae
        if not self._initialized:  # read the buffer once (a host sync), not every step
            self._initialized = bool(sae.initialized)
        if not self._initialized:  # no datamodule sample: initialise on the first batch (same on all ranks
            sae.initialize(self._all_gather_rows(x_BD))  # because the gathered batch is the same everywhere)
            self._initialized = True
        out = sae(x_BD)
        self.guard.note_loss(out.loss, self.global_step)
        fired_F = self._reduce(out.fired.to(torch.int32), "max").bool()
        min_act = self._reduce((positive_min(out.acts) / sae.input_scale).float(), "min")
        n_tokens = x_BD.shape[0] * self.trainer.world_size
        sae.update_stats(fired_F, n_tokens, min_act)
        B = x_BD.shape[0]
        self.log("sae/fvu", out.fvu, on_step=True, on_epoch=False)  # no prog_bar: callbacks/progress.py
        self.log_dict({
            "sae/loss": out.loss.detach(),
            "sae/mse": out.mse.detach(),
            "sae/explained_variance": 1 - out.fvu,
            "sae/l0": (out.acts > 0).sum() / B,
            "sae/dead_fraction": dead_fraction(sae.tokens_since_fired, sae.cfg.dead_after),
            "sae/aux_loss": out.aux_loss.detach(),
            "sae/threshold": torch.where(sae.threshold >= 0, sae.threshold * sae.input_scale, sae.threshold),
        }, on_step=True, on_epoch=False)
        if out.prefix_mse is not None:  # Matryoshka: each prefix's FVU on this batch (normalised units)
            variance = total_variance(x_BD.to(sae.W_enc) / sae.input_scale)
            self.log_dict({f"sae/prefix_fvu/{w}": v for (w, _), v in zip(sae.cfg.levels, out.prefix_mse.detach()
                                                                             / variance)}, on_step=True, on_epoch=False)
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.project_decoder_grad()
        super().on_before_optimizer_step(optimizer)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Unit decoder rows right after the update, inside the step: ModelCheckpoint saves in the callbacks'
        # on_train_batch_end, which runs before the module's, so renormalising there left the saved decoder
        # unnormalised and a resumed run drifted from an uninterrupted one.
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder()

    def _reduce(self, t: Tensor, op: str) -> Tensor:
        if self.trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return t
        t = t.clone()
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t

    def _all_gather_rows(self, x_BD: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return x_BD
        return self.all_gather(x_BD).reshape(-1, x_BD.shape[-1])

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, x_BD: Tensor, batch_idx: int) -> None:
        out = self.sae(x_BD)  # eval mode: the threshold
        self.val_fvu.update(x_BD, out.x_hat)
        self.val_counts.update(out.latents, x_BD.shape[0], out.acts)
        if out.prefix_mse is not None:  # back to input units, summed over rows
            self.val_prefix_fvu.update(x_BD, out.prefix_mse.detach() * x_BD.shape[0] * self.sae.input_scale**2)
        self.log("val/sae/cosine", mean_cosine(x_BD.float(), out.x_hat.float()), on_epoch=True, sync_dist=True,
                 batch_size=x_BD.shape[0])

    def on_validation_epoch_end(self) -> None:
        value = self.val_fvu.compute().float()
        counts = self.val_counts.compute()
        self.log_dict({"val/sae/fvu": value, "val/sae/explained_variance": 1 - value,
                       "val/sae/l0": counts["l0"].float(), "val/sae/dead_fraction": counts["dead_fraction"]})
        if not self.trainer.sanity_checking:
            self._log_density(log10_density(counts["frequency"]))
        if self.sae.cfg.matryoshka_widths:
            prefix = self.val_prefix_fvu.compute()
            self.log_dict({f"val/sae/prefix_fvu/{w}": v.float() for (w, _), v in zip(self.sae.cfg.levels, prefix)})
        self.val_fvu.reset()
        self.val_counts.reset()
        self.val_prefix_fvu.reset()

    def _log_density(self, log10_F: Tensor) -> None:
        self.sae.log10_density = log10_F.cpu()  # once per validation: one copy to the host
        self.log_dict({f"val/sae/log10_density_hist/{b}": n.float() for b, n in density_histogram(log10_F).items()})
        wandb_loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers and self.global_rank == 0:
            # imported when used: wandb (~1 s to import) only when a W&B logger is given
            import wandb

            for logger in wandb_loggers:
                logger.log_metrics({"val/sae/log10_density": wandb.Histogram(self.sae.log10_density.numpy())},
                                   step=self.global_step)

    # --------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        lr = self.hparams.lr or 2e-4 / math.sqrt(self.sae.num_latents / 2**14)
        params = list(self.sae.parameters())
        optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=can_fuse(params, self._trainer))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.hparams.warmup_ratio * total)
        decay_start = total - int(self.hparams.decay_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if step >= decay_start:
                return max(total - step, 0) / max(total - decay_start, 1)
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, x_BD: Tensor) -> Tensor:
        """(B, F) codes of activation vectors with the inference threshold, input units."""
        with eval_mode(self.sae):
            return self.sae.encode(x_BD.to(self.device))
