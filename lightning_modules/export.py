"""Export trained modules as artefacts other tools load directly.

Encoders become sentence-transformers folders: ``SentenceTransformer(path)`` loads them, and their ``encode``
returns the trained module's ``encode``, L2-normalised (cosine similarity is the metric every module here trains
for, so the exported model ends with ``Normalize`` and a dot product is a cosine).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from lightning_modules.base import EmbeddingModule


def sentence_transformer_modules(module: EmbeddingModule, transformer_dir: str | Path) -> list[nn.Module]:
    """The sentence-transformers modules equivalent to ``module.encode`` (followed by Normalize).

    ``transformer_dir`` must already hold the Hugging Face model and tokenizer (``save_pretrained``).
    Modules that add a head after pooling extend this list (see ``extra_st_modules``).
    """
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
        WeightedLayerPooling,
    )

    enc = module.encoder
    first_last = enc.pooler == "first_last_avg"
    config_kwargs = {"output_hidden_states": True} if first_last else None
    modules: list[nn.Module] = [Transformer(str(transformer_dir), max_seq_length=enc.max_length,
                                            config_kwargs=config_kwargs)]
    if first_last:  # (hidden_states[1] + hidden_states[-1]) / 2 as a layer weighting from layer 1
        n_layers = enc.model.config.num_hidden_layers
        weights = torch.zeros(n_layers)
        weights[0] = weights[-1] = 1.0
        modules.append(WeightedLayerPooling(enc.dim, num_hidden_layers=n_layers, layer_start=1,
                                            layer_weights=nn.Parameter(weights)))
    modules.append(Pooling(enc.dim, "cls" if enc.pooler.startswith("cls") else "mean"))
    if enc.mlp is not None and enc.mlp_mode == "always":
        modules.append(Dense(enc.dim, enc.dim, activation_function=nn.Tanh(),
                             init_weight=enc.mlp.dense.weight.detach().clone(),
                             init_bias=enc.mlp.dense.bias.detach().clone()))
    modules.extend(getattr(module, "extra_st_modules", lambda: [])())
    modules.append(Normalize())
    return modules


def export_sentence_transformer(module: EmbeddingModule, output_dir: str | Path) -> Path:
    """Write ``module`` as a sentence-transformers folder and return its path."""
    from sentence_transformers import SentenceTransformer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    enc = module.encoder
    model = enc.model
    was_training = model.training
    model.eval()
    try:
        model.save_pretrained(output_dir)
        enc.tokenizer.save_pretrained(output_dir)
        st = SentenceTransformer(modules=sentence_transformer_modules(module, output_dir), device="cpu")
        st.save(str(output_dir))
    finally:
        model.train(was_training)
    return output_dir


def module_class_from_checkpoint(ckpt_path: str | Path) -> type[EmbeddingModule]:
    """The LightningModule class a checkpoint was written by (recorded by LightningCLI as ``_class_path``)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    class_path = ckpt.get("hyper_parameters", {}).get("_class_path", "lightning_modules.ContrastiveModule")
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def load_module(ckpt_path: str | Path) -> EmbeddingModule:
    """Rebuild a trained module from a checkpoint, on CPU."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    return module_class_from_checkpoint(path).load_from_checkpoint(path, map_location="cpu")
