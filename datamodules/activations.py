"""The SAE's training data: vectors of an activation cache (built on first use) streamed in shuffled batches of
whole rows, with held-out sentences for validation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoConfig

from core.errors import DataError, read_json
from datamodules.activation_builder import (
    CacheBuilder,
    Corpus,
    check_layer,
    load_corpus,
    load_pretrained_tokenizer,
    model_fingerprint,
    model_folder,
)
from datamodules.activation_cache import (
    FORMAT_VERSION,
    META_SENTENCE,
    ActivationCache,
    Level,
    build_lock,
    default_cache_dir,
    identity_diff,
)
from datamodules.base import ResumesMidEpoch


# ------------------------------------------------------------------------------------------------- several layers
def prepare_layers(dms: Sequence[ActivationsDataModule]) -> list[ActivationsDataModule]:
    """Build the missing caches of datamodules that differ only in their layer from ONE forward pass over the corpus
    (sparsify's several ``hookpoints``): the encoder runs once per batch for all of them instead of once per layer.
    Each cache is the one its datamodule alone would build (same folder, identity and vectors), reusable alone.
    Returns the datamodules, set up."""
    dms = list(dms)
    if not dms:
        return dms
    base = {k: v for k, v in dms[0].identity().items() if k != "layer"}
    for dm in dms[1:]:
        other = {k: v for k, v in dm.identity().items() if k != "layer"}
        if other != base:
            raise DataError("prepare_layers: the datamodules differ in more than their layer: "
                            + "; ".join(identity_diff(other, base)))
    todo: dict[Path, ActivationsDataModule] = {}
    for dm in dms:
        folder = dm.cache_folder()
        dm._check_identity(folder)
        if not (folder / "meta.json").is_file():
            todo.setdefault(folder, dm)
    if todo:
        with contextlib.ExitStack() as locks:
            for folder in todo:
                locks.enter_context(build_lock(folder))
            todo = {f: dm for f, dm in todo.items() if not (f / "meta.json").is_file()}  # another process built it
            if todo:
                first = next(iter(todo.values()))
                builder = first._builder(first._device(), [dm.identity()["layer"] for dm in todo.values()])
                builder.build_many(first.corpus() if first._partial is None else first.corpus().head(first._partial),
                                   list(todo), [dm.cache_identity() for dm in todo.values()], first.shard_sentences)
                for dm in todo.values():
                    dm.built_here = True
    for dm in dms:
        dm.setup()
    return dms


# ---------------------------------------------------------------------------------------------------- streaming
def held_out(sentence_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic validation membership per sentence: Knuth's multiplicative hash of the id, scaled to [0, 1),
    below ``fraction`` (spread over the whole corpus, independent of its order and of the seed)."""
    h = (sentence_ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return h.astype(np.float64) / 2**32 < fraction


class VectorBatches(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[row_ids] -> (len(row_ids), D)`` float32."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, rows: np.ndarray) -> Tensor:
        return self.cache.gather(rows)


class BatchRowSampler(DistributedSampler):
    """Yields arrays of row ids, one per batch: a fresh permutation of ``rows`` each epoch (``set_epoch``, called by
    Lightning), split by batches across ranks so every rank gets the same number of full batches.

    It is a ``DistributedSampler`` so that Lightning does not wrap it in another one under DDP.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 rank: int = 0, world: int = 1) -> None:
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.drop_last, self.rank, self.num_replicas, self.epoch = drop_last, rank, world, 0
        self.skip = 0  # batches of the next epoch already trained on by an interrupted run
        n_batches = len(rows) // batch_size if drop_last or world > 1 else -(-len(rows) // batch_size)
        self.n_local = n_batches // world

    def __len__(self) -> int:
        return self.n_local

    def __iter__(self):
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng([self.seed, self.epoch]).permutation(len(rows))]
        skip, self.skip = self.skip, 0
        for j in range(skip, self.n_local):
            i = j * self.num_replicas + self.rank
            yield rows[i * self.batch_size : (i + 1) * self.batch_size]


class ActivationsDataModule(ResumesMidEpoch, pl.LightningDataModule):
    """Encoder activations (token or sentence vectors) for sparse autoencoders, cached on disk.

    ``prepare_data`` (rank 0) builds or resumes the cache; ``setup`` opens it and checks its identity; batches are
    float32 (batch_size, D) tensors of vectors drawn without replacement in a fresh random order each epoch.
    Validation holds out whole sentences, a fixed pseudo-random ``val_fraction`` of them (:func:`held_out`).

    A smoke run (``fast_dev_run``, or an int ``limit_train_batches``) whose cache is not built yet does not encode
    the whole corpus: it builds a partial cache of the first sentences that give it the training and held-out
    vectors it reads (:meth:`plan`), in a folder of its own whose identity names the sentence count, so that no full
    run reuses it. A full cache already built is used as it is.

    Args:
        model_name_or_path: encoder, hub name or local folder (``sentence-transformers/all-MiniLM-L6-v2`` loads
            offline from its pip package).
        source: ``brown`` (Brown Corpus with universal POS tags, from ``data_root``), an STS task (``stsb``,
            ``sts12``-``sts16``, ``sickr``; ``split`` picks train/dev/test), a ``.txt``/``.csv``/``.tsv`` file, a
            ``save_to_disk`` folder, or a Hugging Face dataset name.
        column: text column of CSV/TSV files and datasets.
        split: dataset split. subset: dataset configuration name. data_files: files inside a hub dataset.
        data_root: folder relative paths and ``brown`` are resolved against (e.g. ``../shared/data``).
        level: ``token`` (one vector per kept token) or ``sentence`` (one pooled vector per sentence).
        layer: ``hidden_states`` index: 0 = embeddings output, i = output of layer i, -1 = last layer.
        pooling: sentence level: ``mean`` (over all real tokens, [CLS]/[SEP] included) or ``cls``.
        normalize: sentence level: L2-normalise pooled vectors (as a sentence-transformers ``Normalize`` module).
        special_tokens: token level: ``drop`` special and ``text_prefix`` tokens, or ``keep`` them (tag SPECIAL).
            Padding is never kept.
        max_length: tokens per sentence (truncation; truncated Brown sentences are counted in ``meta.json``).
        text_prefix: prepended to every sentence (e5 models expect ``"query: "`` or ``"passage: "``).
        max_sentences: use only the first N sentences of the source.
        skip_empty: drop empty lines / rows of a text, CSV or TSV source (with a warning giving the count) instead
            of raising an error naming the first one.
        cache_dir: parent folder of automatically named caches; default ``$EMBEDLAB_CACHE`` or
            ``~/.cache/embedlab/activations``.
        cache_path: an explicit cache folder instead (its identity is checked).
        cache_dtype: ``float16`` (half the disk and memory) or ``float32``.
        shard_sentences: sentences per shard (the unit of resumption).
        encode_batch_size: sentences per forward pass while caching.
        encode_device: device for caching; ``auto`` = CUDA when available.
        batch_size: vectors per training batch on each process.
        shuffle: shuffle training vectors each epoch.
        val_fraction: fraction of sentences held out for validation (0 = no validation data).
        seed: shuffling seed (epoch-dependent permutations).
        num_workers, pin_memory: DataLoader options.
    """

    def __init__(
        self,
        model_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2",
        source: str = "brown",
        column: str = "text",
        split: str = "train",
        subset: str | None = None,
        data_files: str | None = None,
        data_root: str | None = None,
        level: Level = "token",
        layer: int = -1,
        pooling: Literal["mean", "cls"] = "mean",
        normalize: bool = False,
        special_tokens: Literal["drop", "keep"] = "drop",
        max_length: int = 128,
        text_prefix: str = "",
        max_sentences: int | None = None,
        skip_empty: bool = False,
        cache_dir: str | None = None,
        cache_path: str | None = None,
        cache_dtype: Literal["float16", "float32"] = "float16",
        shard_sentences: int = 4096,
        encode_batch_size: int = 64,
        encode_device: str = "auto",
        batch_size: int = 4096,
        shuffle: bool = True,
        val_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if level not in ("token", "sentence"):
            raise DataError(f"level must be 'token' or 'sentence', got {level!r}")
        if pooling not in ("mean", "cls"):
            raise DataError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if special_tokens not in ("drop", "keep"):
            raise DataError(f"special_tokens must be 'drop' or 'keep', got {special_tokens!r}")
        if cache_dtype not in ("float16", "float32"):
            raise DataError(f"cache_dtype must be 'float16' or 'float32', got {cache_dtype!r}")
        if batch_size < 1 or shard_sentences < 1 or encode_batch_size < 1 or max_length < 2:
            raise DataError("batch_size, shard_sentences, encode_batch_size must be >= 1 and max_length >= 2")
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_sentences is not None and max_sentences < 1:
            raise DataError(f"max_sentences must be >= 1 or null (all sentences), got {max_sentences}")
        self.model_name_or_path, self.source, self.column, self.split = model_name_or_path, source, column, split
        self.subset, self.data_files, self.data_root = subset, data_files, data_root
        self.skip_empty = skip_empty
        self.level, self.layer, self.pooling, self.normalize = level, layer, pooling, normalize
        self.special_tokens, self.max_length, self.text_prefix = special_tokens, max_length, text_prefix
        self.max_sentences, self.cache_dtype, self.shard_sentences = max_sentences, cache_dtype, shard_sentences
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.cache_path = Path(cache_path) if cache_path else None
        for option, folder in (("data.cache_dir" if cache_dir else "EMBEDLAB_CACHE", self.cache_dir),
                               ("data.cache_path", self.cache_path)):
            existing = next((p for p in (folder, *folder.parents) if p.exists()), None) if folder else None
            if existing is not None and not existing.is_dir():  # the folder, or the nearest part of it that exists
                where = "" if existing == folder else f": {existing}"
                raise DataError(f"{option}={folder}{where} is a file, not a folder; activation caches are folders "
                                "(created when missing)")
        self.encode_batch_size, self.encode_device = encode_batch_size, encode_device
        self.batch_size, self.shuffle, self.val_fraction, self.seed = batch_size, shuffle, val_fraction, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache: ActivationCache | None = None
        self.built_here = False  #: whether this process encoded the cache (False: it existed, or another built it)
        self._identity: dict | None = None
        self._corpus: Corpus | None = None
        self._partial: int | None = None  #: sentences of a smoke run's partial cache (None: the whole corpus)
        self._planned = False

    # ------------------------------------------------------------------------------------------- identity
    def identity(self) -> dict:
        """What the cached vectors are; its hash names the cache folder."""
        if self._identity is None:
            folder = model_folder(self.model_name_or_path)
            config = AutoConfig.from_pretrained(folder)
            n_layers = getattr(config, "num_hidden_layers", None)
            if n_layers is None:
                raise DataError(f"{self.model_name_or_path}: its config has no num_hidden_layers")
            layer = check_layer(self.layer, n_layers, self.model_name_or_path)
            corpus = self.corpus()
            self._identity = {
                "format": FORMAT_VERSION,
                "model": self.model_name_or_path,
                "model_fingerprint": model_fingerprint(folder, self.cache_dir / "file_hashes.json"),
                "num_hidden_layers": n_layers,
                "layer": layer,
                "level": self.level,
                "pooling": self.pooling if self.level == "sentence" else None,
                "normalize": self.normalize if self.level == "sentence" else None,
                "special_tokens": self.special_tokens if self.level == "token" else None,
                "max_length": self.max_length,
                "text_prefix": self.text_prefix,
                "dtype": self.cache_dtype,
                "source": {"source": self.source, "column": self.column, "split": self.split, "subset": self.subset,
                           "data_files": self.data_files, "max_sentences": self.max_sentences,
                           **({"skip_empty": True} if self.skip_empty else {}),  # older caches keep their key
                           "n_sentences": len(corpus), "fingerprint": corpus.fingerprint},
            }
        return self._identity

    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.source, self.data_root, self.column, self.split, self.subset,
                                       self.data_files, self.max_sentences, self.skip_empty)
            if not len(self._corpus):
                raise DataError(f"{self.source}: no sentences")
        return self._corpus

    def full_cache_folder(self) -> Path:
        """The folder of the cache of the whole corpus (``cache_path``, else named after the identity's hash)."""
        if self.cache_path is not None:
            return self.cache_path
        ident = self.identity()
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.model_name_or_path).name).strip("-")
        return self.cache_dir / f"{slug}_{self.level}_L{ident['layer']}_{key}"

    def cache_folder(self) -> Path:
        """The cache this run reads: the full one, or a smoke run's partial one beside it (:meth:`plan`)."""
        self.plan()
        full = self.full_cache_folder()
        return full if self._partial is None else full.with_name(f"{full.name}_partial{self._partial}")

    def cache_identity(self) -> dict:
        """The identity of :meth:`cache_folder`: a partial cache's names its sentence count, so that neither a
        full run nor a smoke run of another size ever takes it for its own."""
        ident = self.identity()
        return ident if self._partial is None else {**ident, "partial_sentences": self._partial}

    # ------------------------------------------------------------------------------------------ smoke runs
    def smoke_needs(self) -> tuple[int, int] | None:
        """(training, held-out) vectors a run reading a fixed number of batches needs, None for a full run: with
        ``fast_dev_run`` or an int ``limit_train_batches``, one epoch's worth of training vectors (later epochs
        reshuffle them) and held-out vectors in the ``val_fraction`` proportion, at least one (a whole batch per
        process under DDP, whose validation batches are whole)."""
        trainer = self.trainer
        limit = getattr(trainer, "limit_train_batches", None)
        if trainer is None or isinstance(limit, bool) or not isinstance(limit, int):
            return None
        world = trainer.world_size
        train = limit * self.batch_size * world
        if self.val_fraction == 0:
            return train, 0
        val = max(1, int(train * self.val_fraction / (1 - self.val_fraction)))
        return train, max(val, self.batch_size * world) if world > 1 else val

    def plan(self) -> None:
        """Decide once whether this run reads a partial cache: a smoke run (:meth:`smoke_needs`) whose full cache
        is not built yet encodes only the first sentences that give it enough training and held-out vectors."""
        if self._planned or self.trainer is None:
            return
        self._planned = True
        needs = self.smoke_needs()
        if needs is None or (self.full_cache_folder() / "meta.json").is_file():
            return
        corpus, builder = self.corpus(), self._builder("cpu")
        builder.tokenizer = load_pretrained_tokenizer(self.model_name_or_path)
        have, chunk = np.zeros(2, dtype=np.int64), 1024
        for start in range(0, len(corpus), chunk):
            idx = np.arange(start, min(start + chunk, len(corpus)))
            is_val = held_out(idx, self.val_fraction)
            n = builder.vectors_per_sentence(corpus, idx)
            got = have + np.stack([np.cumsum(np.where(is_val, 0, n)), np.cumsum(np.where(is_val, n, 0))], 1)
            enough = np.flatnonzero((got[:, 0] >= needs[0]) & (got[:, 1] >= needs[1]))
            if len(enough):
                if start + enough[0] + 1 < len(corpus):
                    self._partial = int(start + enough[0] + 1)
                    rank_zero_info(f"smoke run ({needs[0]:,} training vectors): the activation cache is built "
                                   f"from the first {self._partial:,} of {len(corpus):,} sentences, in a partial "
                                   "cache that full runs never use")
                return
            have = got[-1]

    def _builder(self, device: str, layers: Sequence[int] | None = None) -> CacheBuilder:
        ident = self.identity()
        return CacheBuilder(self.model_name_or_path, self.level, ident["layer"], self.pooling, self.normalize,
                            self.special_tokens, self.max_length, self.text_prefix, self.encode_batch_size, device,
                            self.cache_dtype, layers=layers)

    def _device(self) -> str:
        if self.encode_device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.encode_device

    def _check_identity(self, folder: Path) -> None:
        found_file = folder / "identity.json"
        if not found_file.is_file():
            if folder.exists() and any(folder.iterdir()):
                raise DataError(f"{folder} exists, is not empty and is not an activation cache (no identity.json)")
            return
        found = read_json(found_file, "the cache's identity.json", f"delete {folder} to rebuild the cache")
        diffs = identity_diff(found, self.cache_identity())
        if diffs:
            raise DataError(f"activation cache {folder} was built from different settings, refusing to reuse it: "
                            + "; ".join(diffs) + ". Choose another cache_path, or leave it unset to get one "
                            "folder per setting under cache_dir")

    # ------------------------------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        folder = self.cache_folder()
        self._check_identity(folder)
        if (folder / "meta.json").is_file():
            return
        device = self._device()
        with build_lock(folder):
            if (folder / "meta.json").is_file():  # built by another process while this one waited
                rank_zero_info(f"activation cache {folder}: built by another process, reusing it")
                return
            corpus = self.corpus() if self._partial is None else self.corpus().head(self._partial)
            self._builder(device).build(corpus, folder, self.cache_identity(), self.shard_sentences)
            self.built_here = True

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        folder = self.cache_folder()
        if not (folder / "meta.json").is_file():
            if self.trainer is not None and self.trainer.world_size > 1:
                raise DataError(f"activation cache {folder} is missing after prepare_data")
            self.prepare_data()
        self._check_identity(folder)
        self.cache = ActivationCache(folder)
        if self.cache.dim < 1 or len(self.cache) == 0:
            raise DataError(f"activation cache {folder} holds no vectors")
        sentence_ids = self.cache.metadata()[:, META_SENTENCE].astype(np.int64)
        is_val = held_out(sentence_ids, self.val_fraction)
        self.train_rows, self.val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    @property
    def dim(self) -> int:
        """Dimension of the vectors (after :meth:`setup`)."""
        self.setup()
        return self.cache.dim

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` training vectors drawn without replacement (the same on every rank for the same seed)."""
        self.setup()
        rng = np.random.default_rng(seed)
        rows = self.train_rows[rng.choice(len(self.train_rows), min(n, len(self.train_rows)), replace=False)]
        return self.cache.gather(rows)

    def _loader(self, rows: np.ndarray, shuffle: bool, drop_last: bool) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = BatchRowSampler(rows, self.batch_size, shuffle, self.seed, drop_last, rank, world)
        if len(sampler) == 0:
            raise DataError(f"{len(rows)} vectors make no full batch of {self.batch_size} on each of {world} "
                            "process(es): lower data.batch_size or add data")
        return DataLoader(VectorBatches(self.cache), sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        loader = self._loader(self.train_rows, self.shuffle, drop_last=True)
        if (resume := self.pop_resume()) is not None:
            loader.sampler.set_epoch(resume[0])
            loader.sampler.skip = resume[1]
        return loader

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if len(self.val_rows) == 0:
            return []
        return self._loader(self.val_rows, shuffle=False, drop_last=False)
