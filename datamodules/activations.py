"""Activation vectors of a text encoder, cached on disk and streamed in shuffled batches (an SAE's training data).

A cache is a folder of shards (memory-mapped ``.npy`` arrays) written once per (model, layer, text source, ...)::

    <cache>/identity.json                 what the vectors are (model + fingerprint of its files, layer, level,
                                          max_length, special-token policy, source); written first
    <cache>/shard_00000.vectors.npy       (n, D) float16/float32, in text order
    <cache>/shard_00000.meta.npy          (n, 6) int32: META_COLUMNS below; written after the vectors
    <cache>/texts.jsonl                   one JSON line per sentence: id, text (Brown: words, tags, file, category)
    <cache>/meta.json                     written last: identity + counts + build statistics; its presence marks
                                          the cache complete

The folder name under ``cache_dir`` carries a hash of the identity, so a different model, layer or source gets a
new cache; an explicit ``cache_path`` whose ``identity.json`` differs raises :class:`~datamodules.base.DataError`
listing the differing fields (never silently reused). An interrupted build resumes at the first missing shard.

Token-level vectors: ``hidden_states[layer]`` (0 = embeddings output, i = layer i) at every non-padding position;
special tokens ([CLS], [SEP], <s>, ...) and ``text_prefix`` tokens are dropped (``special_tokens='drop'``) or kept
with the tag ``SPECIAL``. Brown sentences are tokenised word by word (``is_split_into_words=True``); each wordpiece
gets its word's universal tag, its word index and whether it is the word's first piece. Sentence-level vectors pool
``hidden_states[layer]`` over all real tokens (``mean`` includes [CLS]/[SEP], as sentence-transformers does).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.base import (
    DataError,
    ResumesMidEpoch,
    StorageError,
    load_hub_dataset,
    looks_like_hub_name,
    read_json,
    resolve,
    why_write_failed,
    write_atomic,
)
from datamodules.brown import UNIVERSAL_TAGS, read_brown

FORMAT_VERSION = 1
#: Tag ids stored per token vector index into this tuple; -1 = no tag (text without POS annotation).
POS_TAGS = (*UNIVERSAL_TAGS, "SPECIAL")
SPECIAL = POS_TAGS.index("SPECIAL")
#: Columns of ``shard_*.meta.npy``; -1 where not applicable (sentence-level vectors have only ``sentence_id``).
META_COLUMNS = ("sentence_id", "position", "token_id", "word_index", "pos_tag", "first_piece")
MODEL_FILES = re.compile(r"(config\.json|tokenizer\.json|vocab\.txt|.*\.model|.*\.safetensors|pytorch_model.*\.bin)")

Level = Literal["token", "sentence"]


def default_cache_dir() -> str:
    return os.environ.get("EMBEDLAB_CACHE", str(Path.home() / ".cache" / "embedlab" / "activations"))


# ----------------------------------------------------------------------------------------------------- identity
def _sha256_file(path: Path, memo: dict | None = None) -> str:
    key = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if memo is not None:
        memo[key] = h.hexdigest()
    return h.hexdigest()


def model_folder(model_name_or_path: str) -> Path:
    """The local folder of a model: a path, an offline package (``resolve_model``) or the hub cache/download."""
    from lightning_modules.components.encoder import resolve_model

    resolved = resolve_model(model_name_or_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        from huggingface_hub import snapshot_download

        # config, tokenizer and safetensors weights only (sentence-transformers repos also hold onnx/openvino copies)
        common = ["*.json", "*.txt", "*.model", "tokenizer*"]
        folder = Path(snapshot_download(resolved, allow_patterns=[*common, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(resolved, allow_patterns=[*common, "pytorch_model*.bin"]))
        return folder
    except Exception as err:
        raise DataError(
            f"model {model_name_or_path!r} is not a local folder and the Hugging Face hub could not provide it "
            f"(offline, or a wrong name): {type(err).__name__}: {str(err)[:200]}"
        ) from None


def model_fingerprint(folder: Path, memo_file: Path | None = None) -> str:
    """sha256 over the config, tokenizer and weight files of a model folder (file hashes memoised by size+mtime)."""
    memo = {}
    if memo_file is not None and memo_file.is_file():
        try:  # a memo only: when damaged (a full disk, an old crash) the hashes are recomputed and it is rewritten
            memo = json.loads(memo_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            rank_zero_warn(f"{memo_file} is damaged (not JSON): the model files are hashed again and it is rewritten")
        memo = memo if isinstance(memo, dict) else {}
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and MODEL_FILES.fullmatch(p.name))
    if not any(p.name == "config.json" for p in files):
        raise DataError(f"{folder}: no config.json, not a Hugging Face model folder")
    for p in files:
        h.update(f"{p.name}:{_sha256_file(p, memo)}\n".encode())
    if memo_file is not None:
        write_atomic(memo_file, json.dumps(memo))  # two runs starting together must never see half of it
    return h.hexdigest()


def check_layer(layer: int, n_layers: int, model: str) -> int:
    """Index into ``hidden_states`` (n_layers + 1 entries) as a non-negative int, or a clear error."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise DataError(
            f"layer {layer} is out of range for {model}, which has {n_layers} layers: hidden_states has "
            f"{n_layers + 1} entries, 0 (embeddings output) to {n_layers} (last layer), or -{n_layers + 1} to -1 "
            "counting from the end"
        )
    return layer % (n_layers + 1)


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


