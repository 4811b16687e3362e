"""STS evaluation in the SimCSE protocol, over any encoder (``train.py evaluate``'s library: the command itself
is :mod:`commands.evaluate`).

The protocol is that of SimCSE's ``evaluation.py --mode test --task_set sts`` (on SentEval): cosine
similarity of the model's own embeddings against the gold scores, Spearman x 100.

- STS12-16: every subset file of a year, unscored pairs (empty gold line) skipped. ``all`` is the Spearman
  over the concatenation of the subsets (the number papers print); ``wmean`` the mean of per-subset Spearman
  weighted by subset size, ``mean`` the unweighted one (SentEval reports both).
- STS-B and SICK-R: the test split (one subset, so all three figures agree).

Text (``text``, the command's ``--text``): by default as SentEval leaves it, which is what SimCSE scored
(``senteval``: Moses tokens, lower-cased for STS12-16 and STS-B). MTEB's copies of STS12-16 are those same SentEval
files (their distinct texts and pairs match MTEB's descriptive statistics exactly), but MTEB keeps STS-B raw
(``--text mteb``); ``raw`` uses the organisers' files untouched. For all-MiniLM-L6-v2 the forms agree to 0.01 (only
STS14 moves, by 0.01). MTEB's SICK-R is train + trial + test (9,927 pairs), not the test split: ``--tasks
sickr_all`` scores those, to compare with MTEB.

Three kinds of model are accepted: a Lightning checkpoint (``.ckpt``; encoded by the module's own
``encode``, pooling and head included), a sentence-transformers folder (e.g. from ``train.py export``) or a
plain Hugging Face folder, and a hub name (sentence-transformers' default mean pooling for plain models).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from core.errors import DataError
from core.hub import check_max_length, check_model_files, check_tokenizer_files, check_vocabulary_fits, resolve_model
from core.metrics import SentenceIndex
from datamodules.sts import SICK_FILES, STS_TASKS, STSPairs, concat_pairs, load_sts_subsets
from lightning_modules.export import export
from lightning_modules.family import SENTENCE_TRANSFORMERS
from lightning_modules.loading import is_checkpoint_file, load_module
from lightning_modules.model_card import write_model_card
from lightning_modules.saelens_format import sae_weights_file

#: The SimCSE table: task -> column title, in the paper's order.
PAPER_COLUMNS = {
    "sts12": "STS12",
    "sts13": "STS13",
    "sts14": "STS14",
    "sts15": "STS15",
    "sts16": "STS16",
    "stsb": "STSBenchmark",
    "sickr": "SICKRelatedness",
    "sickr_all": "SICK-R(all 3 files)",
}
#: Tasks the evaluator knows besides a TSV path: the seven of the paper, and SICK-R as MTEB scores it.
KNOWN_TASKS = (*STS_TASKS, "sickr_all")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@runtime_checkable
class Embedder(Protocol):
    """What the evaluation needs of a model: a name, and ``encode(sentences)`` -> (N, D) float on CPU."""

    name: str

    def encode(self, sentences: list[str]) -> Tensor: ...


class ModuleEmbedder:
    """A trained :class:`~lightning_modules.base.EmbeddingModule` through its own ``encode`` (no dropout)."""

    def __init__(self, module, name: str, batch_size: int = 128) -> None:
        self.module, self.name, self.batch_size = module, name, batch_size

    def encode(self, sentences: list[str]) -> Tensor:
        return self.module.encode(sentences, batch_size=self.batch_size).float()


class SentenceTransformerEmbedder:
    """A ``SentenceTransformer`` (exported folder, plain Hugging Face folder or hub name)."""

    def __init__(self, model, name: str, batch_size: int = 128) -> None:
        self.model, self.name, self.batch_size = model, name, batch_size

    def encode(self, sentences: list[str]) -> Tensor:
        z = self.model.encode(
            sentences, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return z.float().cpu()


def _check_weights(folder: Path) -> None:
    """Raise when a model folder (or its Transformer module's sub-folder) holds a config but no weights, no
    tokenizer files, or files copied in part (:func:`check_model_files`)."""
    transformer_dirs = [folder]
    modules_json = folder / "modules.json"
    if modules_json.is_file():
        modules = json.loads(modules_json.read_text())
        transformer_dirs = [
            folder / m.get("path", "") for m in modules if m.get("type", "").endswith("Transformer")
        ]
    for d in transformer_dirs:
        if not any((d / w).is_file() for w in WEIGHT_FILES):
            raise FileNotFoundError(
                f"model folder {str(d)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
                f"(found {sorted(p.name for p in d.iterdir())})"
            )
        check_tokenizer_files(d)
        check_model_files(d)


def load_embedder(
    model: str, batch_size: int = 128, max_length: int | None = None, device: str = "cpu"
) -> Embedder:
    """An :class:`Embedder` for a checkpoint, a model folder or a hub name (see the module docstring).

    Args:
        model: checkpoint (``*.ckpt``, or a zip archive by any name), folder (sentence-transformers or Hugging Face)
            or hub name.
        batch_size: sentences per forward pass.
        max_length: tokens kept per sentence; None keeps the model's own setting (the checkpoint's
            ``max_length``, the exported folder's ``max_seq_length``: they agree, and so do the numbers).
        device: ``cpu``, ``cuda``, ... or ``auto`` (CUDA when available).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (or unset for the model's own), got {max_length}")
    path = Path(model).expanduser()
    if path.is_file() and not is_checkpoint_file(path):
        raise DataError(f"{str(path)!r} is a file but not a Lightning checkpoint (neither .ckpt nor a zip archive, "
                        "as torch writes them); give a checkpoint, a model folder or a hub name")
    if path.suffix == ".ckpt" or is_checkpoint_file(path):
        module = load_module(path).to(device)
        if getattr(module, "export_type", None) != SENTENCE_TRANSFORMERS:
            raise DataError(f"{path} is a {type(module).__name__} checkpoint: evaluate scores sentence encoders; "
                            f"for an SAE run `python train.py interpret --sae {path} --cache CACHE_FOLDER`")
        if max_length is not None:
            check_max_length(max_length, module.encoder.model, str(path))
            module.encoder.max_length = max_length
        return ModuleEmbedder(module, str(path), batch_size)

    # imported when used: sentence-transformers takes ~3 s to import; only this path needs it
    from sentence_transformers import SentenceTransformer

    if path.is_dir() and sae_weights_file(path) is not None:
        raise DataError(f"{path} is an exported SAE: evaluate scores sentence encoders; run `python train.py "
                        f"interpret --sae {path} --cache CACHE_FOLDER`")
    if path.is_dir():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is neither a sentence-transformers folder (modules.json) nor a "
                "Hugging Face model folder (config.json)"
            )
        _check_weights(path)
        source = str(path)
    else:
        source = resolve_model(model)
    try:
        st = SentenceTransformer(source, device=device)
    except OSError as err:
        raise FileNotFoundError(  # a one-line error in train.py
            f"could not load model {model!r}: not a checkpoint or local folder, and the Hugging Face hub "
            f"could not provide it (offline, or a wrong name). Original error: {' '.join(str(err).split())}"
        ) from None
    if getattr(st[0], "auto_model", None) is not None and getattr(st, "tokenizer", None) is not None:
        check_vocabulary_fits(st.tokenizer, st[0].auto_model, model)
    if max_length is not None:
        if getattr(st[0], "auto_model", None) is not None:
            check_max_length(max_length, st[0].auto_model, model)
        st.max_seq_length = max_length
    return SentenceTransformerEmbedder(st, model, batch_size)


def load_sentence_transformer(model: str, device: str = "auto", batch_size: int = 32):
    """A ``SentenceTransformer`` for a folder (sentence-transformers or Hugging Face), a hub name (the offline
    MiniLM package stands in for ``sentence-transformers/all-MiniLM-L6-v2``), or a ``train.py fit`` checkpoint, which
    is exported into a temporary folder first (``train.py export``'s folder: pooling and head as trained, normalised),
    so a caller (``train.py mine``) sees the embeddings the exported model would give. An SAE is refused."""
    path = Path(model).expanduser()
    if path.suffix == ".ckpt" or is_checkpoint_file(path):
        module = load_module(path)
        if getattr(module, "export_type", None) != SENTENCE_TRANSFORMERS:
            raise DataError(f"{path} is a {type(module).__name__} checkpoint: mining needs a sentence encoder")
        with tempfile.TemporaryDirectory(prefix="embedlab-mine-") as tmp:
            folder = export(module, Path(tmp) / "export")
            return load_embedder(str(folder), batch_size, device=device).model
    if path.is_dir() and sae_weights_file(path) is not None:
        raise DataError(f"{path} is an exported SAE: mining needs a sentence encoder")
    return load_embedder(model, batch_size, device=device).model


# ------------------------------------------------------------------------------------------------- scoring
@dataclass
class TaskScore:
    """A task's result: ``all`` (Spearman over all pairs), ``wmean`` / ``mean`` over subsets, per subset."""

    task: str
    all: float
    wmean: float
    mean: float
    n_pairs: int
    subsets: dict[str, dict[str, float]] = field(default_factory=dict)


class SentenceEmbeddings:
    """Each distinct sentence of some tasks encoded once (:class:`core.metrics.SentenceIndex`), kept in float64 so
    that the cosines are float64 (:func:`core.metrics.pair_cosines`)."""

    def __init__(self, embedder: Embedder, data: dict[str, list[STSPairs]]) -> None:
        start = time.perf_counter()
        self.sentences = SentenceIndex(p for subsets in data.values() for p in subsets)
        self.z_UD = embedder.encode(self.sentences.sentences).double()
        self.seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self.sentences)

    def score(self, pairs: STSPairs) -> float:
        """:func:`core.metrics.sts_spearman` of ``pairs`` (Spearman x 100 of cosine)."""
        return self.sentences.score(self.z_UD, pairs)


