"""Model cards: the README.md of an exported sentence-transformers folder, generated from the module and its run.

The card names the base model, the method and its key settings, the training data and steps, what the exported
model scores, the run it came from and how to load it. Every value comes from the module or a small dict of run
facts read from the run itself (the checkpoint: :func:`checkpoint_facts`; the live trainer:
``callbacks.ExportOnFitEnd``), never typed by hand. Run facts, all optional:

- ``checkpoint``: the checkpoint the weights come from; ``step``: its optimiser steps; ``run_steps``: the steps
  the run took in all (when it went on after that checkpoint).
- ``data``: the datamodule's config, ``{"class_path": ..., "init_args": {...}}``.
- ``dev_metric``: ``{"name", "value", "step", "selected"}``, the dev metric the run logged for these weights
  (``selected``: the checkpoint was the best by it).
- ``wandb``: ``{"id", "project", "dir", "offline"}`` (and ``group`` when recorded); ``run_dir``: the run folder.
- ``sts_data_root``: the folder of the STS test sets (the run's STSEvaluator's or datamodule's ``data_root``):
  when set, the caller of the export scores the exported folder on the ``sts_tasks`` found there (default
  :data:`DEFAULT_STS_TASKS`; ``[]`` measures nothing; ``evaluation.evaluate.score_export``) and passes the scores
  in ``sts``: the card only writes them.
- ``mteb_results_dir``: the ``ResultCache`` folder of the run's ``MTEBEvaluator`` (default ``<run_dir>/mteb``):
  the TaskResults stored there for the exported step become the card's MTEB table and model-index.

The front matter (:mod:`lightning_modules.card_metadata`) carries the model-index, licence, language and datasets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.files import write_atomic
from lightning_modules.card_metadata import eval_results, front_matter, load_results, sts_eval_results
from lightning_modules.checkpoints import DATA_CONFIG_KEY, LOGGERS_KEY, Checkpoint

#: STS test sets scored at export when the run names a data root (all seven take about a minute on MiniLM).
DEFAULT_STS_TASKS = ("stsb", "sickr")
#: Datamodule init arguments that say what the model was trained on, in the order shown.
DATA_KEYS = ("source", "data_root", "tasks", "split", "column", "subset", "max_rows", "batch_size")


def checkpoint_facts(checkpoint: Checkpoint) -> dict:
    """The run facts a checkpoint holds: its step, data config, the dev metric logged for its weights and its W&B run.

    Args:
        checkpoint: a checkpoint written by ``train.py fit``, as ``read_checkpoint`` opened it.

    Returns:
        Run facts (see the module docstring); keys the checkpoint cannot tell are absent.
    """
    ckpt, ckpt_path, step = checkpoint.content, checkpoint.path, checkpoint.step
    data = ckpt.get(DATA_CONFIG_KEY) or ({"init_args": dict(ckpt["datamodule_hyper_parameters"])}
                                         if ckpt.get("datamodule_hyper_parameters") else None)
    states = checkpoint.callback_states
    sts_roots = [s.get("data_root") for s in states if "history" in s] + [((data or {}).get("init_args") or {})
                                                                          .get("data_root")]
    dirs = [s["dirpath"] for s in states if "best_k_models" in s and isinstance(s.get("dirpath"), str)]
    facts = {"checkpoint": str(ckpt_path), "step": step, "data": data,
             "run_dir": str(Path(dirs[0]).parent) if dirs else None,  # as callbacks.run_results.run_folder finds it
             "dev_metric": _dev_metric(states, ckpt_path, step), "wandb": _wandb_run(ckpt.get(LOGGERS_KEY) or []),
             "sts_data_root": next((r for r in sts_roots if r), None)}
    return {k: v for k, v in facts.items() if v is not None}


def _dev_metric(states: list[dict], ckpt_path: str | Path, step: int) -> dict | None:
    """The score a ``ModelCheckpoint`` kept this file for, else the ``STSEvaluator`` value at its step."""
    real = os.path.realpath(ckpt_path)
    for state in states:
        if state.get("monitor") and isinstance(state.get("best_k_models"), dict):
            kept = {os.path.realpath(p): v for p, v in state["best_k_models"].items()}
            if real in kept and kept[real] is not None:
                selected = os.path.realpath(state.get("best_model_path") or "") == real
                return {"name": state["monitor"], "value": float(kept[real]), "step": step, "selected": selected}
    for state in states:
        for at, value in state.get("history") or []:
            if state.get("metric") and at == step:
                return {"name": state["metric"], "value": float(value), "step": step, "selected": False}
    return None


def _wandb_run(loggers: list[dict]) -> dict | None:
    """The W&B run of a checkpoint's logger records (id, project, its newest local folder when found, and its group
    when recorded)."""
    for record in loggers:
        if record.get("class") == "WandbLogger" and record.get("version"):
            run = {"id": record["version"], "project": record.get("project")}
            if record.get("group"):
                run["group"] = record["group"]
            folders = sorted(Path(record.get("save_dir") or ".", "wandb").glob(f"*run-*-{run['id']}"),
                             key=lambda p: p.stat().st_mtime)
            if folders:
                run.update(dir=str(folders[-1]), offline=folders[-1].name.startswith("offline-"))
            return run
    return None


def write_model_card(folder: Path, module, facts: dict | None, load_path: str | Path) -> Path:
    """Write ``folder/README.md`` (replacing sentence-transformers' generic card) from the module and the run
    ``facts``, scores included when the caller measured them (``facts["sts"]``); the MTEB results the run stored
    for these weights are read here when the facts carry none."""
    facts = dict(facts or {})
    if "mteb" not in facts:
        facts["mteb"] = run_mteb_results(module, facts)
    path = Path(folder) / "README.md"
    write_atomic(path, model_card(module, facts, load_path, module.embedding_dim), what="model card ")
    return path


def run_mteb_results(module, facts: dict) -> list:
    """The MTEB TaskResults the run's ``MTEBEvaluator`` stored for the exported step (model ``embedlab/<module
    class>``, revision ``step<N>``); [] when none (a result of another step would describe other weights)."""
    folder = facts.get("mteb_results_dir") or (Path(facts["run_dir"]) / "mteb" if facts.get("run_dir") else None)
    if folder is None or facts.get("step") is None or not Path(folder).is_dir():
        return []
    return load_results(folder, f"embedlab/{type(module).__name__}", f"step{facts['step']}")


def mteb_lines(task_results: Sequence) -> list[str]:
    """The MTEB table: each task's main score x 100 per split and subset."""
    if not task_results:
        return []
    lines = ["MTEB (`mteb.evaluate`, main score x 100), stored as MTEB TaskResults:", "",
             "| task | split | subset | main score | x 100 |", "|---|---|---|---|---|"]
    for result in task_results:
        metric = md_code(result.task.metadata.main_score)
        for split, scores in result.scores.items():
            lines += [f"| {result.task_name} | {split} | {s.get('hf_subset', 'default')} | {metric} | "
                      f"{float(s['main_score']) * 100:.2f} |" for s in scores]
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------------- the card
def md_code(value) -> str:
    """``value`` as inline markdown code."""
    return f"`{value}`"


