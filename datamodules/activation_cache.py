"""The activation cache's format: a folder of shards of a text encoder's vectors, with named metadata columns.

A cache is a folder of shards (memory-mapped ``.npy`` arrays) written once per (model, layer, text source, ...)::

    <cache>/identity.json                 what the vectors are (model + fingerprint of its files, layer, level,
                                          max_length, special-token policy, source); written first
    <cache>/shard_00000.vectors.npy       (n, D) float16/float32, in text order
    <cache>/shard_00000.meta.npy          (n, 6) int32: META_COLUMNS below; written after the vectors
    <cache>/texts.jsonl                   one JSON line per sentence: id, text (Brown: words, tags, file, category)
    <cache>/meta.json                     written last: identity + counts + build statistics; its presence marks
                                          the cache complete

The folder name under ``cache_dir`` carries a hash of the identity, so a different model, layer or source gets a
new cache; an explicit ``cache_path`` whose ``identity.json`` differs raises
:class:`~core.errors.DataError` listing the differing fields (never silently reused). An
interrupted build resumes at the first missing shard.

Token-level vectors: ``hidden_states[layer]`` (0 = embeddings output, i = layer i) at every non-padding position;
special tokens ([CLS], [SEP], <s>, ...) and ``text_prefix`` tokens are dropped (``special_tokens='drop'``) or kept
with the tag ``SPECIAL``. Brown sentences are tokenised word by word (``is_split_into_words=True``); each wordpiece
gets its word's universal tag, its word index and whether it is the word's first piece. Sentence-level vectors pool
``hidden_states[layer]`` over all real tokens (``mean`` includes [CLS]/[SEP], as sentence-transformers does).
"""


from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from core.errors import DataError, read_json
from datamodules.brown import UNIVERSAL_TAGS

FORMAT_VERSION = 1
#: Tag ids stored per token vector index into this tuple; -1 = no tag (text without POS annotation).
POS_TAGS = (*UNIVERSAL_TAGS, "SPECIAL")
SPECIAL = POS_TAGS.index("SPECIAL")
#: Columns of ``shard_*.meta.npy``; -1 where not applicable (sentence-level vectors have only ``sentence_id``).
META_COLUMNS = ("sentence_id", "position", "token_id", "word_index", "pos_tag", "first_piece")
#: Indices of the metadata columns, by name (``meta[:, META_TAG]``)
META_SENTENCE, META_POSITION, META_TOKEN, META_WORD, META_TAG, META_FIRST_PIECE = range(len(META_COLUMNS))

Level = Literal["token", "sentence"]


def default_cache_dir() -> str:
    return os.environ.get("EMBEDLAB_CACHE", str(Path.home() / ".cache" / "embedlab" / "activations"))


def identity_diff(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts."""
    diffs = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {a!r}, requested {b!r}")
    return diffs


# ---------------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive lock on ``<folder>.lock`` (flock: released by the kernel when the process dies, so a
    killed builder never leaves a stale lock). A second builder of the same cache waits here, then finds it built."""

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rank_zero_info(f"activation cache {folder}: another process is building it; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ActivationCache:
    """A complete cache folder: memory-mapped shards, row offsets, per-vector metadata, the sentences."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.folder} is not a complete activation cache (no meta.json)")
        self.meta = read_json(meta_file, "the cache's meta.json", f"delete {self.folder} to rebuild the cache")
        self.shards = [s["name"] for s in self.meta["shards"]]
        counts = [s["n_vectors"] for s in self.meta["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.dim: int = self.meta["dim"]
        self._vectors: list[np.ndarray] | None = None
        self.vectors()  # opens every shard now: a truncated or missing one is named here, not mid-training
        self.rows: np.ndarray | None = None
        """Cache rows of a view (:meth:`sample_sentences`); None for the whole cache."""

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.rows is None else len(self.rows)

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memory maps instead of pickling them
        return {**self.__dict__, "_vectors": None}

    def vectors(self) -> list[np.ndarray]:
        """The memory-mapped shards of the whole cache, a view's rows or not (read a view with :meth:`gather`)."""
        if self._vectors is None:
            self._vectors = [self._open(f"{s}.vectors.npy", (n, self.dim))
                             for s, n in zip(self.shards, np.diff(self.offsets).tolist())]
            for s, n in zip(self.shards, np.diff(self.offsets).tolist()):
                self._open(f"{s}.meta.npy", (n, len(META_COLUMNS)))
        return self._vectors

    def _open(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A shard memory-mapped, checked against the shape meta.json records (a DataError naming it if not)."""
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:  # missing, truncated ("mmap length is greater..."), garbage
            raise DataError(f"{path}: missing, truncated or damaged shard of the activation cache ({err}); delete "
                            f"{self.folder} to rebuild the cache") from None
        if array.shape != shape:
            raise DataError(f"{path}: holds {array.shape}, meta.json says {shape}; delete {self.folder} to rebuild "
                            "the cache")
        return array

    def gather(self, rows: np.ndarray) -> Tensor:
        """Vectors at ``rows`` (of this view, when it is one) as a float32 (len(rows), D) tensor, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        order = np.argsort(rows, kind="stable")  # read each shard in increasing row order (page-cache friendly)
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        vecs = self.vectors()
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for s in range(len(self.shards)):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                out[order[lo:hi]] = vecs[s][sorted_rows[lo:hi] - self.offsets[s]]
        return torch.from_numpy(out)

    def metadata(self) -> np.ndarray:
        """(N, 6) int32 array of :data:`META_COLUMNS` for every vector, in row order."""
        meta = np.concatenate([np.load(self.folder / f"{s}.meta.npy") for s in self.shards])
        return meta if self.rows is None else meta[self.rows]

    def sample_sentences(self, max_rows: int, seed: int = 0) -> ActivationCache:
        """A view of whole sentences taken in a random (seeded) order, each one kept when it still fits in
        ``max_rows`` vectors, then put back in cache order (so every genre of an ordered corpus like Brown is
        represented). Nothing is copied; row ``i`` of the view is row ``view.rows[i]`` of the cache, and
        ``sentences()`` still lists every sentence."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_rows >= len(self):
            return self
        sid = self.metadata()[:, META_SENTENCE]
        ids, counts = np.unique(sid, return_counts=True)
        room, chosen = max_rows, []
        for i in np.random.default_rng(seed).permutation(len(ids)).tolist():  # 57k sentences: ~20 ms
            if counts[i] <= room:
                chosen.append(ids[i])
                room -= int(counts[i])
        if not chosen:
            raise ValueError(f"{self.folder}: every sentence has more than max_rows={max_rows} vectors")
        local = np.flatnonzero(np.isin(sid, chosen))
        view = copy.copy(self)
        view.rows = local if self.rows is None else self.rows[local]
        return view

    def sentences(self) -> list[dict]:
        with (self.folder / "texts.jsonl").open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]

