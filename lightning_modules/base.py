"""EmbeddingModule: what every trainable embedding model here shares."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from core.metrics import mean_spearman, pair_cosines
from lightning_modules.checkpoints import CLASS_PATH_KEY, LOGGERS_KEY, Checkpoint
from lightning_modules.components.encoder import Encoder
from lightning_modules.components.guard import DivergenceError, DivergenceGuard, Event, describe
from lightning_modules.export import export_format, export_sentence_transformer
from lightning_modules.family import ModuleFamily
from lightning_modules.model_card import checkpoint_facts

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class RecordsClassPath:
    """Mixin for LightningModules: every checkpoint records the module's class, so ``loading.load_module`` rebuilds
    the right class whether or not the run was launched through LightningCLI (which records ``_class_path``), and
    each logger (:func:`logger_record`), so that ``fit --ckpt_path`` continues the same W&B run and an export's
    model card names it."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CLASS_PATH_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        loggers = self._trainer.loggers if self._trainer is not None else []
        checkpoint[LOGGERS_KEY] = [logger_record(lg) for lg in loggers]


def logger_record(logger) -> dict:
    """What a checkpoint keeps of a logger: class and version; for W&B also the project, save_dir and group (the
    recipe, for ``train.py interpret`` to group its run with the fit's; plain strings: checkpoints are read with
    ``weights_only``)."""
    record = {"class": type(logger).__name__, "version": None if logger.version is None else str(logger.version)}
    if record["class"] == "WandbLogger":
        group = (getattr(logger, "_wandb_init", None) or {}).get("group")  # wandb.init's kwargs, before it runs
        record.update({k: None if v is None else str(v) for k, v in (("project", logger.name),
                                                                      ("save_dir", logger.save_dir),
                                                                      ("group", group))})
    return record


def nested_dims(dims: Sequence[int], size: int, end: str | None = None) -> list[int]:
    """``model.matryoshka_dims`` checked against an embedding of ``size``: strictly increasing whole sizes in
    ``[1, size]``, and ending at ``size`` when ``end`` names the option that sets it (an MCR2 head's ``out_dim``)."""
    dims = list(dims)
    if (not dims or any(not isinstance(k, int) or k < 1 for k in dims) or dims[-1] > size
            or any(b <= a for a, b in zip(dims, dims[1:])) or (end is not None and dims[-1] != size)):
        ending = f" ending at {end} ({size})" if end else ""
        raise ValueError(f"model.matryoshka_dims must be strictly increasing sizes in [1, {size}]{ending}, e.g. "
                         f"[32, 64, 128, {size}]; got {dims}")
    return dims