def method_rows(module, data: dict | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The method's name and its key settings as (setting, value) rows: the module's family says them
    (``card_method``; ``data``: the datamodule's config), the optimiser rows are every module's."""
    hp = dict(getattr(module, "hparams", {}) or {})
    name, rows = module.card_method(data)
    opt = f"{getattr(module, 'lr', hp.get('lr')):g}"
    rows.append(("learning rate", f"{opt} (AdamW, weight decay {getattr(module, 'weight_decay', 0):g}, warmup ratio "
                                  f"{getattr(module, 'warmup_ratio', 0):g}, linear decay)"))
    return name, rows


def data_text(data: dict | None) -> str:
    """One line naming the training data: source, data_root, split, batch size ... and the datamodule."""
    if not data:
        return "not recorded"
    args = data.get("init_args") or {}
    parts = [f"{k} {md_code(args[k])}" for k in DATA_KEYS if args.get(k) is not None]
    cls = data.get("class_path")
    return ", ".join(parts) + (f" ({md_code(cls)})" if cls else "") if parts or cls else "not recorded"


def steps_text(facts: dict) -> str:
    """The optimiser steps behind the exported weights, and why that checkpoint."""
    step, total = facts.get("step"), facts.get("run_steps")
    if step is None:
        return "not recorded" if total is None else f"{total} optimiser steps"
    text = f"{step} optimiser steps"
    dev = facts.get("dev_metric") or {}
    went_on = total is not None and total != step
    best = f"kept as the run's best by {md_code(dev['name'])}" if dev.get("selected") else ""
    if went_on or best:
        text += f" ({'; '.join(p for p in (f'the run went on to {total}' if went_on else '', best) if p)})"
    return text


def evaluation_lines(facts: dict) -> list[str]:
    """The STS table measured at export, and the dev metric logged for these weights."""
    lines: list[str] = []
    sts = facts.get("sts") or {}
    if sts.get("tasks"):
        lines += ["Spearman x 100 of cosine similarity on the STS test sets (the SimCSE / SentEval protocol of "
                  "`train.py evaluate`), measured at export on this folder's model, test sets from "
                  f"{md_code(sts['data_root'])}:", "", "| task | split | pairs | Spearman x 100 |", "|---|---|---|---|"]
        lines += [f"| {t} | test | {s['n_pairs']} | {s['spearman']:.2f} |" for t, s in sts["tasks"].items()]
        if sts.get("missing"):
            lines += ["", f"Not found under {md_code(sts['data_root'])}, so not measured: {', '.join(sts['missing'])}."]
        lines.append("")
    elif facts.get("sts_data_root"):
        why = (f"none of {', '.join(sts.get('missing') or [])} found under it" if sts
               else "no STS tasks asked for" if facts.get("sts_tasks") == [] else "that folder is absent here")
        lines += [f"No STS test set was measured at export ({why}; data root {md_code(facts['sts_data_root'])}).", ""]
    else:
        lines += ["No STS test set was measured at export: the run names no data root to find them in.", ""]
    dev = facts.get("dev_metric")
    if dev:
        lines += ["The dev metric the run logged for these weights:", "", "| metric | value | step |",
                  "|---|---|---|", f"| {md_code(dev['name'])} | {dev['value']:.2f} | {dev['step']} |", ""]
    elif not sts.get("tasks"):
        lines += ["The run logged no dev metric for these weights.", ""]
    return lines


def run_lines(facts: dict) -> list[str]:
    """Where the run's records are: W&B run, run folder, checkpoint."""
    rows = []
    wandb = facts.get("wandb")
    if wandb:
        where = f", project {md_code(wandb['project'])}" if wandb.get("project") else ""
        if wandb.get("dir"):
            where += f", folder {md_code(wandb['dir'])}" + (f" (offline: `wandb sync {wandb['dir']}` uploads it)"
                                                           if wandb.get("offline") else "")
        rows.append(f"- W&B run {md_code(wandb['id'])}{where}")
    else:
        rows.append("- W&B: the run had no WandbLogger")
    for key, what in (("run_dir", "run folder"), ("checkpoint", "checkpoint")):
        if facts.get(key):
            rows.append(f"- {what}: {md_code(facts[key])}")
    return rows + [""]


def model_card(module, facts: dict | None, load_path: str | Path, dim: int) -> str:
    """The card's markdown for ``module`` exported to ``load_path`` (``dim``: the exported embedding size).

    Args:
        module: the exported ``EmbeddingModule`` (``ContrastiveModule``, ``MCR2Module``, ...).
        facts: run facts (see the module docstring); None or {} gives a card of the module alone.
        load_path: the folder as it is loaded.
        dim: the size of the exported embeddings.
    """
    facts = facts or {}
    base = module.encoder.model_name_or_path
    method, settings = method_rows(module, facts.get("data"))
    tag = method.split(" ")[-1 if "SimCSE" in method or "HNCSE" in method else 0].split("-")[0].lower()
    short = Path(base).name if Path(base).exists() else base
    dims = list(getattr(module, "matryoshka_dims", None) or [])
    tags = ["sentence-transformers", "sentence-similarity", "embedlab", tag] + (["matryoshka"] if dims else [])
    mteb_results = facts.get("mteb") or []
    results = eval_results(mteb_results) + sts_eval_results(facts.get("sts"))
    front = front_matter(base=base, tags=tags, model_name=f"{short}, {method}", eval_results=results,
                         data=facts.get("data"))
    module_class = f"{type(module).__module__}.{type(module).__name__}"
    rows = [("base model", md_code(base)), ("method", f"{method} ({md_code(module_class)})"), *settings,
            ("training data", data_text(facts.get("data"))), ("steps", steps_text(facts))]
    if dims:
        rows.append(("Matryoshka dims", ", ".join(map(str, dims)) + " (each prefix of the embedding is an embedding "
                                                                      "on its own: load with `truncate_dim`)"))
    lines = [front, "", f"# {short}, {method}", "",
             f"A sentence-transformers model: {dim}-d sentence embeddings, L2-normalised (a dot product is a cosine), "
             "trained with embedlab. This card was written at export from the run's own records.", "",
             "## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Evaluation", "", *evaluation_lines(facts), *mteb_lines(mteb_results),
             "## Run", "", *run_lines(facts), "## Usage", "",
             "```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = SentenceTransformer({str(load_path)!r})",
             "embeddings = model.encode([\"A man is playing a guitar.\", \"Someone plays an instrument.\"])",
             "similarity = model.similarity(embeddings, embeddings)", *truncate_lines(load_path, dims), "```", ""]
    return "\n".join(lines)


def truncate_lines(load_path: str | Path, dims: Sequence[int]) -> list[str]:
    """Usage lines for a Matryoshka model (an MCR2 head or a contrastive encoder): the smallest prefix, loaded with
    sentence-transformers' ``truncate_dim`` (the prefix is not unit-length: ``model.similarity`` is a cosine, a plain
    dot product is not)."""
    if not dims:
        return []
    return ["", f"# Matryoshka: the first {dims[0]} of {dims[-1]} dims are an embedding too "
                f"(trained prefixes: {', '.join(map(str, dims))})",
            f"small = SentenceTransformer({str(load_path)!r}, truncate_dim={dims[0]})",
            "small_embeddings = small.encode([\"A man is playing a guitar.\"])  # cosine via small.similarity"]
