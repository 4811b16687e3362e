"""Building an activation cache: running an encoder over a corpus and writing the shards (the format is in
:mod:`datamodules.activation_cache`). The one datamodule that runs a model, through the Hugging Face helpers of
``core.hub``."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from core.errors import DataError
from core.files import write_atomic
from core.hub import (
    check_max_length,
    check_model_files,
    load_hub_dataset,
    load_pretrained,
    looks_like_hub_name,
    resolve_model,
)
from core.tensors import masked_mean, pad_ids
from datamodules.activation_cache import (
    META_COLUMNS,
    META_FIRST_PIECE,
    META_SENTENCE,
    POS_TAGS,
    SPECIAL,
    Level,
)
from datamodules.base import resolve
from datamodules.brown import find_nltk_data, read_brown
from datamodules.sentences import read_sentences
from datamodules.sts import STS_TASKS, load_sts

MODEL_FILES = re.compile(r"(config\.json|tokenizer\.json|vocab\.txt|.*\.model|.*\.safetensors|pytorch_model.*\.bin)")


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

    resolved = resolve_model(model_name_or_path)
    if Path(resolved).is_dir():
        check_model_files(resolved)  # before its config or weights are read (identity, fingerprint)
        return Path(resolved)
    try:

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


def load_pretrained_tokenizer(model_name_or_path: str):
    """The model's tokenizer alone (no weights loaded), from :func:`model_folder`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(model_name_or_path))


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


