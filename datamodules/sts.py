"""Semantic textual similarity pairs: STS-B, SemEval STS12-16, SICK-R, or your own TSV.

Local layouts (under ``data_root``), as distributed by their organisers:

- ``stsb/sts-{train,dev,test}.csv``: TAB separated, unquoted: genre, file, year, id, score, sentence1, sentence2
  (some rows carry 1-2 extra source columns, ignored).
- ``sts12-16/STS1x/STS.input.<subset>.txt`` (s1 TAB s2 [TAB sources]) with ``STS.gs.<subset>.txt`` (score per line;
  an empty line is an unscored pair and is skipped). All subsets of a year are concatenated (SimCSE's "all").
- ``sick/SICK_{train,trial,test_annotated}.txt``: TAB separated with a header (sentence_A, sentence_B,
  relatedness_score).
- any ``.tsv`` file with the header ``sentence1 TAB sentence2 TAB score``.

Without local files, the hub copies are used (``sentence-transformers/stsb``, ``mteb/stsXX-sts``,
``mteb/sickr-sts``), unless ``hub=False`` (then a missing file is an error naming the path and the layout
expected there).

:func:`load_sts_subsets` keeps the subsets apart (one per SemEval file; STS-B and SICK-R have one), for the
SentEval "wmean" (size-weighted mean of per-subset Spearman); :func:`load_sts` concatenates them ("all").
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from core.errors import DataError
from core.hub import load_hub_dataset
from datamodules.base import PadCollator, TokenizedRows, read_table, resolve

STS_TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
SPLITS = {"stsb": ("train", "dev", "test"), "sickr": ("train", "dev", "test")}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
HUB = {
    "stsb": ("sentence-transformers/stsb", {"dev": "validation"}, 5.0),
    "sickr": ("mteb/sickr-sts", {}, 1.0),
    **{f"sts1{y}": (f"mteb/sts1{y}-sts", {}, 1.0) for y in range(2, 7)},
}
#: What a local copy must look like, per task, for error messages.
LAYOUTS = {
    "stsb": "stsb/sts-{split}.csv: TAB separated, unquoted: genre, file, year, id, score, sentence1, "
    "sentence2",
    "sickr": "sick/{file}: TAB separated with a header: pair_ID, sentence_A, sentence_B, relatedness_score, "
    "...",
    **{f"sts1{y}": f"sts12-16/STS1{y}/STS.input.<subset>.txt (sentence1 TAB sentence2 per line) with "
       "STS.gs.<subset>.txt beside it (gold score per line; an empty line marks an unscored pair)"
       for y in range(2, 7)},
}

#: Text forms. ``raw``: as distributed. ``senteval``: as SentEval's ``get_transfer_data.bash`` leaves the
#: files, i.e. what SimCSE scored: Moses-tokenised (``-no-escape``) and lower-cased for STS12-16 and STS-B,
#: tokenised only for SICK. ``mteb``: as in MTEB's copies: STS12-16 in SentEval's form (same distinct texts
#: and pairs, checked against MTEB's descriptive statistics), STS-B and SICK-R raw.
TEXT_FORMS = ("raw", "senteval", "mteb")


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


@functools.cache
def _moses():
    try:
        # imported when used: only the SentEval text form needs Moses tokenisation
        from sacremoses import MosesTokenizer
    except ImportError:
        raise ImportError("text='senteval' / 'mteb' tokenises with Moses as SentEval did: pip install "
                          "sacremoses (or use text='raw')") from None
    return MosesTokenizer(lang="en")


def senteval_text(sentence: str, lower: bool = True) -> str:
    """A sentence as SentEval's preprocessing leaves it: Moses tokens, no escaping, optionally lower-cased."""
    out = _moses().tokenize(sentence, escape=False, return_str=True)
    return out.lower() if lower else out


def apply_text_form(task: str, pairs: STSPairs, text: str) -> STSPairs:
    """``pairs`` of ``task`` in the form ``text`` (see :data:`TEXT_FORMS`); ``raw`` returns them unchanged."""
    if text not in TEXT_FORMS:
        raise DataError(f"unknown text form {text!r}; choose from {', '.join(TEXT_FORMS)}")
    semeval = task in STS_TASKS[:5]
    if text == "raw" or (text == "mteb" and not semeval) or task not in STS_TASKS:
        return pairs
    lower = task != "sickr"

    def form(sentences: list[str]) -> list[str]:
        return [senteval_text(s, lower) for s in sentences]

    # not _replace: STSPairs overrides __len__, which NamedTuple._make relies on
    return STSPairs(pairs.name, form(pairs.sentences1), form(pairs.sentences2), pairs.scores)


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


