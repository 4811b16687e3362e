"""MCR2Module: a projection head trained with MCR2 and/or similarity distillation on a frozen teacher."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from core.errors import DataError
from core.files import readable_as_umask
from core.metrics import SentenceIndex
from datamodules.groups import kmeans_groups
from datamodules.sts import load_sts
from lightning_modules.base import EmbeddingModule, nested_dims
from lightning_modules.components.encoder import Encoder
from lightning_modules.components.heads import ProjectionHead
from lightning_modules.losses.mcr2 import GroupLayout, MCR2Output, group_layout, matryoshka_mcr2_loss, mcr2_loss
from lightning_modules.model_card import md_code

Grouping = Literal["pairs", "kmeans", "labels"]
GROUPINGS = ("pairs", "kmeans", "labels")
Init = Literal["random", "pca", "truncation", "best"]
INITS = ("random", "pca", "truncation", "best")


def check_options(*, grouping: str, init: str, hidden_dim: int | None, eps2: float, gamma: float,
                  distill_weight: float, mcr2_weight: float, listwise_weight: float, listwise_temperature: float,
                  matryoshka_dims: list[int] | None, out_dim: int, num_clusters: int) -> None:
    """Refuse a bad :class:`MCR2Module` option with a message naming it (before any model is loaded)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"model.grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if init not in INITS:
        raise ValueError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
    if init != "random" and hidden_dim is not None:
        raise ValueError(f"model.init {init!r} initialises a linear head: set model.hidden_dim to null")
    if not eps2 > 0:
        raise ValueError(f"model.eps2 must be > 0, got {eps2}")
    if distill_weight < 0 or gamma <= 0:
        raise ValueError(f"model.gamma must be > 0 and model.distill_weight >= 0, got {gamma}, {distill_weight}")
    for name, value in (("mcr2_weight", mcr2_weight), ("listwise_weight", listwise_weight)):
        if not value >= 0:
            raise ValueError(f"model.{name} must be >= 0, got {value}")
    if not mcr2_weight and not distill_weight and not listwise_weight:
        raise ValueError("model.mcr2_weight, model.distill_weight and model.listwise_weight are all 0: the head "
                         "would have nothing to learn")
    if not listwise_temperature > 0:
        raise ValueError(f"model.listwise_temperature must be > 0, got {listwise_temperature}")
    if matryoshka_dims is not None:
        nested_dims(matryoshka_dims, out_dim, end="model.out_dim")
    if grouping == "kmeans" and num_clusters < 2:
        raise ValueError(f"model.num_clusters must be >= 2, got {num_clusters}")


