"""Plain sentences (wiki-style): unsupervised SimCSE, HNCSE, MCR2 teachers, activation caches."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.utilities import rank_zero_warn

from core.errors import DataError
from core.hub import load_hub_dataset, looks_like_hub_name
from datamodules.base import TextDataModule, read_lines, read_table, resolve, text_file_kind


def read_sentences(
    source: str,
    data_root: str | None = None,
    column: str = "text",
    split: str = "train",
    skip_empty: bool = False,
    data_files: str | None = None,
) -> list[str]:
    """Sentences from a ``.txt`` file (one per line), a ``.csv``/``.tsv`` file with a header (``column``), or a
    Hugging Face dataset (hub name or saved folder) with a text ``column``.

    Empty sentences raise :class:`DataError` naming the row, unless ``skip_empty`` (then a warning gives the count).
    """
    path = resolve(source, data_root)
    if path is None:
        if not looks_like_hub_name(source):
            raise DataError(
                f"sentence file {source!r} not found (looked in {data_root or '.'} and the working directory)"
            )
        hint = f"Give data.source a local .txt file (one sentence per line) instead, e.g. {source.split('/')[-1]}.txt"
        ds = load_hub_dataset(source, split, hint, data_files=data_files)
        where = f"{source} [{split}]"
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r}; columns are {ds.column_names} (set data.column)")
        texts, lines = list(ds[column]), None
    elif path.is_dir():
        # imported when used: datasets (~1 s to import) only for hub datasets and save_to_disk folders
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path} is a folder but not a dataset written by datasets' save_to_disk: give a .txt, "
                            ".csv or .tsv file inside it") from None
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        where = str(path)
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r}; columns are {ds.column_names} (set data.column)")
        texts, lines = list(ds[column]), None
    elif text_file_kind(path) == "txt":
        where, texts = str(path), read_lines(path)
        lines = list(range(1, len(texts) + 1))
    else:
        rows, lines = read_table(path, [column], option="column")
        where, texts = str(path), [r[0] for r in rows]
    texts = [t.strip() if isinstance(t, str) else t for t in texts]
    if skip_empty:
        kept = [t for t in texts if isinstance(t, str) and t]
        if len(kept) < len(texts):
            rank_zero_warn(f"{where}: skipped {len(texts) - len(kept)} empty sentence(s) of {len(texts)}")
        return kept
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            at = f"line {lines[i]}" if lines is not None else f"row {i}"
            raise DataError(f"{where}: {at} is an empty sentence (set data.skip_empty=true to drop such rows)")
    return texts


class SentencesDataModule(TextDataModule):
    """One sentence per row; the model makes its own views (dropout).

    Args:
        source: ``.txt`` / ``.csv`` / ``.tsv`` path (absolute or under ``data_root``), a folder written by
            ``datasets.save_to_disk``, or a Hugging Face hub dataset name (e.g. ``princeton-nlp/datasets-for-simcse``
            with ``column: text``).
        column: text column for CSV/TSV files and hub datasets.
        split: hub split.
        data_files: file(s) inside a hub dataset repository, e.g. ``wiki1m_for_simcse.txt``.
        skip_empty: drop empty sentences (with a warning giving the count) instead of raising.
        **kwargs: ``data_root``, ``batch_size``, ... of :class:`~datamodules.base.TextDataModule`.
    """

    def __init__(
        self,
        source: str,
        column: str = "text",
        split: str = "train",
        skip_empty: bool = False,
        data_files: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.source, self.column, self.split, self.skip_empty = source, column, split, skip_empty
        self.data_files = data_files
        self.source_name = Path(source).name

    def load_rows(self) -> list[tuple[str, ...]]:
        return [(s,) for s in read_sentences(
            self.source, self.data_root, self.column, self.split, self.skip_empty, self.data_files)]
