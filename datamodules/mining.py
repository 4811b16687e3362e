"""Hard negatives for (anchor, positive) pairs, mined by sentence-transformers: SimCSE-style triplets.

    python train.py mine --model sentence-transformers/all-MiniLM-L6-v2 \\
        --pairs ../shared/data/nli/snli_devtest_for_simcse.csv --output runs/mined/snli_mined.csv

The mining itself is ``sentence_transformers.util.mine_hard_negatives`` (its options pass through unchanged); this
module reads the pairs with the project's readers (:func:`datamodules.nli.read_rows`: one-line errors naming the file,
line and column), counts the pairs that got no negative (sentence-transformers drops them, saying only how many
negative slots stayed empty) and writes ``sent0,sent1,hard_neg`` rows, the CSV
:class:`~datamodules.nli.NLIDataModule` reads, atomically. The model is loaded by the command
(``evaluation.evaluate.load_sentence_transformer``): this module stands below the models.

What sentence-transformers does, which shapes the output:

- The candidates are the positives of every pair, plus ``corpus`` when given (the positives stay candidates then).
  An anchor's own positives (all of them, when the anchor appears in several pairs) and the anchor's own text are
  never its negatives.
- ``range_min`` / ``range_max`` are ranks in the anchor's candidate list ordered by the model's cosine, counted after
  those exclusions and after the score filters (``max_score``, ``min_score``, the margins) removed candidates.
- A repeated (anchor, positive) pair is mined once; here every input row still gets its triplets, so a pair that
  appears twice in the input appears twice in the output, as the input weighted it.
"""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from core.errors import DataError
from core.files import write_atomic
from datamodules.nli import read_rows

#: sentence-transformers' ``mine_hard_negatives`` before 5.7 fails with a torch error (``selected index k out of
#: range``, a mask shape mismatch) when the range or score limits leave a pair too few candidates, and does not check
#: ``range_min < range_max``: measured on 5.2 and 5.6.1; 5.7.0 rewrote it and passes the mining tests.
MINING_NEEDS = (5, 7)

#: The header of the written triplets: SimCSE's ``nli_for_simcse.csv``, NLIDataModule's default columns.
TRIPLET_COLUMNS = ("sent0", "sent1", "hard_neg")
SAMPLING_STRATEGIES = ("top", "random")


@dataclass
class MiningReport:
    """What :func:`mine_triplets` did: ``pairs`` input rows (``distinct_pairs`` of them different), ``triplets``
    rows out, the input rows that got no negative (``unmined``, indices into the pairs) and those that got fewer than
    ``num_negatives`` (``short``), and the seconds sentence-transformers took (encoding and search)."""

    pairs: int
    distinct_pairs: int
    triplets: int
    num_negatives: int
    unmined: list[int] = field(default_factory=list)
    short: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the user, e.g. "mined 6,100 triplets from 6,503 pairs; 403 pairs had no candidate ..."."""
        text = f"mined {self.triplets:,} triplets from {self.pairs:,} pairs in {self.seconds:.1f} s"
        if self.unmined:
            text += (f"; {len(self.unmined):,} pairs had no candidate within the range/margin/score limits and are "
                     "not in the output")
        else:
            text += "; every pair got a negative"
        if self.short:
            text += f"; {len(self.short):,} pairs got fewer than {self.num_negatives} negatives"
        if self.distinct_pairs < self.pairs:
            text += (f"; {self.pairs - self.distinct_pairs:,} repeated pairs were mined once and written as often as "
                     "they appear")
        return text


def read_pairs(source: str, anchor_column: str = "sent0", positive_column: str = "sent1") -> list[tuple[str, str]]:
    """(anchor, positive) rows of a CSV/TSV file with a header (or a hub dataset), through the NLI reader: a missing
    file, a missing column, a row with the wrong number of fields or an empty sentence is a DataError naming it."""
    if anchor_column == positive_column:
        raise DataError(f"--anchor_column and --positive_column are both {anchor_column!r}: name two columns")
    return [(a, p) for a, p in read_rows(source, [anchor_column, positive_column],
                                          option="--anchor_column / --positive_column")]


def read_corpus(source: str, column: str = "text") -> list[str]:
    """Candidate sentences: a ``.txt`` file (one per line; empty lines are dropped with a warning), a ``.csv`` /
    ``.tsv`` file with a header and ``column``, or a saved / hub dataset (``datamodules.sentences.read_sentences``)."""
    from datamodules.sentences import read_sentences

    sentences = read_sentences(source, column=column, skip_empty=True)
    if not sentences:
        raise DataError(f"corpus {source}: no sentences")
    return sentences


def sentence_transformers_release(installed: str | None = None) -> tuple[int, ...]:
    """(major, minor) of the installed sentence-transformers (or of the version string ``installed``, any PEP 440
    form: ``5.7rc1`` is (5, 7))."""
    from importlib.metadata import version

    return Version(installed or version("sentence-transformers")).release[:2]


def check_sentence_transformers(installed: str | None = None) -> None:
    """A one-line DataError when the installed sentence-transformers (or ``installed``) is older than
    :data:`MINING_NEEDS`; the project's own floor is lower, since only mining needs the newer one."""
    from importlib.metadata import version

    installed = installed or version("sentence-transformers")
    if sentence_transformers_release(installed) < MINING_NEEDS:
        need = ".".join(map(str, MINING_NEEDS))
        raise DataError(f"train.py mine needs sentence-transformers >= {need} (installed: {installed}; before {need} "
                        "its mine_hard_negatives fails with a torch error when the limits leave a pair without "
                        f"candidates): pip install 'sentence-transformers>={need}'")