class MCR2Module(EmbeddingModule):
    """Compresses a frozen sentence encoder's embeddings (D) to ``out_dim`` (K) with a trained projection head.

    The teacher (``self.encoder``) stays in eval mode with ``requires_grad=False`` (no dropout, no gradient, no
    optimiser state); only ``self.head`` trains. ``encode`` / ``encode_ids`` / validation return the compressed
    embedding, and the sentence-transformers export appends the head as Dense module(s) (:meth:`extra_st_modules`).

    Batches come from :class:`~datamodules.groups.GroupedTextDataModule` (``input_ids`` (B, V, L), ``index`` (B,),
    optionally ``group`` (B,)). With ``cache_teacher`` every training sentence is embedded once at the start of
    ``fit`` (optionally read from / written to ``cache_path``), so a step costs only the head and the loss.
    The loss is computed on the batch gathered over all ranks (the coding rate depends on the batch size m):
    ``mcr2_weight (-gamma R + R_c) + distill_weight * cosine + listwise_weight * listwise``, summed over the
    ``matryoshka_dims`` prefixes when given (:func:`~lightning_modules.losses.mcr2.matryoshka_mcr2_loss`).

    Args:
        model_name_or_path: the teacher (hub name or local folder).
        pooler: the teacher's pooler (``mean`` for sentence-transformers models such as all-MiniLM-L6-v2).
        max_length: tokens per sentence.
        out_dim: K, the compressed size (e.g. 32, 64, 128, 256).
        hidden_dim: hidden size of an MLP head; None for a linear head.
        activation: MLP activation (``relu``, ``gelu``, ``tanh``).
        normalize_input: L2-normalise the teacher's embedding before the head (the teacher model's own output).
        in_dim: the teacher embedding size the head is configured for; None takes the teacher's. A mismatch with
            the teacher is a configuration error (raised at construction).
        grouping: ``pairs`` (each row's V >= 2 sentences are one group, e.g. NLI premise + entailment),
            ``kmeans`` (k-means clusters of the teacher's embeddings of all training sentences, computed once),
            ``labels`` (the datamodule's ``label_column``).
        num_clusters: k for ``kmeans``.
        kmeans_seed: seed of the k-means initialisation.
        eps2: epsilon squared of the coding rate.
        gamma: weight of R in ``-gamma R + R_c``.
        mcr2_weight: weight of the MCR2 term ``-gamma R + R_c`` (0: a distillation-only head, for which the
            grouping is not used and no k-means clustering runs).
        distill_weight: weight of the term keeping the student's pairwise cosines close to the teacher's (0: off).
        listwise_weight: weight of the listwise similarity distillation: the KL divergence between the teacher's
            and the head's softmax over each sentence's cosine similarities to the rest of the batch
            (:func:`~lightning_modules.losses.mcr2.listwise_distillation`), which weights the near neighbours that
            decide rankings (0: off).
        listwise_temperature: the softmax temperature of that term (> 0; lower: more weight on near neighbours).
        matryoshka_dims: nested output sizes, increasing and ending at ``out_dim`` (e.g. ``[32, 64, 128, 256]``):
            the loss is summed over the prefixes ``z[:, :k]``, so that the first k outputs are each an embedding
            on their own; the one export then gives them with ``SentenceTransformer(DIR, truncate_dim=k)``
            (truncated after its Normalize: compare them by cosine, or pass ``normalize_embeddings=True``).
            None: the whole output only.
        init: how a linear head starts on a fresh run (skipped when resuming from a checkpoint): ``random``;
            ``pca``, the PCA projection of the training sentences' teacher embeddings; ``truncation``, the first
            ``out_dim`` teacher dimensions (``W = [I | 0]``, exactly the truncation baseline); ``best``, whichever
            of ``pca`` and ``truncation`` scores higher on the ``init_dev`` dev pairs (the mean over the
            ``matryoshka_dims`` prefixes when given).
        init_dev: what ``init: best`` is chosen on: an STS task with a dev split (``stsb``, ``sickr``: its dev
            split) or a TSV path (``sentence1, sentence2, score``). Never a test split.
        init_data_root: the folder ``init_dev`` is read from; None takes the datamodule's ``data_root``.
        cache_teacher: embed each training sentence once, up front (needs a datamodule with ``sentence_ids``).
        cache_path: a ``.safetensors`` file for that cache; reused when it was written for the same teacher,
            pooler, max_length and sentences, rewritten otherwise.
        attn_implementation: e.g. ``sdpa``; None keeps the model's default.
        lr: peak learning rate; higher than :class:`EmbeddingModule`'s default, since the head trains from scratch.
        **kwargs: the options every EmbeddingModule shares, defined there: ``weight_decay``, ``warmup_ratio``,
            ``check_finite_every_n_steps``, ``max_mean_cosine`` (a non-finite loss names the batch, the coding rates
            and the smallest group).
    """

    MEMO_SIZE = 4  #: teacher outputs of this many distinct id lists are kept by :meth:`encode_ids`
    MEMO_MAX_ROWS = 50_000  #: ... when they hold at most this many sentences

    def __init__(
        self,
        model_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2",
        pooler: str = "mean",
        max_length: int = 256,
        out_dim: int = 128,
        hidden_dim: int | None = None,
        activation: Literal["relu", "gelu", "tanh"] = "gelu",
        normalize_input: bool = True,
        in_dim: int | None = None,
        grouping: Grouping = "pairs",
        num_clusters: int = 64,
        kmeans_seed: int = 0,
        eps2: float = 0.5,
        gamma: float = 1.0,
        distill_weight: float = 0.0,
        init: Init = "random",
        cache_teacher: bool = True,
        cache_path: str | None = None,
        attn_implementation: str | None = None,
        mcr2_weight: float = 1.0,
        listwise_weight: float = 0.0,
        listwise_temperature: float = 0.05,
        matryoshka_dims: list[int] | None = None,
        init_dev: str = "stsb",
        init_data_root: str | None = None,
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        check_options(grouping=grouping, init=init, hidden_dim=hidden_dim, eps2=eps2, gamma=gamma,
                      distill_weight=distill_weight, mcr2_weight=mcr2_weight, listwise_weight=listwise_weight,
                      listwise_temperature=listwise_temperature, matryoshka_dims=matryoshka_dims, out_dim=out_dim,
                      num_clusters=num_clusters)
        self.save_hyperparameters()
        self.encoder = Encoder(model_name_or_path, pooler, "none", max_length, attn_implementation)
        self.encoder.requires_grad_(False).eval()  # frozen teacher (docs/pitfalls.md #2)
        if in_dim is not None and in_dim != self.encoder.dim:
            raise ValueError(
                f"configuration error: model.in_dim is {in_dim} but the teacher {model_name_or_path!r} gives "
                f"{self.encoder.dim}-d embeddings; set model.in_dim to {self.encoder.dim} (or null to take the "
                "teacher's size)"
            )
        if init != "random" and out_dim > self.encoder.dim:
            raise ValueError(f"model.init {init!r} gives at most {self.encoder.dim} dims (the teacher's); "
                             f"model.out_dim is {out_dim}")
        self.head = ProjectionHead(self.encoder.dim, out_dim, hidden_dim, activation, normalize_input)
        self.grouping, self.num_clusters, self.kmeans_seed = grouping, num_clusters, kmeans_seed
        self.eps2, self.gamma, self.distill_weight = eps2, gamma, distill_weight
        self.mcr2_weight, self.listwise_weight, self.listwise_temperature = mcr2_weight, listwise_weight, \
            listwise_temperature
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims is not None else None
        self.init, self.cache_teacher, self.cache_path = init, cache_teacher, cache_path
        self.init_dev, self.init_data_root = init_dev, init_data_root
        self.init_scores: dict[str, float] = {}  #: STS dev score of each candidate of ``init: best``
        self._cache_ND: Tensor | None = None  # teacher embedding of every training sentence (not checkpointed)
        self._clusters_N: Tensor | None = None
        self._teacher_memo: dict[int, Tensor] = {}


    # ------------------------------------------------------------------------------ the family's answers
    @classmethod
    def run_tags(cls, init_args: Mapping) -> list[str]:
        grouping = init_args.get("grouping")
        return super().run_tags(init_args) + ([f"grouping:{grouping}"] if grouping else [])

    @property
    def embedding_dim(self) -> int:
        return self.head.out_dim

    def card_method(self, data: dict | None = None) -> tuple[str, list[tuple[str, str]]]:
        """The head (sizes, grouping, loss weights, init) on its teacher."""
        hp, enc = dict(self.hparams), self.encoder
        grouping = self.grouping + (f" (k = {self.num_clusters})" if self.grouping == "kmeans" else "")
        return "MCR2 projection head on a frozen teacher", [
            ("output dim", f"{hp.get('in_dim') or enc.dim} -> {hp.get('out_dim')}"
             + (f" (hidden {hp['hidden_dim']})" if hp.get("hidden_dim") else " (linear)")),
            ("grouping", grouping), ("eps2", f"{self.eps2:g}"), ("gamma", f"{self.gamma:g}"),
            ("distillation weight", f"{self.distill_weight:g}"), ("head init", str(hp.get("init"))),
            ("teacher pooler", md_code(enc.pooler)), ("max_length", str(enc.max_length))]

    # ----------------------------------------------------------------------------------------- frozen teacher
    def train(self, mode: bool = True) -> MCR2Module:
        super().train(mode)
        self.encoder.eval()  # Lightning (and any .train() call) must never switch the teacher to train mode
        return self

    # -------------------------------------------------------------------------------------------- inference
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 128) -> Tensor:
        """Compressed embeddings (N, K) on CPU (float32, not normalised; the export ends with Normalize).

        The frozen teacher's output for the last few distinct id lists is memoised, so an evaluation callback
        scoring the same dev set every N steps runs the teacher once and only the head afterwards.
        """
        if len(ids) > self.MEMO_MAX_ROWS:  # a corpus, not a dev set: nothing kept
            return self.project(self.encoder.encode_ids(ids, batch_size=batch_size))
        key = hash(tuple(map(tuple, ids)))
        teacher_ND = self._teacher_memo.pop(key, None)
        if teacher_ND is None:
            teacher_ND = self.encoder.encode_ids(ids, batch_size=batch_size)
        self._teacher_memo[key] = teacher_ND  # most recent last
        while len(self._teacher_memo) > self.MEMO_SIZE:
            self._teacher_memo.pop(next(iter(self._teacher_memo)))
        return self.project(teacher_ND)

    @torch.inference_mode()
    def project(self, teacher_ND: Tensor) -> Tensor:
        """Apply the head to teacher embeddings (any device); returns (N, K) float32 on CPU."""
        device = next(self.head.parameters()).device
        return self.head(teacher_ND.to(device)).float().cpu()

    def embed_batch(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_BD = self.encoder(input_ids, attention_mask)
        return self.head(teacher_BD)

    def extra_st_modules(self) -> list[nn.Module]:
        """The head as sentence-transformers modules: [Normalize] + one Dense per Linear (linear: Identity
        activation, docs/pitfalls.md #7; MLP: the hidden Dense carries the activation)."""
        from lightning_modules.components.st_modules import st_modules  # ~3 s to import: only exporting needs it

        Dense, Normalize = st_modules().Dense, st_modules().Normalize

        modules: list[nn.Module] = [Normalize()] if self.head.normalize_input else []
        for linear, activation in self.head.dense_layers():
            modules.append(Dense(linear.in_features, linear.out_features, activation_function=type(activation)(),
                                 init_weight=linear.weight.detach().float().cpu().clone(),
                                 init_bias=linear.bias.detach().float().cpu().clone()))
        return modules

    # ------------------------------------------------------------------------------------ once, at fit start
    def on_fit_start(self) -> None:
        fresh = self.trainer.ckpt_path is None
        kmeans = self.grouping == "kmeans" and self.mcr2_weight > 0
        needs = {"cache_teacher": self.cache_teacher, "grouping 'kmeans'": kmeans,
                 f"init {self.init!r}": fresh and self.init in ("pca", "best")}
        dm = getattr(self.trainer, "datamodule", None)
        self.check_groups(dm)
        if any(needs.values()):
            if not hasattr(dm, "sentence_ids"):
                required = [k for k, v in needs.items() if v and k != "cache_teacher"]
                if required:
                    raise DataError(f"model {' and '.join(required)} needs every training sentence up front: use "
                                    f"datamodules.GroupedTextDataModule (got {type(dm).__name__})")
                rank_zero_warn(f"{type(dm).__name__} does not list its sentences: the teacher runs on every batch")
            else:
                self._cache_ND = self.teacher_cache(dm.sentence_ids()).to(self.device)
        if kmeans and self._cache_ND is not None:
            clusters = kmeans_groups(self._cache_ND, self.num_clusters, self.kmeans_seed) if self.global_rank == 0 \
                else None
            self._clusters_N = self.trainer.strategy.broadcast(clusters, src=0).to(self.device)
        if fresh and self.init != "random":
            state = None
            if self.global_rank == 0:
                state = self.initial_head_state(getattr(dm, "data_root", None))
            self.head.load_state_dict(self.trainer.strategy.broadcast(state, src=0))

    def check_groups(self, dm) -> None:
        """A DataError naming ``model.grouping`` and the datamodule when its rows cannot give the groups the MCR2 term
        needs: before training, not at its first step (e.g. a recipe's datamodule of plain sentences under a model
        switched to MCR2Module, whose default grouping is 'pairs')."""
        if not self.mcr2_weight:
            return
        views = getattr(dm, "views", None)
        if self.grouping == "pairs" and views is not None and views < 2:
            raise DataError(f"model.grouping 'pairs' needs rows of at least 2 sentences, but {type(dm).__name__} "
                            f"gives rows of {views}: use datamodules.GroupedTextDataModule with data.columns, e.g. "
                            "[sent0, sent1] for NLI (premise, entailment), or model.grouping kmeans")
        if self.grouping == "labels" and getattr(dm, "label_column", None) is None:
            raise DataError(f"model.grouping 'labels' needs labelled rows, and the rows of {type(dm).__name__} carry "
                            "no label: set data.label_column of datamodules.GroupedTextDataModule")

    def initial_head_state(self, data_root: str | None = None) -> dict[str, Tensor]:
        """The head's starting weights for ``init`` (``pca``, ``truncation`` or ``best``), on CPU.

        ``best`` scores both candidates on the ``init_dev`` pairs (Spearman x 100 of cosine, the mean over the
        ``matryoshka_dims`` prefixes) and keeps the higher; the scores stay in :attr:`init_scores`.
        """
        candidates: dict[str, dict[str, Tensor]] = {}
        if self.init in ("truncation", "best"):
            self.head.init_truncation()
            candidates["truncation"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.init in ("pca", "best"):
            explained = self.head.init_pca(self._cache_ND)
            rank_zero_info(f"PCA head: {float(explained):.1%} of the training sentences' variance kept")
            candidates["pca"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        choice = self.init
        if self.init == "best":
            self.init_scores = {name: self.dev_score(state, data_root) for name, state in candidates.items()}
            choice = max(self.init_scores, key=self.init_scores.get)
            scores = ", ".join(f"{k} {v:.2f}" for k, v in self.init_scores.items())
            rank_zero_info(f"head initialised by {choice} (STS dev Spearman x 100 on {self.init_dev}: {scores})")
        return candidates[choice]

    def dev_score(self, state: dict[str, Tensor], data_root: str | None = None) -> float:
        """Spearman x 100 of cosine on the ``init_dev`` pairs of the head with weights ``state`` (the mean over the
        ``matryoshka_dims`` prefixes when given: :attr:`selection_dims`, as checkpoints are selected). The teacher's
        output is memoised (:meth:`encode_ids`)."""
        root = self.init_data_root if self.init_data_root is not None else data_root
        try:
            pairs = load_sts(self.init_dev, "dev", root)
        except Exception as err:  # DataError, or the hub being unreachable offline
            raise ValueError(f"model.init 'best' is chosen on model.init_dev {self.init_dev!r} (read from "
                             f"{root or '.'}; model.init_data_root), which could not be loaded: {err}") from err
        self.head.load_state_dict(state)
        index = SentenceIndex([pairs])
        return index.score(self.encode(index.sentences), pairs, self.selection_dims)

    def teacher_cache(self, ids: Sequence[Sequence[int]]) -> Tensor:
        """Teacher embeddings (N, D) of ``ids``, read from ``cache_path`` when it matches, else computed once."""

        h = hashlib.sha256(f"{self.hparams.model_name_or_path}|{self.encoder.pooler}|{self.encoder.max_length}"
                           .encode())
        for row in ids:
            h.update(array("q", row).tobytes() + b"|")
        fingerprint = h.hexdigest()
        path = Path(self.cache_path) if self.cache_path else None
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    cached = f.get_tensor("embeddings")
                    if cached.shape == (len(ids), self.encoder.dim):
                        rank_zero_info(f"teacher embeddings read from {path}")
                        return cached
            rank_zero_warn(f"{path} was written for another teacher or other sentences: recomputing it")
        embeddings = self.encoder.encode_ids(ids)
        if path is not None and self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": embeddings}, str(path), metadata={"fingerprint": fingerprint})
            readable_as_umask(path)  # save_file makes it 0600
        return embeddings

    # ------------------------------------------------------------------------------------------------ training
    def teacher_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """(B * V, D) teacher embeddings of a batch, row ``b * V + v``: from the cache, else a no-grad forward."""
        B, V, L = batch["input_ids"].shape
        if self._cache_ND is not None and "index" in batch:
            flat_N = (batch["index"][:, None] * V + torch.arange(V, device=batch["index"].device)).reshape(-1)
            return self._cache_ND[flat_N]
        with torch.no_grad():
            return self.encoder(batch["input_ids"].reshape(B * V, L), batch["attention_mask"].reshape(B * V, L))

    def batch_groups(self, batch: dict[str, Tensor]) -> GroupLayout | int:
        """How the gathered rows fall into groups, or the group size V when each row is one group."""
        B, V, _ = batch["input_ids"].shape
        if self.grouping == "pairs":
            if V < 2:
                raise ValueError("model.grouping 'pairs' needs rows of at least 2 sentences: set data.columns, "
                                 "e.g. [sent0, sent1] for NLI (premise, entailment)")
            return V
        if self.grouping == "labels":
            if "group" not in batch:
                raise ValueError("model.grouping 'labels' needs labelled rows: set data.label_column")
            groups_B = batch["group"]
        else:
            if self._clusters_N is None or "index" not in batch:
                raise ValueError("model.grouping 'kmeans' needs datamodules.GroupedTextDataModule (row indices)")
            groups_B = self._clusters_N[batch["index"][:, None] * V + torch.arange(V, device=self.device)]
        groups_N = groups_B.reshape(B, -1).expand(B, V).reshape(-1)
        if self.trainer.world_size > 1:
            groups_N = self.all_gather(groups_N).reshape(-1)
        return group_layout(groups_N, self.num_groups())

    def num_groups(self) -> int | None:
        """K, how many groups the rows can fall into (k-means clusters, or the datamodule's labels), so that the
        loss can lay them out without a host sync; None when unknown."""
        if self.grouping == "kmeans":
            return self.num_clusters
        labels = getattr(getattr(self.trainer, "datamodule", None), "label_names", None)
        return len(labels) if labels else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher_ND = self.teacher_embeddings(batch)
        z_GK, _ = self.gather(self.head(teacher_ND))
        self.guard.note_embeddings(z_GK, self.global_step)
        distilled = self.distill_weight or self.listwise_weight
        teacher_GD = self.gather(teacher_ND)[0] if distilled else None
        groups = self.batch_groups(batch) if self.mcr2_weight else 1  # no rates without the MCR2 term
        terms = dict(eps2=self.eps2, gamma=self.gamma, teacher_MD=teacher_GD, distill_weight=self.distill_weight,
                     listwise_weight=self.listwise_weight, temperature=self.listwise_temperature,
                     mcr2_weight=self.mcr2_weight)
        if self.matryoshka_dims:
            out = matryoshka_mcr2_loss(z_GK, groups, self.matryoshka_dims, **terms)
        else:
            out = mcr2_loss(z_GK, groups, **terms)
        self.note_loss(out, teacher_ND, batch_idx)
        B = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, batch_size=B)  # no prog_bar: see callbacks/progress.py
        if self.mcr2_weight:
            self.log_dict({"train/rate": out.rate, "train/rate_c": out.rate_c, "train/delta_r": out.delta_r},
                          batch_size=B)
        if self.distill_weight:
            self.log("train/distill", out.distill, batch_size=B)
        if self.listwise_weight:
            self.log("train/listwise", out.listwise, batch_size=B)
        return out.loss

    # ----------------------------------------------------------------------------------- non-finite losses
    def note_loss(self, out: MCR2Output, teacher_ND: Tensor, batch_idx: int) -> None:
        """Record the loss with what explains a non-finite one (kept on the device: no host sync)."""
        dev = out.loss.device
        where = [torch.full((), float(v), device=dev) for v in (batch_idx, self.current_epoch)]
        extra = torch.stack(where + [out.rate, out.rate_c, out.distill, out.smallest_group.float(),
                                     torch.isfinite(teacher_ND).all().float(), out.listwise])
        self.guard.note_loss(out.loss, self.global_step, extra)

    def on_train_epoch_end(self) -> None:
        self.check_divergence()

    def divergence_causes(self, event) -> list[str]:
        if event.kind != "loss" or len(event.extra) != 8:
            return super().divergence_causes(event)
        batch_idx, epoch, rate, rate_c, distill, smallest, teacher_ok, listwise = event.extra
        causes = [f"at batch {int(batch_idx)} of epoch {int(epoch)}, R = {rate:.4g}, R_c = {rate_c:.4g}, "
                  f"distillation = {distill:.4g}, listwise = {listwise:.4g}, smallest group {int(smallest)} "
                  "sample(s)"]
        if not teacher_ok:
            causes.append("the teacher embeddings themselves hold NaN/Inf (fp16 overflow in the teacher, or a "
                          "corrupt cache_path file)")
        if not self.mcr2_weight:
            if self.listwise_weight:
                causes.append(f"listwise_temperature = {self.listwise_temperature} may be too small for float32 "
                              "softmax logits (raise it)")
            return causes + super().divergence_causes(event)
        scale = self.head.out_dim / (max(smallest, 1) * self.eps2)
        causes.append(f"eps2 = {self.eps2} may be too small: the largest scale d / (m_j eps2) in the batch is "
                      f"{scale:.3g}, and float32 Cholesky fails when it is large and rows repeat (raise eps2)")
        if smallest <= 1:
            causes.append("the batch has groups of one sample, which get that largest scale (use larger groups, "
                          "fewer k-means clusters or a larger batch)")
        return causes + super().divergence_causes(event)