# ---------------------------------------------------------------------------------------------------- texts
class Corpus:
    """Sentences to encode: plain ``texts``, or Brown ``words`` with one universal ``tags`` entry per word."""

    def __init__(self, texts: list[str], words: list[tuple[str, ...]] | None = None,
                 tags: list[tuple[str, ...]] | None = None, extra: list[dict] | None = None,
                 fingerprint: str = "") -> None:
        self.texts, self.words, self.tags, self.extra, self.fingerprint = texts, words, tags, extra, fingerprint

    def __len__(self) -> int:
        return len(self.texts)

    def record(self, i: int) -> dict:
        rec = {"id": i, "text": self.texts[i]}
        if self.words is not None:
            rec["words"], rec["tags"] = list(self.words[i]), list(self.tags[i])
        if self.extra is not None:
            rec.update(self.extra[i])
        return rec


def load_corpus(source: str, data_root: str | None, column: str, split: str, subset: str | None,
                data_files: str | None, max_sentences: int | None, skip_empty: bool = False) -> Corpus:
    """``brown`` (universal tags), an STS task name (``stsb``, ``sts12``..``sts16``, ``sickr``: the distinct
    sentences of both sides), a ``.txt``/``.csv``/``.tsv`` file, a saved dataset folder, or a hub dataset."""
    from datamodules.sentences import read_sentences

    if source == "brown":
        from datamodules.brown import find_nltk_data

        sents = read_brown(data_root, max_sentences=max_sentences)
        zip_hash = _sha256_file(find_nltk_data(data_root) / "corpora" / "brown.zip")
        return Corpus([s.text for s in sents], [s.words for s in sents], [s.tags for s in sents],
                      [{"file": s.fileid, "category": s.category} for s in sents], f"brown.zip:{zip_hash}")
    from datamodules.sts import STS_TASKS, load_sts

    if source in STS_TASKS:  # both sides of every pair, each distinct sentence once, in order of appearance
        pairs = load_sts(source, split, data_root)
        texts = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))
        if max_sentences is not None:
            texts = texts[:max_sentences]
        return Corpus(texts, fingerprint=hashlib.sha256("\n".join(texts).encode()).hexdigest())
    path = resolve(source, data_root)
    if path is None and looks_like_hub_name(source):
        hint = "Give data.source a local .txt file (one sentence per line) instead."
        ds = load_hub_dataset(source, split, hint, subset=subset, data_files=data_files)
        if column not in ds.column_names:
            raise DataError(f"{source} [{split}]: no column {column!r}; columns are {ds.column_names} (set "
                            "data.column)")
        if max_sentences is not None:
            ds = ds.select(range(min(max_sentences, len(ds))))
        texts = [t.strip() if isinstance(t, str) else "" for t in ds[column]]
        if bad := [i for i, t in enumerate(texts) if not t]:
            raise DataError(f"{source} [{split}] column {column!r}: row {bad[0]} is empty ({len(bad)} empty rows)")
        return Corpus(texts, fingerprint=f"hub:{getattr(ds, '_fingerprint', '')}")
    texts = read_sentences(source, data_root, column, split, skip_empty=skip_empty, data_files=data_files)
    if max_sentences is not None:
        texts = texts[:max_sentences]
    fp = _sha256_file(path) if path is not None and path.is_file() else hashlib.sha256(
        "\n".join(texts).encode()).hexdigest()
    return Corpus(texts, fingerprint=fp)


