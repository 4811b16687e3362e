"""Word-in-Context (WiC, Pilehvar & Camacho-Collados, NAACL 2019): one target word in two contexts, gold T when it
has the same sense in both. Used by PS-Eval (``evaluation/interpret/pseval.py``).

Local layout (the organisers' release, e.g. ``../shared/data/wic``)::
    wic/{train,dev,test}/{split}.data.txt   word TAB POS (N/V) TAB index pair "i-j" TAB context1 TAB context2
    wic/{train,dev,test}/{split}.gold.txt   T or F, one line per data line

Contexts are already tokenised: ``i`` and ``j`` index the whitespace-split words of context1 and context2 (the word
there may be an inflection of the target, e.g. ``board`` / ``boards``). Without local files the SuperGLUE copy on
the hub (``aps/super_glue``, subset ``wic``) is used: its character spans are turned into word indices by splitting
the sentence around the span, and it has no POS column (``pos`` is then ``""``) and no public test labels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl

from core.errors import DataError
from core.hub import load_hub_dataset, looks_like_hub_name
from datamodules.base import resolve

SPLITS = ("train", "dev", "test")
HUB_NAME, HUB_SUBSET = "aps/super_glue", "wic"
HUB_SPLITS = {"dev": "validation"}
LAYOUT = "wic/{split}/{split}.data.txt (word TAB POS TAB i-j TAB context1 TAB context2) and {split}.gold.txt (T/F)"
INDEX_PAIR = re.compile(r"(\d+)-(\d+)")


class WiCPair(NamedTuple):
    """One WiC instance. ``idx1`` / ``idx2`` index the whitespace-split words of ``context1`` / ``context2``."""

    word: str
    pos: str
    idx1: int
    idx2: int
    context1: str
    context2: str
    gold: bool

    @property
    def words1(self) -> list[str]:
        return self.context1.split()

    @property
    def words2(self) -> list[str]:
        return self.context2.split()


def _parse_row(line: str, where: str) -> tuple[str, str, int, int, str, str]:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 5:
        raise DataError(f"{where}: expected 5 TAB-separated fields (word, POS, index pair i-j, context1, context2), "
                        f"found {len(fields)}")
    word, pos, pair, c1, c2 = (f.strip() for f in fields)
    if not word or not pos:
        raise DataError(f"{where}: empty target word or POS ({word!r}, {pos!r})")
    m = INDEX_PAIR.fullmatch(pair)
    if m is None:
        raise DataError(f"{where}: index pair {pair!r} is not of the form i-j (two non-negative integers)")
    idx = int(m.group(1)), int(m.group(2))
    for k, (i, context) in enumerate(zip(idx, (c1, c2)), 1):
        n_words = len(context.split())
        if not 0 <= i < n_words:
            raise DataError(f"{where}: index {i} is out of range for context{k}, which has {n_words} "
                            f"whitespace-separated word(s): {context!r}")
    return word, pos, idx[0], idx[1], c1, c2


def read_wic(data_path: str | Path, gold_path: str | Path | None = None) -> list[WiCPair]:
    """Read a ``*.data.txt`` file and its ``*.gold.txt`` (default: beside it, same stem), validating every row.

    Raises:
        DataError: naming the file and line of the first malformed row (field count, index pair, index out of the
            context's range, gold not T/F) or the line where the two files stop lining up.
    """
    data_path = Path(data_path)
    if gold_path is None:
        if not data_path.name.endswith(".data.txt"):
            raise DataError(f"{data_path}: give gold_path, or name the file *.data.txt with *.gold.txt beside it")
        gold_path = data_path.with_name(data_path.name.replace(".data.txt", ".gold.txt"))
    gold_path = Path(gold_path)
    for path in (data_path, gold_path):
        if not path.is_file():
            raise DataError(f"WiC file {path} not found (expected {LAYOUT})")
    lines = data_path.read_text(encoding="utf-8").splitlines()
    golds = gold_path.read_text(encoding="utf-8").splitlines()
    if len(lines) != len(golds):
        n = min(len(lines), len(golds)) + 1
        shorter = gold_path if len(golds) < len(lines) else data_path
        raise DataError(f"{gold_path} has {len(golds)} lines but {data_path} has {len(lines)}: "
                        f"{shorter}:{n} is missing (one gold label per data line)")
    pairs = []
    for n, (line, g) in enumerate(zip(lines, golds), 1):
        row = _parse_row(line, f"{data_path}:{n}")
        label = g.strip()
        if label not in ("T", "F"):
            raise DataError(f"{gold_path}:{n}: gold label {label!r} is not T or F")
        pairs.append(WiCPair(*row, gold=label == "T"))
    return pairs


def _local_files(folder: Path, split: str) -> Path | None:
    for candidate in (folder / split / f"{split}.data.txt", folder / f"{split}.data.txt"):
        if candidate.is_file():
            return candidate
    return None


def _split_around(sentence: str, start: int, end: int) -> tuple[str, int]:
    """A whitespace-tokenised sentence in which the span ``[start, end)`` is one word, and that word's index."""
    before, target, after = sentence[:start].split(), sentence[start:end].strip(), sentence[end:].split()
    if not target or any(c.isspace() for c in target):
        raise DataError(f"span [{start}, {end}) of {sentence!r} is not one word ({target!r})")
    return " ".join(before + [target] + after), len(before)


def from_hub(name: str, split: str, subset: str | None, hint: str) -> list[WiCPair]:
    """WiC pairs from a hub dataset with SuperGLUE's columns (word, sentence1/2, start1/2, end1/2, label)."""
    ds = load_hub_dataset(name, HUB_SPLITS.get(split, split), hint, subset=subset)
    pairs = []
    for n, row in enumerate(ds, 1):
        where = f"{name} ({subset}, {split}) row {n}"
        if row["label"] not in (0, 1):
            raise DataError(f"{where}: label {row['label']!r} is not 0/1 (the hub's test split has no public gold "
                            f"labels). {hint}")
        try:
            c1, i1 = _split_around(row["sentence1"], row["start1"], row["end1"])
            c2, i2 = _split_around(row["sentence2"], row["start2"], row["end2"])
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        pairs.append(WiCPair(row["word"], row.get("pos", ""), i1, i2, c1, c2, bool(row["label"])))
    return pairs


def load_wic(split: str = "dev", data_root: str | None = None, source: str = "wic", hub: bool = True,
             subset: str | None = HUB_SUBSET) -> list[WiCPair]:
    """Load one WiC split.

    Args:
        split: ``train``, ``dev`` or ``test``.
        data_root: folder that ``source`` is resolved against (e.g. ``../shared/data``).
        source: a local WiC folder (``wic``: ``<data_root>/wic``), a ``*.data.txt`` file, or a hub dataset name
            with SuperGLUE's WiC columns. ``wic`` without a local folder means the hub's ``aps/super_glue``.
        hub: try the hub when nothing local exists; False makes a missing folder an error.
        subset: hub dataset configuration (``wic`` for SuperGLUE).
    """
    if split not in SPLITS:
        raise DataError(f"WiC has no split {split!r}; it has {', '.join(SPLITS)}")
    local = resolve(source, data_root)
    if local is not None and local.is_file():
        return read_wic(local)
    if local is not None:
        data = _local_files(local, split)
        if data is None:
            raise DataError(f"{local}: no {split}/{split}.data.txt or {split}.data.txt in it (expected "
                            f"{LAYOUT.format(split=split)})")
        return read_wic(data)
    where = Path(data_root) / source if data_root else Path(source)
    hint = (f"To use local files instead, set data_root to the folder holding "
            f"{LAYOUT.format(split=split)} (e.g. ../shared/data); {where} does not exist.")
    if not hub or not looks_like_hub_name(source):
        raise DataError(f"WiC ({split}): {where} not found. {hint}")
    name = HUB_NAME if source == "wic" else source
    return from_hub(name, split, subset, hint)


def target_tokens(tokenizer, contexts: Sequence[Sequence[str]], indices: Sequence[int],
                  max_length: int = 128) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of pre-split contexts (``is_split_into_words=True``) and, per context, the positions of the
    wordpieces of word ``indices[i]`` (empty when truncation removed it). Needs a fast tokenizer (``word_ids``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__}: a fast tokenizer is needed to locate the target word's tokens")
    enc = tokenizer([list(c) for c in contexts], is_split_into_words=True, truncation=True, max_length=max_length)
    positions = [[p for p, w in enumerate(enc.word_ids(b)) if w == i] for b, i in enumerate(indices)]
    return enc["input_ids"], positions


class WiCDataModule(pl.LightningDataModule):
    """Holds one WiC split for evaluations (PS-Eval); there is nothing to train on.

    Args:
        split, data_root, source, hub, subset: see :func:`load_wic`.
    """

    def __init__(self, split: str = "dev", data_root: str | None = None, source: str = "wic", hub: bool = True,
                 subset: str | None = HUB_SUBSET) -> None:
        super().__init__()
        self.split, self.data_root, self.source, self.hub, self.subset = split, data_root, source, hub, subset
        self._pairs: list[WiCPair] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._pairs is None:
            self._pairs = load_wic(self.split, self.data_root, self.source, self.hub, self.subset)

    @property
    def pairs(self) -> list[WiCPair]:
        self.setup()
        return self._pairs