def mine_triplets(
    pairs: Sequence[tuple[str, str]],
    model,
    corpus: Sequence[str] | None = None,
    *,
    num_negatives: int = 1,
    range_min: int = 0,
    range_max: int | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    sampling_strategy: str = "top",
    batch_size: int = 32,
    seed: int = 0,
    verbose: bool = False,
) -> tuple[list[tuple[str, str, str]], MiningReport]:
    """(anchor, positive, hard negative) rows for ``pairs``, mined by ``sentence_transformers.util.
    mine_hard_negatives`` with ``model`` (a ``SentenceTransformer``) and the given options (its own names and
    meanings; ``corpus``: extra candidates beside the positives). Rows follow the input order, a pair's negatives
    hardest first (one row per negative, sentence-transformers' "triplet" format); a pair without any negative has no
    row and is counted in the report. ``seed`` seeds the ``random`` sampling strategy (Python's ``random``, which
    sentence-transformers draws from; its state is restored afterwards). ``verbose`` lets sentence-transformers print
    its score statistics (its encoding progress bars show either way).

    Raises:
        DataError: an option sentence-transformers refuses (its message), no pairs, or no pair with a negative.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    check_sentence_transformers()
    if not pairs:
        raise DataError("no pairs to mine negatives for")
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise DataError(f"sampling_strategy must be one of {', '.join(SAMPLING_STRATEGIES)}, got {sampling_strategy!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    state = random.getstate()
    random.seed(seed)
    start = time.perf_counter()
    try:
        mined = mine_hard_negatives(
            dataset, model, anchor_column_name="anchor", positive_column_name="positive",
            corpus=list(corpus) if corpus is not None else None, range_min=range_min, range_max=range_max,
            max_score=max_score, min_score=min_score, absolute_margin=absolute_margin,
            relative_margin=relative_margin, num_negatives=num_negatives, sampling_strategy=sampling_strategy,
            output_format="triplet", batch_size=batch_size, verbose=verbose,
        )
    except ValueError as err:  # its checks of the options: range_min >= range_max, num_negatives < 1, ...
        raise DataError(f"mine_hard_negatives: {err}") from None
    finally:
        random.setstate(state)
    seconds = time.perf_counter() - start
    negatives: dict[tuple[str, str], list[str]] = {}
    for anchor, positive, negative in zip(mined["anchor"], mined["positive"], mined["negative"]):
        negatives.setdefault((anchor, positive), []).append(negative)
    rows = [(a, p, n) for a, p in pairs for n in negatives.get((a, p), [])]
    found = [len(negatives.get(pair, ())) for pair in pairs]
    report = MiningReport(
        pairs=len(pairs), distinct_pairs=len(set(pairs)), triplets=len(rows), num_negatives=num_negatives,
        unmined=[i for i, n in enumerate(found) if n == 0],
        short=[i for i, n in enumerate(found) if 0 < n < num_negatives], seconds=seconds,
    )
    if not rows:
        raise DataError(f"none of the {len(pairs):,} pairs got a negative: loosen the limits (range_max, max_score, "
                        "min_score, the margins) or give a larger --corpus")
    return rows, report


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """The triplet file to write: a ``.csv`` path that is not a folder, and that does not exist unless
    ``overwrite`` (checked before any mining, so a long run never ends in a refusal)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"--output {path}: give a .csv file (the triplets are written as CSV with the header "
                        f"{','.join(TRIPLET_COLUMNS)})")
    if path.is_dir():
        raise FileExistsError(f"--output {path} is a folder; give a .csv file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or give another --output")
    return path


def triplets_csv(rows: Sequence[tuple[str, str, str]]) -> str:
    """``rows`` as RFC 4180 CSV with the header ``sent0,sent1,hard_neg`` (fields with commas, quotes or line breaks
    quoted, as :func:`datamodules.base.read_table` reads them back)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TRIPLET_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def write_triplets(path: str | Path, rows: Sequence[tuple[str, str, str]], overwrite: bool = False) -> Path:
    """Write ``rows`` to ``path`` (:func:`triplets_csv`) atomically: a reader sees the old file or the whole new one.
    An existing file is replaced only with ``overwrite``."""
    path = check_output(path, overwrite)
    write_atomic(path, triplets_csv(rows), what="triplets ")
    return path
