"""NLI triplets (anchor, entailment, contradiction) for supervised SimCSE, or pairs without the hard negative."""

from __future__ import annotations

from pathlib import Path

from core.errors import DataError
from core.hub import load_hub_dataset, looks_like_hub_name
from datamodules.base import TextDataModule, read_table, resolve

HUB_COLUMNS = {"sentence-transformers/all-nli": ["anchor", "positive", "negative"]}


def read_rows(source: str, columns: list[str], data_root: str | None = None, split: str = "train",
              subset: str | None = None, data_files: str | None = None, option: str = "columns"
              ) -> list[tuple[str, ...]]:
    """Rows of the given ``columns`` from a CSV/TSV file with a header, or a hub dataset. Every cell must be a
    non-empty sentence; a row with the wrong number of fields is an error naming its line. ``option`` is what a
    missing column tells the user to set (``columns``: ``data.columns``; a flag such as ``--anchor_column``)."""
    path = resolve(source, data_root)
    if path is None:
        if not looks_like_hub_name(source):
            raise DataError(f"NLI file {source!r} not found (looked in {data_root or '.'} and the working directory)")
        hint = "Give data.source a local CSV with the header sent0,sent1,hard_neg instead."
        ds = load_hub_dataset(source, split, hint, subset, data_files)
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            where = option if option.startswith("-") else f"data.{option}"
            raise DataError(f"{source}: no column(s) {missing}; columns are {ds.column_names} (set {where})")
        rows, where, lines = list(zip(*(ds[c] for c in columns))), source, None
    else:
        where, (rows, lines) = str(path), read_table(path, columns, option=option)
    for i, row in enumerate(rows):
        for c, text in zip(columns, row):
            if not isinstance(text, str) or not text.strip():
                at = f"line {lines[i]}" if lines is not None else f"row {i}"
                raise DataError(f"{where}: {at} has an empty {c!r}")
    return [tuple(t.strip() for t in row) for row in rows]


class NLIDataModule(TextDataModule):
    """Rows of (anchor, positive[, hard negative]) for supervised contrastive training.

    Args:
        source: CSV (``sent0,sent1,hard_neg``, as SimCSE's ``nli_for_simcse.csv``) or TSV path, absolute or under
            ``data_root``; or a hub dataset such as ``sentence-transformers/all-nli`` (subset ``triplet``).
        columns: the columns, in order anchor, positive[, hard negative]. Default: ``anchor, positive, negative``
            for all-nli, else ``sent0, sent1, hard_neg``. Two columns train without hard negatives.
        split, subset: hub split and configuration.
        data_files: file(s) inside a hub dataset repository, e.g. ``nli_for_simcse.csv``.
        **kwargs: ``data_root``, ``batch_size``, ... of :class:`~datamodules.base.TextDataModule`.
    """

    def __init__(
        self,
        source: str,
        columns: list[str] | None = None,
        split: str = "train",
        subset: str | None = None,
        data_files: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if columns is None:
            columns = HUB_COLUMNS.get(source, ["sent0", "sent1", "hard_neg"])
            subset = subset or ("triplet" if source in HUB_COLUMNS else None)
        if len(columns) not in (2, 3):
            raise DataError(f"data.columns must name 2 or 3 columns (anchor, positive[, hard negative]), got {columns}")
        self.source, self.columns, self.split, self.subset = source, list(columns), split, subset
        self.data_files = data_files
        self.source_name = Path(source).name

    def load_rows(self) -> list[tuple[str, ...]]:
        return read_rows(self.source, self.columns, self.data_root, self.split, self.subset, self.data_files)
