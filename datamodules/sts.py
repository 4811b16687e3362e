"""Semantic textual similarity pairs: STS-B, SemEval STS12-16, SICK-R, or your own TSV.

Local layouts (under ``data_root``), as distributed by their organisers:

- ``stsb/sts-{train,dev,test}.csv``: TAB separated, unquoted: genre, file, year, id, score, sentence1, sentence2
  (some rows carry 1-2 extra source columns, ignored).
- ``sts12-16/STS1x/STS.input.<subset>.txt`` (s1 TAB s2 [TAB sources]) with ``STS.gs.<subset>.txt`` (score per line;
  an empty line is an unscored pair and is skipped). All subsets of a year are concatenated (SimCSE's "all").
- ``sick/SICK_{train,trial,test_annotated}.txt``: TAB separated with a header (sentence_A, sentence_B,
  relatedness_score).
- any ``.tsv`` file with the header ``sentence1 TAB sentence2 TAB score``.

Without local files, the hub copies are used (``sentence-transformers/stsb``, ``mteb/stsXX-sts``, ``mteb/sickr-sts``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.base import DataError, PadCollator, TokenizedRows, load_hub_dataset, resolve

STS_TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
SPLITS = {"stsb": ("train", "dev", "test"), "sickr": ("train", "dev", "test")}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
HUB = {
    "stsb": ("sentence-transformers/stsb", {"dev": "validation"}, 5.0),
    "sickr": ("mteb/sickr-sts", {}, 1.0),
    **{f"sts1{y}": (f"mteb/sts1{y}-sts", {}, 1.0) for y in range(2, 7)},
}


class STSPairs(NamedTuple):
    """Sentence pairs with gold similarity scores."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def _score(text: str, where: str, lo: float, hi: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: score {text!r} is not a number") from None
    if not lo <= value <= hi:
        raise DataError(f"{where}: score {value} is outside [{lo}, {hi}]")
    return value


def _pair(s1: str, s2: str, where: str) -> tuple[str, str]:
    if not s1.strip() or not s2.strip():
        raise DataError(f"{where}: empty sentence")
    return s1.strip(), s2.strip()