def score_subsets(task: str, subsets: list[STSPairs], emb: SentenceEmbeddings) -> TaskScore:
    """Spearman x 100 of cosine on every subset of a task and on their concatenation."""
    detail = {p.name: {"n": len(p), "spearman": emb.score(p)} for p in subsets}
    n_total = sum(d["n"] for d in detail.values())
    wmean = sum(d["n"] * d["spearman"] for d in detail.values()) / n_total
    mean = sum(d["spearman"] for d in detail.values()) / len(detail)
    return TaskScore(task, emb.score(concat_pairs(task, subsets)), wmean, mean, n_total, detail)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"sts12,stsb"`` or a list -> names, checked: each a known task or an existing ``.tsv`` file."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise DataError(f"no tasks given; known tasks: {', '.join(KNOWN_TASKS)} (or a .tsv path)")
    for name in names:
        if name not in KNOWN_TASKS and not (name.endswith(".tsv") and Path(name).is_file()):
            hint = f" ({name} does not exist)" if name.endswith(".tsv") else ""
            raise DataError(
                f"unknown task {name!r}{hint}; known tasks: {', '.join(KNOWN_TASKS)}, or a path to a "
                ".tsv file with the header sentence1, sentence2, score"
            )
    return names


def task_subsets(task: str, data_root: str | None, text: str = "senteval") -> list[STSPairs]:
    """The subsets scored for ``task``; with ``data_root`` a local file must exist (no silent hub copy)."""
    hub = data_root is None
    if task == "sickr_all":  # MTEB's SICK-R: train, trial and test files together
        parts = {split: load_sts_subsets("sickr", split, data_root, hub, text)[0] for split in SICK_FILES}
        return [STSPairs(SICK_FILES[s], p.sentences1, p.sentences2, p.scores) for s, p in parts.items()]
    return load_sts_subsets(task, "test", data_root, hub, text)