def total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together, on their device (no host sync): torch's foreach kernel where it has
    one (``get_total_norm``, torch >= 2.6), else one norm per tensor."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class GuardsDivergence(RecordsClassPath):
    """Mixin for LightningModules: training stops with a :class:`DivergenceError` naming the step and the likely
    cause when the loss, the gradient norm or the embeddings stop being finite, or the embeddings collapse.

    The module records into ``self.guard`` during its steps (device tensors, no host sync); the records are read
    every ``check_finite_every_n_steps`` optimiser steps (before that step's update), before every checkpoint is
    written (so a checkpoint of a diverged model is never saved, let alone kept as best) and when training ends
    (before any end-of-fit export).
    Under DDP the ranks agree before raising, so none waits forever for the others.
    """

    guard: DivergenceGuard
    check_every: int

    def init_guard(self, check_finite_every_n_steps: int, max_mean_cosine: float | None) -> None:
        if check_finite_every_n_steps < 1:
            raise ValueError(f"model.check_finite_every_n_steps must be >= 1, got {check_finite_every_n_steps}")
        self.guard = DivergenceGuard(max_mean_cosine)
        self.check_every = check_finite_every_n_steps

    def on_before_optimizer_step(self, optimizer) -> None:
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and scaler is None:  # 16-mixed: inf gradients are expected, and the scaler skips those steps
            self.guard.note_grad_norm(total_norm(grads), self.global_step)
        if (self.global_step + 1) % self.check_every == 0:  # before the update: with 1, nothing bad reaches it
            self.check_divergence()

    def on_train_end(self) -> None:
        self.check_divergence()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # during fit, validation included: ModelCheckpoint(monitor=val/...) saves from on_validation_end, and a step's
        # update can make the weights non-finite before any loss shows it
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.guard.note_weights(self.parameters(), self.global_step)
            self.check_divergence()
        super().on_save_checkpoint(checkpoint)

    def check_divergence(self) -> None:
        """Raise :class:`DivergenceError` if any rank recorded a failure (one host sync)."""
        event = self.guard.first()
        if self._trainer is not None and self.trainer.world_size > 1:
            if not self.trainer.strategy.reduce_boolean_decision(event is not None, all=False):
                return
        elif event is None:
            return
        if event is None:
            raise DivergenceError(f"training diverged on another process (this is rank {self.global_rank}); "
                                  "its message names the step and the cause")
        raise DivergenceError(f"training diverged at step {event.step}: {describe(event)}. Likely cause: "
                              f"{'; '.join(self.divergence_causes(event))}. Checkpoints written before step "
                              f"{event.step} are intact; nothing was exported.")

    def divergence_causes(self, event: Event) -> list[str]:
        """Likely causes of ``event``, most likely first; modules add their own."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        group = optimizers[0].param_groups[0] if optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))  # the peak rate the schedule scales
        causes = [f"the learning rate ({lr:g}, model.lr) is too high: lower it, or warm up (model.warmup_ratio)"
                  if lr is not None else "the learning rate is too high"]
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        if precision.startswith("16"):
            causes.append("float16 overflow (trainer.precision 16-mixed): use bf16-mixed or 32-true")
        if event.kind == "collapse":
            causes.append("if this model's sentences are really this alike, raise model.max_mean_cosine or set "
                          "it to null (no collapse check)")
        return causes


def can_fuse(params, trainer: pl.Trainer | None = None) -> bool:
    """Whether to use torch's fused Adam/AdamW kernel: the parameters are floating point on CPU or CUDA, and the run
    does not clip gradients under Lightning's mixed precision (``bf16-mixed``/``16-mixed``), where Lightning refuses
    to clip for an optimiser that unscales gradients itself, as the fused kernels do; those runs take foreach.

    Fused is what transformers' Trainer (so sentence-transformers) uses by default since torch 2.8: measured here on
    MiniLM's 22M parameters on 2 CPU cores, one step takes 15 ms against 72 ms for the default foreach kernel."""

    if getattr(trainer, "gradient_clip_val", None) and isinstance(getattr(trainer, "precision_plugin", None),
                                                                   MixedPrecision):
        return False
    return all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)


