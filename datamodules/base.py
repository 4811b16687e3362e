"""Shared plumbing: locating files or hub datasets, tokenising once, padding per batch."""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.errors import DataError
from core.tensors import pad_ids
from datamodules.samplers import LengthGroupedSampler, ResumableSampler


def resolve(source: str, data_root: str | None) -> Path | None:
    """The local file or folder ``source`` names (absolute, or relative to ``data_root`` or the working
    directory), or None when nothing local exists (the caller may then try the Hugging Face hub).

    Raises:
        DataError: nothing exists but a candidate is a symbolic link that leads nowhere (:func:`broken_link`):
            "not found" would hide why, and the hub would be asked for a file that is on disk.
    """
    candidates = [Path(source)] if Path(source).is_absolute() else []
    if not candidates:
        if data_root:
            candidates.append(Path(data_root) / source)
        candidates.append(Path(source))
    for path in candidates:
        if path.exists():
            return path
    for path in candidates:
        if why := broken_link(path):
            raise DataError(why)
    return None


def broken_link(path: Path) -> str | None:
    """Why ``path`` cannot be opened when a symbolic link is the cause (a loop of links, or a link to a missing
    file), in words naming it; None otherwise."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop (following its links never reaches a file: {err.strerror})"
        if path.is_symlink():
            return (f"{path} is a dangling symbolic link: it points to {os.path.realpath(path)}, which does not "
                    "exist")
    return None


#: Suffixes of structured files the text readers refuse rather than read line by line as sentences.
STRUCTURED_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".gz", ".zip", ".bz2", ".xz", ".xlsx", ".pkl", ".npy")


def text_file_kind(path: Path) -> str:
    """``csv`` or ``tsv`` by suffix (any case), else ``txt`` (one sentence per line: .txt, .en, .tok, no suffix...);
    a DataError for structured formats that line-by-line reading would turn into garbage sentences."""
    suffix = path.suffix.lower()
    if suffix in STRUCTURED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}: give a text file (one sentence per line), a "
                        ".csv or .tsv file with a header, or a folder written by datasets' save_to_disk")
    return {".csv": "csv", ".tsv": "tsv"}.get(suffix, "txt")


#: Leading bytes of compressed or archive formats, which no text encoding decodes.
MAGIC = {b"\x1f\x8b": "gzip-compressed (gunzip it)", b"PK\x03\x04": "a zip archive (unzip it)",
         b"BZh": "bzip2-compressed (bunzip2 it)", b"\xfd7zXZ\x00": "xz-compressed (unxz it)",
         b"\x28\xb5\x2f\xfd": "zstd-compressed (unzstd it)"}


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents with ``\n`` line ends (a byte-order mark dropped), or a DataError naming it."""
    with path.open("rb") as f:
        head = f.read(8)
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path}: not text but {what}, whatever its name says")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split at line ends only (U+2028 and the like stay inside the sentence)."""
    text = read_text(path)
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_table(path: Path, columns: Sequence[str], kind: str | None = None, option: str | None = None
               ) -> tuple[list[tuple[str, ...]], list[int]]:
    """The ``columns`` of every row of a local CSV/TSV file with a header, and each row's (first) line number
    (``kind`` ``"csv"``/``"tsv"`` overrides the suffix; ``option``: the config option naming the columns, e.g.
    ``columns`` for ``data.columns``; a command-line flag such as ``--anchor_column`` is named as it is).

    TSV fields are split on tabs only and read as raw text: quote characters are text (as in the SentEval, SimCSE,
    STS and WiC files); a field that looks CSV-quoted (``"..."`` with doubled ``""`` inside, as pandas writes) is an
    error rather than a silent literal. CSV fields follow RFC 4180 quoting, strictly: a quoted field may span lines
    (pandas and Excel write them) when the record still parses and has the header's field count; a stray quote that
    would swallow the lines after it is an error naming its line. Every row must have as many fields as the header
    (an unquoted comma in a CSV sentence adds one). Blank lines are skipped. Each problem is a DataError naming the
    file and line.
    """

    kind = kind or text_file_kind(path)
    records: list[tuple[int, int, list[str]]] = []  # (first line, last line, fields)
    if kind == "tsv":
        records = [(n, n, line.split("\t")) for n, line in enumerate(read_lines(path), 1)]
    else:
        reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
        end = 0
        try:
            for fields in reader:
                records.append((end + 1, reader.line_num, fields))
                end = reader.line_num
        except csv.Error as err:
            raise DataError(f"{path}: line {end + 1}: {err} (an unclosed or stray quote? quote fields whose text "
                            "contains quotes, doubling the inner ones)") from None
    if not records:
        raise DataError(f"{path}: the file is empty (expected a header with {', '.join(columns)})")
    header = [h.strip() for h in records[0][2]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: the header {header} lacks column(s) {missing}"
                        + (f" (set {option if option.startswith('-') else 'data.' + option})" if option else ""))
    idx = [header.index(c) for c in columns]
    rows, line_numbers = [], []
    for n, last, fields in records[1:]:
        if not fields or fields == [""]:  # a blank line holds no data
            continue
        if len(fields) != len(header):
            if last > n:
                where, hint = f"lines {n}-{last} (one quoted record)", " (an unclosed quote?)"
            else:
                where = f"line {n}"
                hint = " (quote fields that contain commas)" if kind == "csv" and len(fields) > len(header) else ""
            raise DataError(f"{path}: {where} has {len(fields)} field(s), the header has {len(header)}{hint}")
        if kind == "tsv":
            quoted = next((f for f in fields if len(f) > 2 and f[0] == f[-1] == '"' and '""' in f[1:-1]), None)
            if quoted is not None:
                raise DataError(f"{path}: line {n} holds a CSV-quoted field ({quoted[:40]!r}...); TSV fields are read "
                                "as raw text: write the file without quoting (csv.QUOTE_NONE) or as .csv")
        rows.append(tuple(fields[i] for i in idx))
        line_numbers.append(n)
    return rows, line_numbers