# ---------------------------------------------------------------------------------------------------- building
def save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (see :func:`datamodules.base.write_atomic`)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write {path}: {why_write_failed(err, path)}") from None


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive lock on ``<folder>.lock`` (flock: released by the kernel when the process dies, so a
    killed builder never leaves a stale lock). A second builder of the same cache waits here, then finds it built."""
    import fcntl

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
        sid = self.metadata()[:, 0]
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


class CacheBuilder:
    """Runs the encoder over a corpus and writes shards; see the module docstring for the layout."""

    def __init__(self, model_name_or_path: str, level: Level, layer: int, pooling: str, normalize: bool,
                 special_tokens: str, max_length: int, text_prefix: str, encode_batch_size: int, device: str,
                 dtype: str) -> None:
        self.model_name_or_path, self.level, self.layer = model_name_or_path, level, layer
        self.pooling, self.normalize, self.special_tokens = pooling, normalize, special_tokens
        self.max_length, self.text_prefix, self.encode_batch_size = max_length, text_prefix, encode_batch_size
        self.device, self.dtype = device, np.dtype(dtype)
        self.model = self.tokenizer = None

    def load(self) -> None:
        from lightning_modules.components.encoder import check_max_length, load_pretrained

        if self.model is None:
            self.model, self.tokenizer = load_pretrained(self.model_name_or_path)
            check_max_length(self.max_length, self.model, self.model_name_or_path, option="data.max_length")
            self.model.eval().to(self.device)
            if not self.tokenizer.is_fast:
                raise DataError(f"{self.model_name_or_path}: a fast tokenizer is needed (word_ids / offsets)")

    def tokenize(self, corpus: Corpus, idx: Sequence[int]) -> dict:
        """Token ids plus, per token, word index (-1 = special or prefix) and a special-or-prefix flag."""
        tok = self.tokenizer
        kw = dict(truncation=True, max_length=self.max_length, return_special_tokens_mask=True)
        if corpus.words is not None:
            pre = self.text_prefix.split()
            enc = tok([list(pre) + list(corpus.words[i]) for i in idx], is_split_into_words=True, **kw)
            word_ids = [[-1 if w is None or w < len(pre) else w - len(pre) for w in enc.word_ids(b)]
                        for b in range(len(idx))]
        else:
            n = len(self.text_prefix)
            enc = tok([self.text_prefix + corpus.texts[i] for i in idx], return_offsets_mapping=True, **kw)
            word_ids = []
            for b in range(len(idx)):
                offsets = enc["offset_mapping"][b]
                word_ids.append([-1 if w is None or (n and offsets[j][0] < n) else w
                                 for j, w in enumerate(enc.word_ids(b))])
        special = [[int(s or w < 0) for s, w in zip(sm, wi)] for sm, wi in zip(enc["special_tokens_mask"], word_ids)]
        return {"input_ids": enc["input_ids"], "word_ids": word_ids, "special": special}

    @torch.inference_mode()
    def encode_chunk(self, corpus: Corpus, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """Vectors and metadata of sentences ``idx`` in text order, and how many sentences were truncated."""
        tk = self.tokenize(corpus, idx)
        lengths = [len(ids) for ids in tk["input_ids"]]
        order = sorted(range(len(idx)), key=lambda i: lengths[i])  # length-sorted batches: little padding
        vec_parts, meta_parts = [], []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.encode_batch_size):
            rows = order[start : start + self.encode_batch_size]
            L = max(lengths[r] for r in rows)
            ids_BL = torch.full((len(rows), L), pad, dtype=torch.long)
            mask_BL = torch.zeros((len(rows), L), dtype=torch.long)
            for b, r in enumerate(rows):
                ids_BL[b, : lengths[r]] = torch.as_tensor(tk["input_ids"][r])
                mask_BL[b, : lengths[r]] = 1
            out = self.model(input_ids=ids_BL.to(self.device), attention_mask=mask_BL.to(self.device),
                             output_hidden_states=True)
            h_BLD = out.hidden_states[self.layer].float()
            if self.level == "sentence":
                vec_parts.append(self._pool(h_BLD, mask_BL.to(h_BLD.device)).cpu().numpy().astype(self.dtype))
                meta = np.full((len(rows), len(META_COLUMNS)), -1, dtype=np.int32)
                meta[:, 0], meta[:, 5] = [idx[r] for r in rows], 0
                meta_parts.append(meta)
                continue
            keep_BL = mask_BL.bool()
            if self.special_tokens == "drop":
                for b, r in enumerate(rows):
                    keep_BL[b, : lengths[r]] &= ~torch.as_tensor(tk["special"][r], dtype=torch.bool)
            vec_parts.append(h_BLD[keep_BL.to(h_BLD.device)].cpu().numpy().astype(self.dtype))
            meta_parts.append(self._token_meta(corpus, idx, tk, rows, keep_BL))
        vectors, meta = np.concatenate(vec_parts), np.concatenate(meta_parts)
        text_order = np.argsort(meta[:, 0], kind="stable")  # back to text order; positions stay increasing
        truncated = sum(1 for i, r in enumerate(idx) if self._truncated(corpus, r, tk["word_ids"][i]))
        return vectors[text_order], meta[text_order], truncated

    def _pool(self, h_BLD: Tensor, mask_BL: Tensor) -> Tensor:
        from lightning_modules.components.pooling import masked_mean

        z_BD = masked_mean(h_BLD, mask_BL) if self.pooling == "mean" else h_BLD[:, 0]
        return torch.nn.functional.normalize(z_BD, dim=-1) if self.normalize else z_BD

    def _token_meta(self, corpus: Corpus, idx: Sequence[int], tk: dict, rows: list[int],
                    keep_BL: Tensor) -> np.ndarray:
        tag_id = {t: i for i, t in enumerate(POS_TAGS)}
        out = []
        for b, r in enumerate(rows):
            ids, wids, special = tk["input_ids"][r], tk["word_ids"][r], tk["special"][r]
            tags = corpus.tags[idx[r]] if corpus.tags is not None else None
            prev = None
            for pos in range(len(ids)):
                w = wids[pos]
                first = int(w >= 0 and w != prev)
                prev = w
                if not keep_BL[b, pos]:
                    continue
                tag = SPECIAL if special[pos] else (tag_id[tags[w]] if tags is not None else -1)
                out.append((idx[r], pos, ids[pos], w, tag, first))
        return np.asarray(out, dtype=np.int32).reshape(-1, len(META_COLUMNS))

    @staticmethod
    def _truncated(corpus: Corpus, i: int, word_ids: list[int]) -> bool:
        if corpus.words is not None:
            return max(word_ids, default=-1) + 1 < len(corpus.words[i])
        return False  # plain text: not tracked per word

    def build(self, corpus: Corpus, folder: Path, identity: dict, shard_sentences: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "identity.json", json.dumps(identity, indent=1, sort_keys=True))
        t0 = time.perf_counter()
        shards, truncated, encode_s, n_new = [], 0, 0.0, 0
        for s, start in enumerate(range(0, len(corpus), shard_sentences)):
            name = f"shard_{s:05d}"
            meta_file = folder / f"{name}.meta.npy"
            if meta_file.is_file() and (folder / f"{name}.vectors.npy").is_file():  # done before an interruption
                n = len(np.load(meta_file, mmap_mode="r"))
            else:
                self.load()
                t = time.perf_counter()
                vectors, meta, trunc = self.encode_chunk(corpus, range(start, min(start + shard_sentences,
                                                                                  len(corpus))))
                encode_s += time.perf_counter() - t
                truncated += trunc
                for suffix, array in (("vectors", vectors), ("meta", meta)):  # meta last: marks the shard done
                    save_atomic(folder / f"{name}.{suffix}.npy", array)
                n = len(vectors)
                n_new += n
                rank_zero_info(f"activation cache {folder.name}: shard {s} ({n} vectors, "
                               f"{min(start + shard_sentences, len(corpus))}/{len(corpus)} sentences)")
            shards.append({"name": name, "n_vectors": n})
        write_atomic(folder / "texts.jsonl", "".join(json.dumps(corpus.record(i)) + "\n" for i in range(len(corpus))))
        total = sum(s["n_vectors"] for s in shards)
        dim = int(np.load(folder / f"{shards[0]['name']}.vectors.npy", mmap_mode="r").shape[1])
        meta = {**identity, "complete": True, "dim": dim, "n_vectors": total, "n_sentences": len(corpus),
                "shards": shards, "columns": list(META_COLUMNS), "pos_tags": list(POS_TAGS),
                "truncated_sentences": truncated,
                "build": {"seconds": time.perf_counter() - t0, "encode_seconds": encode_s, "new_vectors": n_new}}
        write_atomic(folder / "meta.json", json.dumps(meta, indent=1))


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
        self.encode_batch_size, self.encode_device = encode_batch_size, encode_device
        self.batch_size, self.shuffle, self.val_fraction, self.seed = batch_size, shuffle, val_fraction, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache: ActivationCache | None = None
        self.built_here = False  #: whether this process encoded the cache (False: it existed, or another built it)
        self._identity: dict | None = None
        self._corpus: Corpus | None = None

    # ------------------------------------------------------------------------------------------- identity
    def identity(self) -> dict:
        """What the cached vectors are; its hash names the cache folder."""
        if self._identity is None:
            from transformers import AutoConfig

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

    def cache_folder(self) -> Path:
        if self.cache_path is not None:
            return self.cache_path
        ident = self.identity()
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.model_name_or_path).name).strip("-")
        return self.cache_dir / f"{slug}_{self.level}_L{ident['layer']}_{key}"

    def _check_identity(self, folder: Path) -> None:
        found_file = folder / "identity.json"
        if not found_file.is_file():
            if folder.exists() and any(folder.iterdir()):
                raise DataError(f"{folder} exists, is not empty and is not an activation cache (no identity.json)")
            return
        found = read_json(found_file, "the cache's identity.json", f"delete {folder} to rebuild the cache")
        diffs = identity_diff(found, self.identity())
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
        device = self.encode_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ident = self.identity()
        with build_lock(folder):
            if (folder / "meta.json").is_file():  # built by another process while this one waited
                rank_zero_info(f"activation cache {folder}: built by another process, reusing it")
                return
            builder = CacheBuilder(self.model_name_or_path, self.level, ident["layer"], self.pooling,
                                   self.normalize, self.special_tokens, self.max_length, self.text_prefix,
                                   self.encode_batch_size, device, self.cache_dtype)
            builder.build(self.corpus(), folder, ident, self.shard_sentences)
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
        sentence_ids = self.cache.metadata()[:, 0].astype(np.int64)
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
