"""Sentences with a row index and optional group labels, for MCR2 projection heads over a frozen teacher.

Every batch carries ``index`` (B,): the row's position in the dataset, so a module can look up embeddings it
computed once per sentence (a frozen teacher's, or k-means clusters of them); sentence ``v`` of row ``i`` has the
flat position ``i * V + v`` in :meth:`GroupedTextDataModule.sentence_ids`. Where the groups come from:

- pairs: rows of V >= 2 sentences, each row one group, e.g. ``columns: [sent0, sent1]`` on an NLI CSV gives
  (premise, entailment) 2-member groups. A batch always holds whole groups.
- given labels: ``label_column`` names a column whose value is the row's group; batches carry ``group`` (B,).
- k-means: plain sentences; the module clusters the teacher's embeddings once (:func:`kmeans_groups`).

Plain sentences may come from several places: ``extra_sources`` appends the sentences of more files (or of an STS
task's train pairs, without their scores) to ``source`` as one-sentence rows, e.g. every unlabelled sentence
available to a compression head (:func:`read_extra_sentences`).

Why not NLIDataModule with 2 columns: it works for pairs, but its batches carry no row index, so the teacher
would be run on every batch and k-means clusters could not be looked up.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from core.errors import DataError
from core.hub import looks_like_hub_name
from datamodules.base import PadCollator, TextDataModule, resolve
from datamodules.nli import read_rows
from datamodules.sentences import read_sentences
from datamodules.sts import SPLITS, STS_TASKS, load_sts


class GroupedRows(Dataset):
    """Items ``(index, token ids of the row's V sentences, group label or -1)``."""

    def __init__(self, rows: list[tuple[list[int], ...]], labels: list[int] | None) -> None:
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, tuple[list[int], ...], int]:
        return i, self.rows[i], self.labels[i] if self.labels is not None else -1


class GroupCollator:
    """``input_ids`` / ``attention_mask`` (B, V, L), ``index`` (B,) and, when rows are labelled, ``group`` (B,)."""

    def __init__(self, pad_token_id: int, labelled: bool, pad_to_multiple_of: int | None = None) -> None:
        self.pad, self.labelled = PadCollator(pad_token_id, pad_to_multiple_of), labelled

    def __call__(self, items: list[tuple[int, tuple[list[int], ...], int]]) -> dict[str, Tensor]:
        index, rows, labels = zip(*items)
        out = self.pad(list(rows))
        out["index"] = torch.tensor(index, dtype=torch.long)
        if self.labelled:
            out["group"] = torch.tensor(labels, dtype=torch.long)
        return out


def read_extra_sentences(spec: str, data_root: str | None = None) -> list[str]:
    """The sentences of one ``data.extra_sources`` entry.

    Args:
        spec: ``FILE`` (a ``.txt`` file, one sentence per line, or a CSV/TSV with a ``text`` column),
            ``FILE:col1,col2`` (every row's texts in those columns of a CSV/TSV with a header, e.g.
            ``nli/snli_devtest_for_simcse.csv:sent0,sent1,hard_neg``), or ``TASK:train`` for an STS task's
            (``stsb``, ``sickr``) train pairs, both sentences, without their scores. Dev and test splits are refused:
            dev pairs select checkpoints and test pairs report results, so neither may be trained on.
        data_root: folder that relative paths are resolved against.
    """
    name, colon, rest = spec.partition(":")
    if name in STS_TASKS:
        split = rest or "train"
        if name not in SPLITS:
            raise DataError(f"data.extra_sources {spec!r}: {name} has only a test split, which is never trained on")
        if split != "train":
            raise DataError(f"data.extra_sources {spec!r}: only an STS train split may be trained on ({name} "
                            f"{split} is kept for selection or evaluation); use e.g. '{name}:train'")
        pairs = load_sts(name, split, data_root, hub=False)
        return list(pairs.sentences1) + list(pairs.sentences2)
    if not colon:
        return read_sentences(spec, data_root, skip_empty=True)
    columns = [c.strip() for c in rest.split(",") if c.strip()]
    if not columns:
        raise DataError(f"data.extra_sources {spec!r}: no column names after ':'")
    return [text for row in read_rows(name, columns, data_root) for text in row]


def kmeans_groups(embeddings_ND: Tensor, num_clusters: int, seed: int = 0) -> Tensor:
    """Cluster id (N,) of each L2-normalised row: scikit-learn's KMeans (k-means++, 3 restarts), on CPU.

    On the unit sphere, Euclidean k-means ranks points like cosine similarity does.
    """
    # imported when used: scikit-learn (~1 s to import) only for k-means grouping
    from sklearn.cluster import KMeans

    n = embeddings_ND.shape[0]
    if not 2 <= num_clusters <= n:
        raise DataError(f"num_clusters must be between 2 and the number of sentences ({n}), got {num_clusters}")
    x_ND = torch.nn.functional.normalize(embeddings_ND.detach().float().cpu(), dim=-1).numpy()
    labels = KMeans(num_clusters, n_init=3, random_state=seed).fit_predict(x_ND)
    return torch.as_tensor(labels, dtype=torch.long)