def evaluate_sts(
    embedder: Embedder,
    tasks: str | Sequence[str] = STS_TASKS,
    data_root: str | None = None,
    text: str = "senteval",
) -> dict[str, TaskScore]:
    """Score ``embedder`` on each task (see the module docstring); data is loaded before any encoding."""
    return score_tasks(embedder, load_tasks(parse_tasks(tasks), data_root, text))[0]


def load_tasks(names: Sequence[str], data_root: str | None, text: str) -> dict[str, list[STSPairs]]:
    return {t: task_subsets(t, data_root, text) for t in names}


def score_tasks(embedder: Embedder, data: dict[str, list[STSPairs]]) -> tuple[dict[str, TaskScore],
                                                                              SentenceEmbeddings]:
    """Each task's scores, every distinct sentence encoded once; and the embeddings (counts, encode time)."""
    emb = SentenceEmbeddings(embedder, data)
    return {t: score_subsets(t, subsets, emb) for t, subsets in data.items()}, emb


def measure_sts(folder: str | Path, data_root: str, tasks: Sequence[str]) -> dict:
    """Score the sentence-transformers model in ``folder`` on the STS test sets of ``tasks`` found under
    ``data_root`` (``train.py evaluate``'s protocol: SentEval text, Spearman x 100 of cosine).

    Returns:
        ``{"data_root", "tasks": {task: {"spearman", "n_pairs"}}, "missing": [tasks not found]}``.
    """
    found, missing = {}, []
    for task in tasks:
        try:
            found.update(load_tasks([task], data_root, "senteval"))
        except (DataError, FileNotFoundError):
            missing.append(task)
    scores = {}
    if found:
        scored, _ = score_tasks(load_embedder(str(folder), device="auto"), found)
        scores = {t: {"spearman": s.all, "n_pairs": s.n_pairs} for t, s in scored.items()}
    return {"data_root": str(data_root), "tasks": scores, "missing": missing}