def read_semeval_subsets(folder: Path, name: str) -> list[STSPairs]:
    """One :class:`STSPairs` per ``STS.input.<subset>.txt`` of a SemEval year (named ``<subset>``), unscored
    pairs skipped. Gold files without an input file (STS13 ``SMT``, licensed separately; STS12 ``ALL``, a
    concatenation) are ignored, as in SentEval."""
    inputs = sorted(folder.glob("STS.input.*.txt"))
    if not inputs:
        raise DataError(f"{folder}: no STS.input.<subset>.txt files (expected the SemEval layout, see "
                        "datamodules/sts.py)")
    subsets = []
    for inp in inputs:
        gold = folder / inp.name.replace("STS.input.", "STS.gs.")
        if not gold.exists():
            raise DataError(f"{inp}: its gold file {gold.name} is missing")
        pairs = inp.read_text(encoding="utf-8").splitlines()
        golds = gold.read_text(encoding="utf-8").splitlines()
        if len(golds) != len(pairs):
            raise DataError(f"{gold}: {len(golds)} lines but {inp.name} has {len(pairs)}")
        s1, s2, scores = [], [], []
        for n, (line, g) in enumerate(zip(pairs, golds), 1):
            if not g.strip():
                continue  # an unscored pair, by the organisers' convention
            fields = line.split("\t")
            if len(fields) < 2:
                raise DataError(f"{inp}:{n}: expected sentence1 TAB sentence2")
            a, b = _pair(fields[0], fields[1], f"{inp}:{n}")
            s1.append(a), s2.append(b), scores.append(_score(g, f"{gold}:{n}", 0.0, 5.0))
        subsets.append(STSPairs(inp.name[len("STS.input."):-len(".txt")], s1, s2, scores))
    return subsets


def concat_pairs(name: str, parts: list[STSPairs]) -> STSPairs:
    """The pairs of all ``parts`` in order, as one :class:`STSPairs` called ``name``."""
    return STSPairs(name, [s for p in parts for s in p.sentences1], [s for p in parts for s in p.sentences2],
                    [v for p in parts for v in p.scores])


def read_tsv(path: Path, name: str, columns=("sentence1", "sentence2", "score"), score_range=(0.0, 5.0)) -> STSPairs:
    s1, s2, scores = [], [], []
    rows, lines = read_table(path, columns, kind="tsv")  # tab-separated whatever the suffix (SICK.txt)
    for (first, second, score), n in zip(rows, lines):
        where = f"{path}:{n}"
        a, b = _pair(first, second, where)
        s1.append(a), s2.append(b), scores.append(_score(score, where, *score_range))
    if not s1:
        raise DataError(f"{path}: no pairs after the header")
    return STSPairs(name, s1, s2, scores)


def load_sts_subsets(task: str, split: str = "test", data_root: str | None = None, hub: bool = True,
                     text: str = "raw") -> list[STSPairs]:
    """Load one STS task as its subsets: a name from :data:`STS_TASKS` or a path to a TSV with the header
    ``sentence1 TAB sentence2 TAB score``.

    STS12-16 give one :class:`STSPairs` per SemEval file (named after the subset); the others give one, named
    after the task. STS12-16 have only a test set. Local files under ``data_root`` are preferred; the hub is
    tried otherwise, unless ``hub`` is False. The hub copies of STS12-16 are single, already concatenated
    sets, already in SentEval's text form. ``text`` picks the text form (:data:`TEXT_FORMS`).
    """
    subsets, from_hub = _load_subsets(task, split, data_root, hub)
    if from_hub and task in STS_TASKS[:5]:
        return subsets  # MTEB's copies: SentEval's form already
    return [apply_text_form(task, p, text) for p in subsets]


def _load_subsets(task: str, split: str, data_root: str | None, hub: bool) -> tuple[list[STSPairs], bool]:
    """The subsets, and whether they came from the hub."""
    if task.endswith((".tsv", ".txt", ".csv")):
        local = resolve(task, data_root)
        if local is None:
            raise DataError(f"STS file {task!r} not found (looked in {data_root or '.'} and the working directory)")
        return [read_tsv(local, local.stem)], False
    if task not in STS_TASKS:
        raise DataError(f"unknown STS task {task!r}: choose from {', '.join(STS_TASKS)} or give a .tsv path "
                        "(header sentence1, sentence2, score)")
    allowed = SPLITS.get(task, ("test",))
    if split not in allowed:
        raise DataError(f"{task} has no split {split!r}; it has {', '.join(allowed)}")
    if task == "stsb":
        relative = f"stsb/sts-{split}.csv"
        path = resolve(relative, data_root)
        if path is not None:
            return [read_stsb(path)], False
    elif task == "sickr":
        relative = f"sick/{SICK_FILES[split]}"
        path = resolve(relative, data_root)
        if path is not None:
            columns = ("sentence_A", "sentence_B", "relatedness_score")
            return [read_tsv(path, "sickr", columns, (1.0, 5.0))], False
    else:
        relative = f"sts12-16/STS{task[3:]}"
        folder = resolve(relative, data_root)
        if folder is not None:
            return read_semeval_subsets(folder, task), False
    layout = LAYOUTS[task].format(split=split, file=SICK_FILES.get(split))
    where = Path(data_root) / relative if data_root else Path(relative)
    if not hub:
        raise DataError(f"{task} ({split}): {where} not found. Expected under data_root: {layout} "
                        "(see datamodules/sts.py)")
    name, split_names, scale = HUB[task]
    hint = f"Or set data_root to a folder holding {layout} (see datamodules/sts.py); {where} does not exist."
    ds = load_hub_dataset(name, split_names.get(split, split), hint)
    scores = [float(s) * scale for s in ds["score"]]
    return [STSPairs(task, list(ds["sentence1"]), list(ds["sentence2"]), scores)], True


def load_sts(task: str, split: str = "test", data_root: str | None = None, hub: bool = True,
             text: str = "raw") -> STSPairs:
    """Load one STS task, all its subsets concatenated (see :func:`load_sts_subsets`)."""
    subsets = load_sts_subsets(task, split, data_root, hub, text)
    if len(subsets) == 1:
        return subsets[0]
    return concat_pairs(task, subsets)


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
