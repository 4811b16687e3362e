"""The YAML front matter of the exported model cards, as the Hugging Face Hub reads it.

Built with ``huggingface_hub.ModelCardData`` (its ``to_yaml`` writes the ``model-index`` the Hub reads evaluation
results from), so what is written is what ``huggingface_hub.ModelCard`` / ``metadata_load`` parse back.

- licence and language: the base model's own card when it can be read without the network (a local folder's
  README.md, the folder of a hub name installed offline (``core.hub.OFFLINE_PACKAGES``), or the hub name's
  README.md in the local Hugging Face cache); absent otherwise, never guessed.
- datasets: the hub datasets the run's datamodule names (local files have no hub id and are not listed).
- model-index: MTEB's TaskResults (:func:`eval_results`, main score 0-1 as MTEB stores
  it) and the STS table measured at export (:func:`sts_eval_results`, Spearman of cosine as 0-1, SentEval text).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from core.hub import looks_like_hub_name, resolve_model

#: Local STS task -> the hub dataset MTEB scores the same pairs from (``mteb.get_task(name).metadata.dataset``).
#: ``sickr`` (the SICK test split only) is absent: MTEB's SICK-R is all three files (``sickr_all``).
STS_HUB_DATASETS = {
    "sts12": ("STS12", "mteb/sts12-sts"),
    "sts13": ("STS13", "mteb/sts13-sts"),
    "sts14": ("STS14", "mteb/sts14-sts"),
    "sts15": ("STS15", "mteb/sts15-sts"),
    "sts16": ("STS16", "mteb/sts16-sts"),
    "stsb": ("STSBenchmark", "mteb/stsbenchmark-sts"),
    "sickr_all": ("SICK-R", "mteb/sickr-sts"),
}
#: The hub dataset of the SICK test split (``sickr``): SICK, whose ``test`` split it is.
SICK_TEST = ("SICK-R (test split)", "sick")
#: Datamodule init arguments that may name a hub dataset.
DATASET_KEYS = ("source", "dataset", "path", "name")


def base_card(base: str) -> dict:
    """The front matter of the base model's card, read without the network: ``base/README.md`` for a folder,
    else the README.md of the hub name in the local Hugging Face cache; {} when neither is there."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    path = Path(resolve_model(base)) / "README.md"  # a hub name installed offline: its package's folder
    if not path.is_file() and looks_like_hub_name(base) and not Path(base).exists():
        try:
            cached = try_to_load_from_cache(base, "README.md")
        except ValueError:  # not a valid repo id after all
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    try:
        return (metadata_load(path) or {}) if path.is_file() else {}
    except (ValueError, OSError):  # a README whose YAML does not parse: no facts from it
        return {}


def hub_datasets(data: dict | None) -> list[str]:
    """The hub dataset ids the datamodule config names (values of :data:`DATASET_KEYS` that are hub names and not
    local paths)."""
    args = (data or {}).get("init_args") or {}
    return [v for k in DATASET_KEYS if isinstance(v := args.get(k), str) and "/" in v and looks_like_hub_name(v)
            and not Path(v).exists()]  # "owner/name": a bare name is one of the project's local sources (brown)


def sts_eval_results(sts: dict | None) -> list:
    """``EvalResult`` entries of the STS table measured at export (``facts["sts"]``), for the tasks with a hub
    dataset of the same pairs; value = Spearman of cosine in 0-1 (the table prints it x 100)."""
    from huggingface_hub import EvalResult

    out = []
    for task, score in ((sts or {}).get("tasks") or {}).items():
        name, dataset = STS_HUB_DATASETS.get(task) or (SICK_TEST if task == "sickr" else (None, None))
        if dataset is None or score.get("spearman") is None:
            continue
        out.append(EvalResult(task_type="sentence-similarity", dataset_type=dataset,
                              dataset_name=f"{name} (SentEval text, {score['n_pairs']} pairs)", dataset_split="test",
                              metric_type="spearman_cosine", metric_name="Spearman of cosine (SimCSE protocol)",
                              metric_value=round(score["spearman"] / 100, 6)))
    return out


def front_matter(*, base: str, tags: list[str], model_name: str, eval_results: list, data: dict | None = None,
                 extra: dict | None = None) -> str:
    """The card's front matter (between ``---`` lines) for a sentence-transformers export of ``base``."""
    from huggingface_hub import ModelCardData

    known = base_card(base)
    card = ModelCardData(
        library_name="sentence-transformers", pipeline_tag="sentence-similarity", tags=tags,
        base_model=base if looks_like_hub_name(base) and not Path(base).exists() else None,
        license=known.get("license"), language=known.get("language"), datasets=hub_datasets(data) or None,
        model_name=model_name if eval_results else None, eval_results=eval_results or None, **(extra or {}))
    return "---\n" + card.to_yaml() + "\n---"


def load_results(results_dir: str | Path, model_name: str | None = None, revision: str | None = None) -> list:
    """The TaskResults of a ``ResultCache`` folder read by mteb's ``ResultCache.load_results`` (local only), those
    of ``model_name`` / ``revision`` when given; [] when the folder holds none."""
    from mteb.cache import ResultCache

    if not (Path(results_dir) / "results").is_dir():
        return []
    bench = ResultCache(results_dir).load_results(models=[model_name] if model_name else None,
                                                  include_remote=False, require_model_meta=False)
    return [t for m in bench.model_results if revision is None or m.model_revision == revision
            for t in m.task_results]


def eval_results(task_results: Sequence) -> list:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) of MTEB TaskResults: one per task,
    split and subset, MTEB's main score as MTEB stores it (0-1), by mteb's own ``TaskResult.get_hf_eval_results``."""
    out = []
    with warnings.catch_warnings():  # mteb marks it deprecated for its newer Hub results format; the card needs it
        warnings.simplefilter("ignore")
        for result in task_results:
            out.extend(result.get_hf_eval_results())
    return out