def score_export(folder: Path, module, card: dict | None, tasks: Sequence[str]) -> dict | None:
    """Score a sentence-transformers export on the STS test sets of ``tasks`` when its ``card`` (the run facts
    its model card was written from) names their data root, and write the card again with the scores (``sts``)
    and the tasks asked for. Returns the card as now written, or ``card`` itself untouched when it names no data
    root (an SAE's figures never do): the caller logs the numbers the card shows without scoring again."""
    root = (card or {}).get("sts_data_root")
    if not root:
        return card
    scored = {**card, "sts_tasks": list(tasks)}
    if tasks and Path(root).is_dir():
        scored["sts"] = measure_sts(folder, root, tasks)
    if scored != card:  # the card as written says otherwise: write it again (atomically)
        write_model_card(folder, module, scored, folder)
    return scored


# --------------------------------------------------------------------------------------------- reporting
def averages(scores: dict[str, TaskScore]) -> dict[str, float]:
    return {
        "all": sum(s.all for s in scores.values()) / len(scores),
        "wmean": sum(s.wmean for s in scores.values()) / len(scores),
    }


def format_table(scores: dict[str, TaskScore]) -> str:
    """The table SimCSE prints (one column per task, then ``Avg.``), with a second row for ``wmean``."""
    titles = [PAPER_COLUMNS.get(t, Path(t).stem) for t in scores] + ["Avg."]
    avg = averages(scores)
    rows = [
        ["all"] + [f"{s.all:.2f}" for s in scores.values()] + [f"{avg['all']:.2f}"],
        ["wmean"] + [f"{s.wmean:.2f}" for s in scores.values()] + [f"{avg['wmean']:.2f}"],
    ]
    widths = [max(len(r[i]) for r in [[""] + titles, *rows]) for i in range(len(titles) + 1)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.center(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line, fmt([""] + titles), line, *map(fmt, rows), line])


def finite_or_none(value):
    """``value`` with every NaN / infinite float replaced by None, recursively: JSON has no NaN (``json.dumps``
    writes a bare ``NaN`` that strict readers reject), and a score that could not be computed reads as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(
    scores: dict[str, TaskScore], model: str, data_root: str | None, seconds: float, text: str = "senteval"
) -> dict:
    return finite_or_none({
        "model": model,
        "protocol": "simcse: Spearman x100 of cosine; STS12-16 'all' = concatenated subsets, unscored pairs "
        "skipped; STS-B and SICK-R test",
        "text": text,
        "data_root": data_root,
        "tasks": {t: asdict(s) for t, s in scores.items()},
        "avg": averages(scores),
        "seconds": seconds,
    })