class TokenizedRows(Dataset):
    """Rows of V token-id lists each (V = 1 sentence, 2 pair, 3 triplet)."""

    def __init__(self, rows: list[tuple[list[int], ...]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], ...]:
        return self.rows[i]


class PadCollator:
    """Pads a list of V-tuples of ids to ``input_ids`` / ``attention_mask`` of shape (B, V, L).

    L is the longest sequence of the batch, rounded up to a multiple of ``pad_to_multiple_of`` when set: a
    compiled encoder (or CUDA graphs) then sees a few lengths instead of every one, and tensor-core shapes align.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1 or null, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[tuple[list[int], ...]]) -> dict[str, Tensor]:
        B, V = len(rows), len(rows[0])
        L = max(len(ids) for row in rows for ids in row)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, mask = pad_ids([ids for row in rows for ids in row], self.pad_token_id, L)  # (B*V, L)
        return {"input_ids": input_ids.view(B, V, L), "attention_mask": mask.view(B, V, L).long()}


class ResumesMidEpoch:
    """Datamodule mixin: every checkpoint (a preemption one too) records where the training loop is in its epoch,
    and a resumed run's first training sampler starts after the batches the interrupted run already trained on
    (Lightning itself restarts a non-stateful loader at the epoch's first batch)."""

    _resume: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.seed = state_dict.get("seed", self.seed)
            self._resume = (state_dict["epoch"], state_dict["batches"])

    def pop_resume(self) -> tuple[int, int] | None:
        """(epoch, batches already trained in it) once after a resume, then None."""
        resume, self._resume = self._resume, None
        return resume


class TextDataModule(ResumesMidEpoch, pl.LightningDataModule):
    """Base for datamodules whose training rows are tuples of texts.

    Subclasses implement :meth:`load_rows` (texts, validated) and :attr:`source_name`. Tokenisation happens once,
    on the first dataloader request after :meth:`connect` handed over the tokenizer, and is cached.

    Args:
        data_root: folder that relative paths are resolved against (e.g. ``../shared/data``).
        batch_size: rows per batch on each process.
        num_workers: DataLoader worker processes.
        shuffle: shuffle training rows each epoch.
        drop_last: drop the last incomplete batch (keep True for contrastive training under DDP: every rank must
            gather tensors of the same shape).
        max_rows: keep only the first N rows (quick experiments).
        pin_memory: pin host memory for faster copies to a GPU.
        seed: seed of the shuffling order (each epoch's order is drawn from seed + epoch, so a run resumed from a
            checkpoint, even mid-epoch, sees the same batches as an uninterrupted one).
        pad_to_multiple_of: round each batch's padded length up to a multiple of this (e.g. 8 or 16), so a
            compiled encoder sees few shapes; None pads to the longest row only.
        group_by_length: batch rows of similar length together within shuffled windows
            (:class:`LengthGroupedSampler`): less padding; still deterministic per seed and resumable.
        length_group_batches: batches per sorting window of ``group_by_length``.
        no_duplicates: build batches in which no text appears twice, across all texts of all rows (anchor,
            positive, hard negative), so that a sentence repeated in the data (an NLI premise in several triplets)
            never meets itself as an in-batch negative (:class:`~datamodules.no_duplicates.NoDuplicatesSampler`).
            A row colliding with the batch waits for a later one; rows that have no duplicate-free place left go
            into the last batches anyway, so none is lost. The batches of all processes of one step together are
            duplicate-free too (negatives are gathered across processes). Still deterministic per seed and
            resumable mid-epoch; with ``group_by_length`` the length windows count global batches. Rank zero logs
            each epoch's count of deferred rows. A row's own texts are not compared with each other. None (the
            default): on for rows of 2+ texts (pairs, triplets), off for single sentences.
    """

    source_name: str = "data"

    def __init__(
        self,
        data_root: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_rows: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        length_group_batches: int = 50,
        no_duplicates: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1 or null, got {pad_to_multiple_of}")
        if length_group_batches < 1:
            raise DataError(f"length_group_batches must be >= 1, got {length_group_batches}")
        if no_duplicates is not None and not isinstance(no_duplicates, bool):
            raise DataError(f"no_duplicates must be true, false or null (on for rows of 2+ texts), got "
                            f"{no_duplicates!r}")
        if max_rows is not None and max_rows < 1:
            raise DataError(f"max_rows must be >= 1 or null (all rows), got {max_rows}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.length_group_batches = length_group_batches
        self.no_duplicates = no_duplicates
        self.data_root = data_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_rows = max_rows
        self.pin_memory = pin_memory
        self.seed = seed
        self._sampler: ResumableSampler | None = None
        self.tokenizer = None
        self.max_length: int | None = None
        self._texts: list[tuple[str, ...]] | None = None
        self._dataset: TokenizedRows | None = None
        self._keys: list[tuple[int, ...]] | None = None
        self._recorded_no_duplicates: bool | None = None  # what the resumed checkpoint's run used

    def load_rows(self) -> list[tuple[str, ...]]:
        raise NotImplementedError

    def connect(self, tokenizer, max_length: int) -> None:
        """Hand over the model's tokenizer; invalidates the token cache if either changed."""
        if tokenizer is not self.tokenizer or max_length != self.max_length:
            self.tokenizer, self.max_length, self._dataset = tokenizer, max_length, None

    def setup(self, stage: str | None = None) -> None:
        if self._texts is None:
            rows = self.load_rows()
            if self.max_rows is not None:
                rows = rows[: self.max_rows]
            if not rows:
                raise DataError(f"{self.source_name}: no rows to train on")
            self._texts = rows

    @property
    def texts(self) -> list[tuple[str, ...]]:
        self.setup()
        return self._texts

    @property
    def views(self) -> int:
        """V, the sentences per row."""
        return len(self.texts[0])

    @property
    def avoids_duplicates(self) -> bool:
        """Whether training batches are built by the no-duplicates sampler: ``no_duplicates`` when set, else what
        the resumed checkpoint's run used (a checkpoint older than the option: off), else on for rows of 2+ texts.
        A resumed run must rebuild its epoch's order to skip to the same sample."""
        if self.no_duplicates is not None:
            return self.no_duplicates
        if self._recorded_no_duplicates is not None:
            return self._recorded_no_duplicates
        return self.views >= 2

    def state_dict(self) -> dict:
        state = super().state_dict()
        if state:
            state["no_duplicates"] = self.avoids_duplicates
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict:
            self._recorded_no_duplicates = bool(state_dict.get("no_duplicates", False))

    def text_keys(self) -> list[tuple[int, ...]]:
        """Each row's ``views`` texts as integers (equal texts, equal integers), computed once."""
        if self._keys is None:
            from datamodules.no_duplicates import text_keys  # imports this module

            self._keys = text_keys([row[: self.views] for row in self.texts])
        return self._keys

    def tokenized(self) -> TokenizedRows:
        if self._dataset is None:
            self._dataset = TokenizedRows(self.tokenize_views(self.texts, len(self.texts[0])))
        return self._dataset

    def tokenize_views(self, rows: list[tuple[str, ...]], V: int) -> list[tuple[list[int], ...]]:
        """Token ids of the first ``V`` texts of every row (one tokenizer call for all), as rows of ``V`` lists."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: call connect(tokenizer, max_length) first "
                "(a LightningModule derived from EmbeddingModule does this in its setup hook)"
            )
        flat = [t for row in rows for t in row[:V]]
        ids = self.tokenizer(flat, truncation=True, max_length=self.max_length)["input_ids"]
        return [tuple(ids[i * V : (i + 1) * V]) for i in range(len(rows))]

    def train_dataloader(self) -> DataLoader:
        dataset = self.tokenized()
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = len(dataset) // world
        if self.drop_last and per_rank < self.batch_size:
            raise DataError(
                f"{self.source_name}: batch_size {self.batch_size} is larger than the {per_rank} rows each of the "
                f"{world} process(es) gets ({len(dataset)} rows in all) and drop_last is on, so there would be "
                "no batch at all: lower data.batch_size or add data"
            )
        # Our own sampler, also on one process: Lightning's would always shuffle the training set, and this one
        # draws each epoch's order from (seed, epoch) and can skip what a resumed run already saw.
        rank = self.trainer.global_rank if self.trainer is not None else 0
        recorded = self._recorded_no_duplicates
        if recorded is not None and self.avoids_duplicates != recorded:
            raise DataError(
                f"data.no_duplicates is {str(self.no_duplicates).lower()} but the checkpoint's run had it "
                f"{'on' if recorded else 'off'}: the batch order differs, so the resumed epoch would not continue "
                f"where it stopped; resume with data.no_duplicates={str(recorded).lower()} (or null)"
            )
        kwargs = dict(num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        lengths = [max(len(ids) for ids in row) for row in dataset.rows] if self.group_by_length else None
        if self.avoids_duplicates:
            from datamodules.no_duplicates import NoDuplicatesSampler  # imports this module

            sampler = NoDuplicatesSampler(dataset, self.text_keys(), self.batch_size, lengths,
                                          self.length_group_batches, **kwargs)
        elif self.group_by_length:
            sampler = LengthGroupedSampler(dataset, lengths, self.batch_size, self.length_group_batches, **kwargs)
        else:
            sampler = ResumableSampler(dataset, **kwargs)
        if (resume := self.pop_resume()) is not None:
            epoch, batches = resume
            sampler.set_epoch(epoch)
            sampler.skip = batches * self.batch_size
        self._sampler = sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collator(),
        )

    def collator(self):
        """The training DataLoader's ``collate_fn``; datamodules whose rows carry more than token ids override it."""
        return PadCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)