# ---------------------------------------------------------------------------------------------------- texts
class Corpus:
    """Sentences to encode: plain ``texts``, or Brown ``words`` with one universal ``tags`` entry per word."""

    def __init__(self, texts: list[str], words: list[tuple[str, ...]] | None = None,
                 tags: list[tuple[str, ...]] | None = None, extra: list[dict] | None = None,
                 fingerprint: str = "") -> None:
        self.texts, self.words, self.tags, self.extra, self.fingerprint = texts, words, tags, extra, fingerprint

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> Corpus:
        """The first ``n`` sentences (their ids, and so their validation membership, unchanged)."""
        def cut(seq):
            return None if seq is None else seq[:n]

        return Corpus(self.texts[:n], cut(self.words), cut(self.tags), cut(self.extra), self.fingerprint)

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

    if source == "brown":

        sents = read_brown(data_root, max_sentences=max_sentences)
        zip_hash = _sha256_file(find_nltk_data(data_root) / "corpora" / "brown.zip")
        return Corpus([s.text for s in sents], [s.words for s in sents], [s.tags for s in sents],
                      [{"file": s.fileid, "category": s.category} for s in sents], f"brown.zip:{zip_hash}")

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
class CacheBuilder:
    """Runs the encoder over a corpus and writes shards; see the module docstring for the layout.

    ``layers`` (several ``hidden_states`` indices) makes one forward pass per batch give the vectors of every one of
    them, written to one cache per layer (:meth:`build_many`); ``layer`` alone: one cache.
    """

    def __init__(self, model_name_or_path: str, level: Level, layer: int, pooling: str, normalize: bool,
                 special_tokens: str, max_length: int, text_prefix: str, encode_batch_size: int, device: str,
                 dtype: str, layers: Sequence[int] | None = None) -> None:
        self.model_name_or_path, self.level = model_name_or_path, level
        self.layers: tuple[int, ...] = tuple(layers) if layers else (layer,)  # the one place the layers are kept
        self.pooling, self.normalize, self.special_tokens = pooling, normalize, special_tokens
        self.max_length, self.text_prefix, self.encode_batch_size = max_length, text_prefix, encode_batch_size
        self.device, self.dtype = device, np.dtype(dtype)
        self.model = self.tokenizer = None

    def load(self) -> None:

        if self.model is None:
            self.model, self.tokenizer = load_pretrained(self.model_name_or_path)
            check_max_length(self.max_length, self.model, self.model_name_or_path, option="data.max_length")
            self.model.eval().to(self.device)
            if not self.tokenizer.is_fast:
                raise DataError(f"{self.model_name_or_path}: a fast tokenizer is needed (word_ids / offsets)")

    def vectors_per_sentence(self, corpus: Corpus, idx: Sequence[int]) -> np.ndarray:
        """(len(idx),) how many vectors each sentence gives: 1 at sentence level; its kept tokens at token level."""
        if self.level == "sentence":
            return np.ones(len(idx), dtype=np.int64)
        tk = self.tokenize(corpus, idx)
        drop = self.special_tokens == "drop"
        return np.asarray([len(ids) - (sum(sp) if drop else 0) for ids, sp in zip(tk["input_ids"], tk["special"])],
                          dtype=np.int64)

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

    def padded_batches(self, input_ids: Sequence[Sequence[int]]):
        """``(rows, ids_BL, mask_BL)`` of ``encode_batch_size`` rows each, length-sorted (little padding), on CPU."""
        lengths = [len(ids) for ids in input_ids]
        order = sorted(range(len(input_ids)), key=lambda i: lengths[i])
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.encode_batch_size):
            rows = order[start : start + self.encode_batch_size]
            ids_BL, mask_BL = pad_ids([input_ids[r] for r in rows], pad)
            yield rows, ids_BL, mask_BL.long()

    def encode_chunk(self, corpus: Corpus, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """Vectors (of ``layer``, the first of ``layers``) and metadata of sentences ``idx`` in text order, and how
        many sentences were truncated."""
        vectors, meta, truncated = self.encode_layers(corpus, idx)
        return vectors[0], meta, truncated

    @torch.inference_mode()
    def encode_layers(self, corpus: Corpus, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(n_layers, N, D) vectors of every layer of :meth:`all_layers` from one forward pass per batch, the (N, 6)
        metadata they share, in text order, and how many sentences were truncated.

        Per batch the device is asked for one copy back (the kept rows of every layer, already in the cache dtype);
        the positions kept are chosen on the host, so selecting them waits on nothing.
        """
        tk = self.tokenize(corpus, idx)
        lengths = [len(ids) for ids in tk["input_ids"]]
        layers, to = self.layers, getattr(torch, self.dtype.name)
        vec_parts, meta_parts = [], []
        for rows, ids_BL, mask_BL in self.padded_batches(tk["input_ids"]):
            dev_mask_BL = mask_BL.to(self.device, non_blocking=True)
            out = self.model(input_ids=ids_BL.to(self.device, non_blocking=True), attention_mask=dev_mask_BL,
                             output_hidden_states=True)
            if self.level == "sentence":
                z_nBD = torch.stack([self._pool(out.hidden_states[layer].float(), dev_mask_BL) for layer in layers])
                vec_parts.append(z_nBD.to(to).cpu().numpy())
                meta = np.full((len(rows), len(META_COLUMNS)), -1, dtype=np.int32)
                meta[:, META_SENTENCE], meta[:, META_FIRST_PIECE] = [idx[r] for r in rows], 0
                meta_parts.append(meta)
                continue
            keep_BL = mask_BL.bool()
            if self.special_tokens == "drop":
                for b, r in enumerate(rows):
                    keep_BL[b, : lengths[r]] &= ~torch.as_tensor(tk["special"][r], dtype=torch.bool)
            flat = keep_BL.flatten().nonzero().squeeze(1).to(self.device, non_blocking=True)  # host-side choice
            h_nND = torch.stack([out.hidden_states[layer].flatten(0, 1).index_select(0, flat) for layer in layers])
            vec_parts.append(h_nND.float().to(to).cpu().numpy())
            meta_parts.append(self._token_meta(corpus, idx, tk, rows, keep_BL))
        vectors, meta = np.concatenate(vec_parts, axis=1), np.concatenate(meta_parts)
        text_order = np.argsort(meta[:, META_SENTENCE], kind="stable")  # back to text order; positions stay increasing
        truncated = sum(1 for i, r in enumerate(idx) if self._truncated(corpus, r, tk["word_ids"][i]))
        return vectors[:, text_order], meta[text_order], truncated

    def _pool(self, h_BLD: Tensor, mask_BL: Tensor) -> Tensor:

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
        """Write the cache of ``layer`` to ``folder``."""
        self.build_many(corpus, [folder], [identity], shard_sentences)

    def build_many(self, corpus: Corpus, folders: Sequence[Path], identities: Sequence[dict],
                   shard_sentences: int) -> None:
        """Write one cache per layer of :meth:`all_layers` (``folders[i]``, ``identities[i]``: layer i's) from one
        pass over ``corpus``; each is the cache a build of its layer alone writes (its build statistics aside). A shard
        every folder already holds (an interrupted build) is not encoded again."""
        if len(folders) != len(self.layers) or len(identities) != len(folders):
            raise ValueError(f"{len(folders)} folders and {len(identities)} identities for layers "
                             f"{self.layers}")
        for folder, identity in zip(folders, identities):
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "identity.json", json.dumps(identity, indent=1, sort_keys=True))
        t0 = time.perf_counter()
        shards, truncated, encode_s, n_new = [], 0, 0.0, 0
        for s, start in enumerate(range(0, len(corpus), shard_sentences)):
            name = f"shard_{s:05d}"
            todo = [f for f in folders if not ((f / f"{name}.meta.npy").is_file()
                                               and (f / f"{name}.vectors.npy").is_file())]
            if not todo:  # done before an interruption
                n = len(np.load(folders[0] / f"{name}.meta.npy", mmap_mode="r"))
            else:
                self.load()
                t = time.perf_counter()
                stop = min(start + shard_sentences, len(corpus))
                vectors, meta, trunc = self.encode_layers(corpus, range(start, stop))
                encode_s += time.perf_counter() - t
                truncated += trunc
                for folder, layer_vectors in zip(folders, vectors):
                    if folder in todo:
                        for suffix, array in (("vectors", layer_vectors), ("meta", meta)):  # meta last: marks it done
                            write_atomic(folder / f"{name}.{suffix}.npy", lambda f, a=array: np.save(f, a),
                                         what="activation shard ")
                n = len(meta)
                n_new += n
                rank_zero_info(f"activation cache {', '.join(f.name for f in folders)}: shard {s} ({n} vectors, "
                               f"{stop}/{len(corpus)} sentences)")
            shards.append({"name": name, "n_vectors": n})
        texts = "".join(json.dumps(corpus.record(i)) + "\n" for i in range(len(corpus)))
        total = sum(s["n_vectors"] for s in shards)
        for folder, identity in zip(folders, identities):
            write_atomic(folder / "texts.jsonl", texts)
            dim = int(np.load(folder / f"{shards[0]['name']}.vectors.npy", mmap_mode="r").shape[1])
            meta = {**identity, "complete": True, "partial": "partial_sentences" in identity, "dim": dim,
                    "n_vectors": total, "n_sentences": len(corpus),
                    "shards": shards, "columns": list(META_COLUMNS), "pos_tags": list(POS_TAGS),
                    "truncated_sentences": truncated,
                    "build": {"seconds": time.perf_counter() - t0, "encode_seconds": encode_s, "new_vectors": n_new,
                              "layers_in_pass": list(self.layers)}}
            write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