class EmbeddingModule(ModuleFamily, GuardsDivergence, pl.LightningModule):
    """Base class: holds ``self.encoder``, exposes ``encode``, builds AdamW + linear warmup/decay; the sentence
    encoder family (:class:`~lightning_modules.family.ModuleFamily`): exports a sentence-transformers folder with a
    model card (:mod:`lightning_modules.model_card`).

    Callbacks talk to a module only through :meth:`encode` (and :attr:`encoder` for tokenisation caches).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
        warmup_ratio: fraction of ``trainer.estimated_stepping_batches`` spent warming up linearly from 0;
            the rate then decays linearly to 0 at the last step (the SimCSE / transformers schedule).
        check_finite_every_n_steps: how often the divergence records are read (see :class:`GuardsDivergence`).
        max_mean_cosine: the collapse bound on the mean cosine between a batch's embeddings; None: no check.
    """

    encoder: Encoder
    #: nested embedding sizes trained as embeddings of their own (Matryoshka), or None: the whole embedding only
    matryoshka_dims: list[int] | None = None

    @property
    def selection_dims(self) -> list[int] | None:
        """The ``matryoshka_dims``: :class:`~callbacks.STSEvaluator` (and MCR2's ``init: best``) score the mean over
        these prefixes, so the checkpoint kept is good at every size (None: the whole embedding)."""
        return self.matryoshka_dims

    def __init__(self, lr: float = 3e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.0,
                 check_finite_every_n_steps: int = 50, max_mean_cosine: float | None = 0.99) -> None:
        super().__init__()
        self.init_guard(check_finite_every_n_steps, max_mean_cosine)
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self._shared_options = {"lr": lr, "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
                                "check_finite_every_n_steps": check_finite_every_n_steps,
                                "max_mean_cosine": max_mean_cosine}

    def save_hyperparameters(self, *args, frame=None, **kwargs) -> None:
        """Lightning's, from the subclass's ``__init__`` frame, plus the options defined here (a subclass takes them
        through ``**kwargs``, so the frame holds only those given): every checkpoint records them all, and a resumed
        run can refuse a changed one."""
        super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        self.hparams.update(self._shared_options)

    # ------------------------------------------------------------------------------ the family's answers
    @property
    def embedding_dim(self) -> int:
        """The size of the embeddings the export gives (the encoder's; a head that resizes them overrides it)."""
        return self.encoder.dim

    def how_to_load(self, folder: str | Path) -> str:
        return f"SentenceTransformer('{folder}')"

    def write_export(self, output_dir: str | Path, overwrite: bool = False, format: str | None = None,
                     card: dict | None = None) -> Path:
        export_format(self, format)  # refuses a format: this family has one
        return export_sentence_transformer(self, output_dir, overwrite=overwrite, run_facts=card)

    def card_record(self, checkpoint: Checkpoint) -> dict:
        return checkpoint_facts(checkpoint)

    def card_method(self, data: dict | None = None) -> tuple[str, list[tuple[str, str]]]:
        """The card's name of the method and its key settings as (setting, value) rows (``data``: the datamodule's
        config, for a method its data changes); here the plain hyper-parameters, which a family refines."""
        hp = dict(getattr(self, "hparams", {}) or {})
        return type(self).__name__, [(k, str(v)) for k, v in hp.items()
                                     if isinstance(v, (int, float, str, bool)) and not k.startswith("_")]

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> Tensor:
        """Embeddings (N, D) of raw sentences on CPU, inference mode, no dropout."""
        return self.encode_ids(self.encoder.tokenize(sentences), batch_size=batch_size)

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 128) -> Tensor:
        """Embeddings (N, D) of pre-tokenised sentences; modules with a head after the encoder override this."""
        return self.encoder.encode_ids(ids, batch_size=batch_size)

    def embed_batch(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) padded ids -> (B, D): what validation / test score; modules with a head override this."""
        return self.encoder(input_ids, attention_mask)

    def setup(self, stage: str) -> None:
        # Late binding: the datamodule learns the tokenizer only now (litgpt's `connect` idea).
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "connect"):
            dm.connect(self.encoder.tokenizer, self.encoder.max_length)

    # ------------------------------------------------------------------------------ validate / test on STS pairs
    # Batches of (ids1, ids2, scores) from datamodules.STSDataModule: Spearman x 100 of cosine vs gold per task.
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._sts_step(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._sts_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._sts_outputs: dict[int, list[tuple[Tensor, Tensor]]] = {}

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._sts_log("val")

    def on_test_epoch_end(self) -> None:
        self._sts_log("test")

    def _sts_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        B, V, L = batch["input_ids"].shape  # V = 2: the two sentences of each pair
        z_ND = self.embed_batch(batch["input_ids"].reshape(B * V, L), batch["attention_mask"].reshape(B * V, L))
        z_BVD = z_ND.view(B, V, -1).float()
        # one column per prefix the checkpoint is selected on (STSEvaluator's score), or one for the whole embedding
        cos_BK = torch.stack([pair_cosines(z_BVD[:, 0], z_BVD[:, 1], k) for k in self.selection_dims or [None]], 1)
        self._sts_outputs.setdefault(dataloader_idx, []).append((cos_BK, batch["scores"].float()))

    def _sts_log(self, prefix: str) -> None:
        """Logs :func:`core.metrics.sts_spearman` of each dataloader's pairs over :attr:`selection_dims` (the score
        STSEvaluator selects checkpoints by), in its two halves: the cosines were taken per batch
        (:meth:`_sts_step`), ranked here once gathered from every rank."""
        names = getattr(getattr(self.trainer, "datamodule", None), "names", None) or []
        for idx, outputs in sorted(self._sts_outputs.items()):
            cos_BK = torch.cat([c for c, _ in outputs])
            cos_NK = self.all_gather(cos_BK).reshape(-1, cos_BK.shape[1])
            gold_N = self.all_gather(torch.cat([g for _, g in outputs])).reshape(-1)
            name = names[idx] if idx < len(names) else f"sts{idx}"
            rho = mean_spearman(cos_NK, gold_N)
            self.log(f"{prefix}/{name}_spearman", rho, add_dataloader_idx=False, rank_zero_only=True)

    # -------------------------------------------------------------------------------------------- distributed
    def gather(self, x_BD: Tensor) -> tuple[Tensor, int]:
        """All rows of every rank with gradients flowing back to their owners: (world * B, D) and this rank's offset.

        ``all_gather`` returns (world, B, D), or just the input when there is one process (docs/pitfalls.md #3);
        ``sync_grads=True`` is required for correct gradients (docs/pitfalls.md #3).
        """
        if self._trainer is None or self.trainer.world_size == 1:  # not attached (unit tests) or one process
            return x_BD, 0
        g_WBD = self.all_gather(x_BD.contiguous(), sync_grads=True)
        return g_WBD.reshape(-1, *x_BD.shape[1:]), self.global_rank * x_BD.shape[0]

    # -------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(NO_DECAY) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr,
                                      fused=can_fuse(decay + no_decay, self._trainer))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