def read_stsb(path: Path) -> STSPairs:
    s1, s2, scores = [], [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            where = f"{path}:{n}"
            if len(fields) < 7:
                raise DataError(f"{where}: expected at least 7 TAB-separated fields (genre, file, year, id, score, "
                                f"sentence1, sentence2), found {len(fields)}")
            a, b = _pair(fields[5], fields[6], where)
            s1.append(a), s2.append(b), scores.append(_score(fields[4], where, 0.0, 5.0))
    return STSPairs("stsb", s1, s2, scores)


def read_semeval_year(folder: Path, name: str) -> STSPairs:
    inputs = sorted(folder.glob("STS.input.*.txt"))
    if not inputs:
        raise DataError(
            f"{folder}: no STS.input.<subset>.txt files (expected the SemEval layout, see datamodules/sts.py)"
        )
    s1, s2, scores = [], [], []
    for inp in inputs:
        gold = folder / inp.name.replace("STS.input.", "STS.gs.")
        if not gold.exists():
            raise DataError(f"{inp}: its gold file {gold.name} is missing")
        pairs = inp.read_text(encoding="utf-8").splitlines()
        golds = gold.read_text(encoding="utf-8").splitlines()
        if len(golds) != len(pairs):
            raise DataError(f"{gold}: {len(golds)} lines but {inp.name} has {len(pairs)}")
        for n, (line, g) in enumerate(zip(pairs, golds), 1):
            if not g.strip():
                continue  # an unscored pair, by the organisers' convention
            fields = line.split("\t")
            if len(fields) < 2:
                raise DataError(f"{inp}:{n}: expected sentence1 TAB sentence2")
            a, b = _pair(fields[0], fields[1], f"{inp}:{n}")
            s1.append(a), s2.append(b), scores.append(_score(g, f"{gold}:{n}", 0.0, 5.0))
    return STSPairs(name, s1, s2, scores)


def read_tsv(path: Path, name: str, columns=("sentence1", "sentence2", "score"), score_range=(0.0, 5.0)) -> STSPairs:
    s1, s2, scores = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: the header {header} lacks column(s) {missing}")
        idx = [header.index(c) for c in columns]
        for fields in reader:
            if not fields:
                continue
            where = f"{path}:{reader.line_num}"
            if len(fields) != len(header):
                raise DataError(f"{where}: {len(fields)} field(s), the header has {len(header)}")
            a, b = _pair(fields[idx[0]], fields[idx[1]], where)
            s1.append(a), s2.append(b), scores.append(_score(fields[idx[2]], where, *score_range))
    return STSPairs(name, s1, s2, scores)


def load_sts(task: str, split: str = "test", data_root: str | None = None) -> STSPairs:
    """Load one STS task: a name from :data:`STS_TASKS` or a path to a ``sentence1/sentence2/score`` TSV.

    STS12-16 have only a test set. Local files under ``data_root`` are preferred; the hub is tried otherwise.
    """
    local = resolve(task, data_root) if task.endswith((".tsv", ".txt", ".csv")) else None
    if local is not None:
        return read_tsv(local, local.stem)
    if task not in STS_TASKS:
        raise DataError(f"unknown STS task {task!r}: choose from {', '.join(STS_TASKS)} or give a .tsv path "
                        "(header sentence1, sentence2, score)")
    allowed = SPLITS.get(task, ("test",))
    if split not in allowed:
        raise DataError(f"{task} has no split {split!r}; it has {', '.join(allowed)}")
    if task == "stsb":
        path = resolve(f"stsb/sts-{split}.csv", data_root)
        if path is not None:
            return read_stsb(path)
    elif task == "sickr":
        path = resolve(f"sick/{SICK_FILES[split]}", data_root)
        if path is not None:
            return read_tsv(path, "sickr", ("sentence_A", "sentence_B", "relatedness_score"), (1.0, 5.0))
    else:
        folder = resolve(f"sts12-16/STS{task[3:]}", data_root)
        if folder is not None:
            return read_semeval_year(folder, task)
    name, split_names, scale = HUB[task]
    expected = {"stsb": f"stsb/sts-{split}.csv", "sickr": f"sick/{SICK_FILES.get(split)}"}.get(
        task, f"sts12-16/STS{task[3:]}/STS.input.*.txt")
    hint = f"Or set data_root to a folder holding {expected} (see datamodules/sts.py for the layouts)."
    ds = load_hub_dataset(name, split_names.get(split, split), hint)
    return STSPairs(task, list(ds["sentence1"]), list(ds["sentence2"]), [float(s) * scale for s in ds["score"]])


class STSDataModule(pl.LightningDataModule):
    """STS pairs for ``validate`` / ``test``: one dataloader per task, each batch ``(ids1, ids2, scores)``.

    Args:
        tasks: task names or TSV paths (see :func:`load_sts`).
        val_split, test_split: splits used by ``validate`` and ``test`` (STS12-16 always use ``test``).
        data_root: folder with the local copies.
        batch_size: pairs per batch.
    """

    def __init__(self, tasks: list[str] | None = None, val_split: str = "dev", test_split: str = "test",
                 data_root: str | None = None, batch_size: int = 128) -> None:
        super().__init__()
        self.tasks = list(tasks) if tasks else ["stsb"]
        self.val_split, self.test_split, self.data_root, self.batch_size = val_split, test_split, data_root, batch_size
        self.tokenizer, self.max_length = None, None
        self.names: list[str] = []

    def connect(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def _loaders(self, split: str) -> list[DataLoader]:
        if self.tokenizer is None:
            raise RuntimeError("STSDataModule has no tokenizer: call connect(tokenizer, max_length) first")
        loaders, self.names = [], []
        for task in self.tasks:
            pairs = load_sts(task, split if task in SPLITS or task.endswith(".tsv") else "test", self.data_root)
            tok = self.tokenizer
            ids1 = tok(pairs.sentences1, truncation=True, max_length=self.max_length)["input_ids"]
            ids2 = tok(pairs.sentences2, truncation=True, max_length=self.max_length)["input_ids"]
            rows = TokenizedRows(list(zip(ids1, ids2)))
            scores = torch.tensor(pairs.scores)
            collate = PadCollator(tok.pad_token_id)

            def collate_with_scores(batch, collate=collate, scores=scores):
                idx, rows_ = zip(*batch)
                out = collate(list(rows_))
                out["scores"] = scores[list(idx)]
                return out

            indexed = [(i, r) for i, r in enumerate(rows)]
            loaders.append(DataLoader(indexed, batch_size=self.batch_size, collate_fn=collate_with_scores))
            self.names.append(pairs.name)
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.val_split)

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.test_split)