class GroupedTextDataModule(TextDataModule):
    """Rows of sentences with their index (and group label) for MCR2 training.

    Args:
        source: a ``.txt`` file (one sentence per line), a ``.csv``/``.tsv`` file with a header, or a Hugging
            Face hub dataset name; absolute or under ``data_root``.
        columns: the text columns of each row, in order; several columns make each row one group (pairs).
            Default: ``[text]`` (a ``.txt`` file has no columns).
        label_column: a column holding each row's group label (any strings, mapped to ids in sorted order).
        split, subset, data_files: hub dataset split, configuration and file(s).
        batch_size: rows per batch on each process (default 1000: the coding rate depends on the batch size, and
            the MCR2 paper uses m = 1000; with pairs, 500 rows are 1000 sentences).
        extra_sources: more sentences appended to ``source``'s as one-sentence rows (see
            :func:`read_extra_sentences` for the entries); needs one text column and no ``label_column``.
            Repeated sentences of the whole set are then kept once (the first).
        **kwargs: see :class:`~datamodules.base.TextDataModule` (data_root, shuffle, drop_last, max_rows, seed...).
    """

    def __init__(
        self,
        source: str,
        columns: list[str] | None = None,
        label_column: str | None = None,
        split: str = "train",
        subset: str | None = None,
        data_files: str | None = None,
        batch_size: int = 1000,
        extra_sources: list[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.columns = list(columns) if columns else ["text"]
        if label_column is not None and label_column in self.columns:
            raise DataError(f"data.label_column {label_column!r} is also one of data.columns {self.columns}")
        self.extra_sources = list(extra_sources or [])
        if self.extra_sources and (len(self.columns) != 1 or label_column is not None):
            raise DataError(f"data.extra_sources adds single sentences: it needs one text column and no "
                            f"data.label_column (got columns {self.columns}, label_column {label_column!r})")
        self.source, self.label_column, self.split, self.subset = source, label_column, split, subset
        self.data_files = data_files
        self.source_name = Path(source).name
        self.label_names: list[str] = []

    @property
    def views(self) -> int:
        """V, the sentences per row."""
        return len(self.columns)

    def load_rows(self) -> list[tuple[str, ...]]:
        """Rows of the V texts, followed by the label when ``label_column`` is set; then the ``extra_sources``
        sentences (each sentence once)."""
        rows = self.source_rows()
        if not self.extra_sources:
            return rows
        texts = chain((row[0] for row in rows), *(read_extra_sentences(s, self.data_root) for s in self.extra_sources))
        return [(text,) for text in dict.fromkeys(texts)]

    def source_rows(self) -> list[tuple[str, ...]]:
        """The rows of ``source`` alone."""
        path = resolve(self.source, self.data_root)
        if path is None and not looks_like_hub_name(self.source):
            raise DataError(f"data file {self.source!r} not found (looked in {self.data_root or '.'} and the "
                            "working directory)")
        if path is not None and path.suffix == ".txt":
            if self.label_column is not None or self.columns != ["text"]:
                raise DataError(f"{path}: a .txt file holds one sentence per line and no columns; use a CSV/TSV "
                                "with a header for data.columns / data.label_column")
            return [(s,) for s in read_sentences(str(path))]
        extra = [self.label_column] if self.label_column else []
        return read_rows(self.source, self.columns + extra, self.data_root, self.split, self.subset,
                         self.data_files)

    def tokenized(self) -> GroupedRows:
        if self._dataset is None:
            V, rows = self.views, self.texts
            ids = self.tokenize_views(rows, V)
            labels = None
            if self.label_column is not None:
                self.label_names = sorted({row[V] for row in rows})
                ids_of = {name: i for i, name in enumerate(self.label_names)}
                labels = [ids_of[row[V]] for row in rows]
            self._dataset = GroupedRows(ids, labels)
        return self._dataset

    def collator(self) -> GroupCollator:
        return GroupCollator(self.tokenizer.pad_token_id, self.label_column is not None, self.pad_to_multiple_of)

    def sentence_ids(self) -> list[list[int]]:
        """Token ids of every sentence, sentence ``v`` of row ``i`` at position ``i * V + v``."""
        return [ids for row in self.tokenized().rows for ids in row]

    def labels(self) -> Tensor | None:
        """Group label id per row (N,), or None without ``label_column``."""
        labels = self.tokenized().labels
        return None if labels is None else torch.tensor(labels, dtype=torch.long)
