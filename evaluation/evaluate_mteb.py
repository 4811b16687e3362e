"""``train.py evaluate --tasks <MTEB names>`` / ``--benchmark NAME``: real MTEB tasks on an export, a checkpoint
or a hub model, through ``mteb.evaluate``, with the TaskResults kept where mteb's ``ResultCache`` reads them.

Where the results go (``--results_dir`` overrides), under the model name and revision they are stored as:

- an export folder: ``<folder>/mteb`` (``embedlab/<folder name>``, revision ``export``), and the folder's card gets
  them as model-index entries and a table (so ``train.py push`` publishes them with the model);
- a checkpoint: ``<run folder>/mteb`` (``embedlab/<module class>``, revision ``step<N>``), where the run's
  ``MTEBEvaluator`` keeps its own: a later ``train.py export`` of that checkpoint puts them on its card;
- a hub name: ``./mteb-results`` (the hub name, revision ``hub``).

Prompts (e5's ``query: `` / ``passage: ``): the sentence-transformers folder's own ``prompts``
(``config_sentence_transformers.json``), updated by ``--prompts``; keys as MTEB reads them
(:func:`evaluation.mteb_eval.encoder`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.files import write_atomic
from evaluation.evaluate import ModuleEmbedder, SentenceTransformerEmbedder
from evaluation.mteb_eval import encoder, evaluate_tasks, load_tasks
from lightning_modules.card_metadata import eval_results
from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.model_card import mteb_lines

#: The markers around the MTEB section :func:`update_card` writes into an export's card (replaced on each run).
BEGIN, END = "<!-- mteb-results: train.py evaluate -->", "<!-- /mteb-results -->"


def identity(model: str, embedder) -> tuple[str, str, Path]:
    """(model name, revision, default results folder) of what ``evaluate`` was given (see the module docstring)."""
    path = Path(model).expanduser()
    if isinstance(embedder, ModuleEmbedder):
        run = path.resolve().parent.parent  # <run folder>/checkpoints/x.ckpt
        return f"embedlab/{type(embedder.module).__name__}", f"step{read_checkpoint(path).step}", run / "mteb"
    if path.is_dir():
        return f"embedlab/{path.resolve().name}", "export", path / "mteb"
    return model, "hub", Path("mteb-results")


def model_prompts(embedder, prompts: dict[str, str] | None) -> dict[str, str]:
    """The sentence-transformers model's own prompts (name -> text), updated by ``prompts``."""
    own = dict(getattr(getattr(embedder, "model", None), "prompts", None) or {}) \
        if isinstance(embedder, SentenceTransformerEmbedder) else {}
    return {**own, **(prompts or {})}


def run_mteb(model: str, embedder, tasks: list[str], data_root: str | None = None, results_dir: str | None = None,
             prompts: dict[str, str] | None = None, batch_size: int = 128) -> tuple[list, Path]:
    """Run the MTEB ``tasks`` on ``embedder`` (an ``Embedder`` of ``model``); returns (TaskResults, results folder).
    Task data is loaded (and refused, offline, when it is not local) before anything is encoded."""
    name, revision, default = identity(model, embedder)
    folder = Path(results_dir) if results_dir else default
    loaded = load_tasks(tasks, data_root)
    mteb_model = encoder(embedder.encode, name, revision, model_prompts(embedder, prompts))
    results = evaluate_tasks(mteb_model, loaded, folder, batch_size)
    return results, folder


def update_card(folder: Path, task_results: list, results_dir: Path) -> Path | None:
    """Put ``task_results`` on the card of the export ``folder``: its model-index (MTEB entries of these tasks
    replaced, the others kept) and an MTEB section; None when the folder has no embedlab card."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if not readme.is_file() or "embedlab" not in readme.read_text():
        return None
    card = ModelCard.load(readme, ignore_metadata_errors=False)
    names = {r.task_name for r in task_results}
    kept = [r for r in (card.data.eval_results or [])
            if not (r.source_name == "MTEB" and r.dataset_name.rsplit(" (", 1)[0] in names)]
    card.data.eval_results = kept + eval_results(task_results)
    title = next((line[2:].strip() for line in card.text.splitlines() if line.startswith("# ")), None)
    card.data.model_name = card.data.model_name or title or folder.resolve().name  # the card's own title
    shown = results_dir.relative_to(folder) if results_dir.is_relative_to(folder) else results_dir
    section = "\n".join([BEGIN, "## MTEB", "", *mteb_lines(task_results),
                         f"TaskResults in `{shown}` (`mteb.ResultCache(...).load_results()` reads them).", END])
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, card.text, flags=re.S) \
        if BEGIN in card.text else card.text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    write_atomic(readme, str(card))
    return readme


def summary(task_results: list) -> str:
    """One line per task: its main score x 100 on each split."""
    lines = []
    for r in task_results:
        parts = [f"{split} {r.get_score(splits=[split]) * 100:.2f}" for split in r.scores]
        lines.append(f"{r.task_name:<24} {r.task.metadata.main_score} x 100: {', '.join(parts)}")
    return "\n".join(lines)


def to_json(task_results: list, model: str, folder: Path) -> dict:
    """The ``--output`` record: per task and split, MTEB's main score x 100, and where the TaskResults are."""
    return {"model": model, "protocol": "mteb.evaluate (main score x 100)", "results_dir": str(folder),
            "tasks": {r.task_name: {split: r.get_score(splits=[split]) * 100 for split in r.scores}
                      for r in task_results}}


def dump(record: dict, output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(record, indent=1, allow_nan=False))
