"""ContrastiveModule: SimCSE (unsupervised / supervised) and its hard-negative variants."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from core.errors import DataError
from lightning_modules.base import EmbeddingModule, nested_dims
from lightning_modules.components.encoder import Encoder, MLPMode
from lightning_modules.family import entry_name
from lightning_modules.losses.contrastive import (
    CandidateBuilder,
    InBatchNegatives,
    Views,
    info_nce,
    matryoshka_info_nce,
)
from lightning_modules.losses.grad_cache import grad_cached_loss
from lightning_modules.model_card import md_code

#: Candidate builder -> the method it makes of ContrastiveModule (the model card's name for it).
METHODS = {"InBatchNegatives": "SimCSE", "PositiveMixing": "HNCSE-PM", "HardNegativeMixing": "HNCSE-HNM"}
#: Datamodule -> what it makes of the method (the model card's name for it).
SUPERVISION = {"SentencesDataModule": "unsupervised ", "NLIDataModule": "supervised "}


class ContrastiveModule(EmbeddingModule):
    """InfoNCE over views of each sentence; the candidate builder decides the variant.

    A batch holds ``input_ids`` and ``attention_mask`` of shape (B, V, L): V = 1 for plain sentences (two
    dropout views are made by encoding each sentence twice in one forward pass), V = 2 for (anchor, positive)
    pairs, V = 3 for (anchor, positive, hard negative) triplets.

    Args:
        model_name_or_path: Hugging Face hub name or local folder.
        pooler: ``cls``, ``cls_before_pooler``, ``mean`` or ``first_last_avg``.
        mlp: ``train_only`` (unsupervised SimCSE), ``always`` (supervised SimCSE) or ``none``;
            default ``train_only`` for ``cls``, else ``none``.
        max_length: tokens per sentence.
        temperature: tau in ``cos / tau``.
        candidates: the candidate builder; default :class:`InBatchNegatives` (SimCSE).
        **kwargs: the options every EmbeddingModule shares, defined once there: ``lr``, ``weight_decay``,
            ``warmup_ratio``, ``check_finite_every_n_steps``, ``max_mean_cosine`` (the CLI lists them here too).
        attn_implementation: e.g. ``sdpa``; None keeps the model's default.
        mini_batch_size: GradCache (:mod:`lightning_modules.losses.grad_cache`): embed the batch in chunks of this
            many rows and cache the embedding gradients, so activation memory is that of one chunk while the loss
            still sees the whole (gathered) batch. Costs one extra forward pass per chunk. None: one pass.
        gradient_checkpointing: recompute each transformer layer in the backward pass (see :class:`Encoder`).
        compile: ``torch.compile`` the transformer (see :class:`Encoder`); for GPUs.
        matryoshka_dims: nested embedding sizes, strictly increasing, each at most the embedding size D (e.g.
            ``[32, 64, 128, 256, 384]`` for MiniLM): the loss is then the weighted sum of InfoNCE over each prefix
            of the same candidates (:func:`~lightning_modules.losses.contrastive.matryoshka_info_nce`), checkpoints
            are selected on the mean STS over the prefixes, and the export loads at any of them with
            ``SentenceTransformer(DIR, truncate_dim=k)``. The embedding trained must be the one exported, so
            ``mlp: train_only`` is refused. None: the whole embedding only.
        matryoshka_weights: one weight per ``matryoshka_dims`` entry; None weighs each 1 (as sentence-transformers'
            ``MatryoshkaLoss``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooler: str = "cls",
        mlp: MLPMode | None = None,
        max_length: int = 32,
        temperature: float = 0.05,
        candidates: CandidateBuilder | None = None,
        attn_implementation: str | None = None,
        mini_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1 or null, got {mini_batch_size}")
        self.save_hyperparameters()
        self.encoder = Encoder(model_name_or_path, pooler, mlp, max_length, attn_implementation,
                               gradient_checkpointing=gradient_checkpointing, compile=compile)
        self.temperature = temperature
        self.candidates = candidates if candidates is not None else InBatchNegatives()
        self.mini_batch_size = mini_batch_size
        self.matryoshka_dims, self.matryoshka_weights = matryoshka_options(
            matryoshka_dims, matryoshka_weights, self.encoder.dim, self.encoder.mlp_mode)


    @classmethod
    def run_tags(cls, init_args: Mapping) -> list[str]:
        builder = init_args.get("candidates")
        return [entry_name(builder) if builder is not None else "simcse"]

    def card_method(self, data: dict | None = None) -> tuple[str, list[tuple[str, str]]]:
        """The variant its candidate builder makes (supervised or not by its data), with the InfoNCE settings."""
        builder, enc = self.candidates, self.encoder
        args = ", ".join(f"{k} {v}" for k, v in vars(builder).items() if not k.startswith("_"))
        name = METHODS.get(type(builder).__name__, type(builder).__name__)
        name = SUPERVISION.get(str((data or {}).get("class_path") or "").rpartition(".")[2], "") + name
        return name, [("objective", f"InfoNCE, candidates {md_code(type(builder).__name__)}"
                       + (f" ({args})" if args else "")),
                      ("pooler", md_code(enc.pooler)), ("MLP over the pooled vector", md_code(enc.mlp_mode)),
                      ("temperature", f"{self.temperature:g}"), ("max_length", str(enc.max_length))]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(dm, "batch_size", 2) * self.trainer.world_size < 2 and hasattr(dm, "texts"):
            if len(dm.texts[0]) < 3:  # no explicit hard negative: the positive is the only candidate
                raise DataError(f"data.batch_size={dm.batch_size} on {self.trainer.world_size} process(es): a "
                                 "global batch of one row leaves InfoNCE a single candidate, so the loss is 0 and "
                                 "nothing trains; use a batch of at least 2 rows")

    def embed_views(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, V, L) token ids -> (B, V', D) embeddings, V' = 2 when V = 1 (two dropout views)."""
        if input_ids.shape[1] == 1:
            input_ids, attention_mask = input_ids.expand(-1, 2, -1), attention_mask.expand(-1, 2, -1)
        B, V, L = input_ids.shape
        z_ND = self.encoder(input_ids.reshape(B * V, L), attention_mask.reshape(B * V, L))
        return z_ND.view(B, V, -1)

    def views_loss(self, z_BVD: Tensor) -> Tensor:
        """InfoNCE of this rank's rows against the candidates built from the batch gathered over all ranks."""
        B = z_BVD.shape[0]
        z1_GD, offset = self.gather(z_BVD[:, 0])
        z2_GD, _ = self.gather(z_BVD[:, 1])
        z3_GD = self.gather(z_BVD[:, 2])[0] if z_BVD.shape[1] > 2 else None
        self.guard.note_embeddings(z1_GD, self.global_step)
        views = Views(z1_GD, z2_GD, z3_GD, offset, B)
        candidates = self.candidates(views, self.temperature)
        if self.matryoshka_dims is None:
            return info_nce(candidates, self.temperature)
        return matryoshka_info_nce(candidates, self.temperature, self.matryoshka_dims, self.matryoshka_weights)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        B = input_ids.shape[0]
        if self.mini_batch_size is None or self.mini_batch_size >= B:
            loss = self.views_loss(self.embed_views(input_ids, attention_mask))
        else:
            # Under DDP every parameter's gradient must reach the reducer once: see grad_cached_loss(params=...).
            ddp = self._trainer is not None and self.trainer.world_size > 1
            params = [p for p in self.encoder.parameters() if p.requires_grad] if ddp else None
            loss = grad_cached_loss(self.embed_views, self.views_loss, input_ids, attention_mask,
                                    self.mini_batch_size, params=params)
        self.guard.note_loss(loss, self.global_step)
        self.log("train/loss", loss, batch_size=B)  # no prog_bar: a host sync per step (callbacks/progress.py)
        return loss


def matryoshka_options(dims: list[int] | None, weights: list[float] | None, D: int,
                       mlp_mode: str) -> tuple[list[int] | None, list[float] | None]:
    """Checks ``model.matryoshka_dims`` / ``model.matryoshka_weights`` against an embedding of size ``D``."""
    if dims is None:
        if weights is not None:
            raise ValueError("model.matryoshka_weights needs model.matryoshka_dims")
        return None, None
    dims = nested_dims(dims, D)
    if mlp_mode == "train_only":
        raise ValueError("model.matryoshka_dims trains prefixes of the embedding the loss sees, but mlp: train_only "
                         "drops the MLP at inference, so the exported embedding would not be the trained one: set "
                         "model.mlp to none (or always)")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(dims) or any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"model.matryoshka_weights must be one non-negative weight per dim ({len(dims)}), not "
                             f"all 0; got {weights}")
    return dims, weights
