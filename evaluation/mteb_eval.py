"""MTEB tasks on any encoder, offline where the data is local, with results kept in MTEB's own format.

Shared by ``callbacks.MTEBEvaluator`` (during training) and ``train.py evaluate --tasks <MTEB names>`` (on an
export, a checkpoint or a hub model). mteb is imported when used (~4 s).

- Tasks keep their official names; the STS tasks of :data:`LOCAL_STS` take their pairs from a local data root
  (``task.dataset`` set, ``task.data_loaded = True``; docs/pitfalls.md #6), any other task loads from the hub and,
  offline, fails with one line saying so.
- Results are ``TaskResult`` files written by ``mteb.evaluate`` itself into a ``ResultCache`` folder
  (``<folder>/results/<model name>/<revision>/<task>.json`` + ``model_meta.json``), never read back as a cache
  (``overwrite_strategy="always"``: a stored result of the same name and revision would be stale weights).
- :func:`eval_results` turns them into ``huggingface_hub.EvalResult`` entries, the model card's ``model-index``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path

from core.errors import DataError
from core.hub import hub_offline
from datamodules.sts import SICK_FILES, STSPairs, concat_pairs, load_sts

#: MTEB task -> the local STS task whose files hold the same pairs (see datamodules/sts.py for the layouts).
#: MTEB's SICK-R is the train, trial and test files together (9,927 pairs), hence all three here.
LOCAL_STS = {
    "STS12": "sts12",
    "STS13": "sts13",
    "STS14": "sts14",
    "STS15": "sts15",
    "STS16": "sts16",
    "STSBenchmark": "stsb",
    "SICK-R": "sickr",
}
#: MTEB split names -> ours.
SPLIT_NAMES = {"validation": "dev"}


def _local_pairs(source: str, split: str, data_root: str | None) -> STSPairs:
    """One MTEB split's pairs from local files (a local task name or a TSV path), in MTEB's text form."""
    if source == "sickr" and split == "test":
        parts = [load_sts("sickr", s, data_root, hub=False, text="mteb") for s in SICK_FILES]
        return concat_pairs("sickr", parts)
    return load_sts(source, SPLIT_NAMES.get(split, split), data_root, hub=False, text="mteb")


def get_task(name: str, eval_splits: Sequence[str] | None = None):
    """``mteb.get_task(name)``, or a ValueError naming the closest task names."""
    import mteb

    try:
        return mteb.get_task(name, eval_splits=list(eval_splits) if eval_splits else None)
    except KeyError:
        known = sorted(t.metadata.name for t in mteb.get_tasks())
        close = difflib.get_close_matches(name, known, n=5)
        raise ValueError(
            f"unknown MTEB task {name!r}"
            f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} Tasks with local data "
            f"offline (data_root): {', '.join(LOCAL_STS)}. All {len(known)} MTEB names: "
            "[t.metadata.name for t in mteb.get_tasks()]"
        ) from None


def benchmark_tasks(name: str) -> list[str]:
    """The task names of the MTEB benchmark ``name`` (e.g. ``MTEB(eng, v2)``), or a DataError naming close ones."""
    import mteb

    try:
        return [t.metadata.name for t in mteb.get_benchmark(name).tasks]
    except (KeyError, ValueError):
        known = [b.name for b in mteb.get_benchmarks()]
        close = difflib.get_close_matches(name, known, n=5)
        raise DataError(f"--benchmark {name!r} is not an MTEB benchmark"
                        f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}") from None


def load_tasks(names: Sequence[str], data_root: str | None = None, local_data: dict[str, str] | None = None,
               eval_splits: Sequence[str] | None = None) -> list:
    """MTEB task objects with their data loaded: local pairs for the STS tasks of :data:`LOCAL_STS` when
    ``data_root`` is given (or any STS task named in ``local_data``: MTEB name -> local task or TSV), else MTEB's
    own loader from the hub.

    Raises:
        ValueError: an unknown task, or local data for a task that is not STS.
        DataError: local files missing, or a task whose data is on the hub while offline (one line).
    """
    from datasets import Dataset, DatasetDict  # ~1 s to import

    tasks = []
    for name in names:
        task = get_task(name, eval_splits)
        source = (local_data or {}).get(name) or (LOCAL_STS.get(name) if data_root else None)
        if source is not None:
            if task.metadata.type != "STS":
                raise ValueError(f"local_data[{name!r}]: only STS tasks take local pairs, {name} is "
                                 f"{task.metadata.type}")
            splits = {}
            for split in task.eval_splits:
                p = _local_pairs(source, split, data_root)
                splits[split] = Dataset.from_dict({"sentence1": p.sentences1, "sentence2": p.sentences2,
                                                   "score": p.scores})
            task.dataset = DatasetDict(splits)
            task.data_loaded = True
        else:
            local = f"; offline, only {', '.join(LOCAL_STS)} run, from --data_root" if name not in LOCAL_STS else \
                "; give --data_root (the local STS copies) to run it offline"
            if hub_offline():
                raise DataError(f"MTEB task {name} needs its data from the Hugging Face hub "
                                f"({task.metadata.dataset.get('path')}) and HF_HUB_OFFLINE is set{local}")
            try:
                task.load_data()  # once: evaluate() does not unload data it did not load itself
            except (OSError, ConnectionError) as err:
                raise DataError(f"MTEB task {name}: could not load {task.metadata.dataset.get('path')} from the "
                                f"Hugging Face hub ({type(err).__name__}){local}") from None
        tasks.append(task)
    return tasks


def encoder(encode: Callable[[list[str]], object], name: str, revision: str,
            prompts: dict[str, str] | None = None):
    """MTEB's encoder interface over ``encode(list[str]) -> (N, D)`` array or tensor (docs/pitfalls.md #6).

    A subclass of ``mteb.models.abs_encoder.AbsEncoder`` (cosine similarity from its ``mteb_model_meta``).
    ``prompts``: text put before every input, keyed as MTEB keys prompts (a task name, a task type, ``query`` /
    ``document`` for the prompt type, or ``<task>-query`` ...; MTEB's ``get_prompt_name`` picks the most specific),
    e.g. ``{"query": "query: ", "document": "passage: "}`` for e5. STS tasks ask for no prompt type: only a
    task-name or task-type key (``STS``) reaches them.
    """
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction

    class EmbedlabEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.model_prompts = dict(prompts or {})
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": name, "revision": revision, "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"]})

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            key = self.get_prompt_name(task_metadata, prompt_type)
            prefix = self.model_prompts.get(key, "") if key else ""
            texts = [prefix + text for batch in inputs for text in batch["text"]]
            z = encode(texts)
            return z.float().cpu().numpy() if hasattr(z, "cpu") else z

    return EmbedlabEncoder()


def evaluate_tasks(model, tasks: list, results_dir: str | Path | None = None, batch_size: int = 128) -> list:
    """Run ``tasks`` on ``model`` (an :func:`encoder`) through ``mteb.evaluate``; each ``TaskResult`` is written
    under ``results_dir`` (a ``ResultCache`` folder) when given, replacing an earlier one of the same model name
    and revision. Returns the TaskResults."""
    import mteb
    from mteb.cache import ResultCache

    result = mteb.evaluate(model, tasks, cache=ResultCache(results_dir) if results_dir else None,
                           overwrite_strategy="always", encode_kwargs={"batch_size": batch_size},
                           show_progress_bar=False, co2_tracker=False)
    return list(result.task_results)
