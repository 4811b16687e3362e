"""What a study builds before it measures: activation caches (``ActivationsDataModule``, built on first use, reused
after) and SAEs (``SAEModule`` through a Lightning ``Trainer``, exported beside the report). An SAE folder keeps the
settings it was trained with (``train.json``); a rerun of the study with the same settings loads it instead of
training again, so a long study can be resumed or its report redrawn."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from core.errors import DataError
from datamodules.activation_cache import META_SENTENCE, ActivationCache
from datamodules.activations import ActivationsDataModule, prepare_layers
from lightning_modules.components.batch_topk import BatchTopKConfig
from lightning_modules.export import export_sae, load_sae
from lightning_modules.sae import SAEModule

TRAIN_FILE = "train.json"


def slug(name: str) -> str:
    """A folder name for a model name or path (``sentence-transformers/all-MiniLM-L6-v2`` -> ``all-MiniLM-L6-v2``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(name.rstrip("/")).name).strip("-") or "model"


@dataclass
class CacheSpec:
    """How a study's caches are built (the options every cache of one study shares)."""

    data_root: str | None
    cache_dir: str | None = None
    max_length: int = 256
    special_tokens: str = "keep"
    encode_batch_size: int = 64
    device: str = "auto"
    batch_size: int = 1024
    val_fraction: float = 0.02


def token_datamodule(model: str, layer: int, spec: CacheSpec, max_sentences: int | None = None,
                     text_prefix: str = "") -> ActivationsDataModule:
    """The datamodule of a Brown token cache of ``model``'s ``layer`` (nothing built yet)."""
    return ActivationsDataModule(model_name_or_path=model, source="brown", data_root=spec.data_root, level="token",
                                 layer=layer, special_tokens=spec.special_tokens, max_length=spec.max_length,
                                 text_prefix=text_prefix, max_sentences=max_sentences, cache_dir=spec.cache_dir,
                                 encode_batch_size=spec.encode_batch_size, encode_device=spec.device,
                                 batch_size=spec.batch_size, val_fraction=spec.val_fraction)


def token_cache(model: str, layer: int, spec: CacheSpec, max_sentences: int | None = None,
                text_prefix: str = "") -> ActivationsDataModule:
    """The datamodule of a Brown token cache of ``model``'s ``layer`` (built now when missing), set up."""
    return token_caches(model, [layer], spec, max_sentences, text_prefix)[layer]


def token_caches(model: str, layers: list[int], spec: CacheSpec, max_sentences: int | None = None,
                 text_prefix: str = "") -> dict[int, ActivationsDataModule]:
    """``{layer: datamodule}`` of the Brown token caches of ``layers``, set up; those missing are built together,
    from one pass of the encoder over the corpus (:func:`datamodules.activations.prepare_layers`)."""
    t = time.perf_counter()
    dms = prepare_layers([token_datamodule(model, layer, spec, max_sentences, text_prefix) for layer in layers])
    built = [dm for dm in dms if dm.built_here]
    if built:
        print(f"  built {', '.join(str(dm.cache.folder) for dm in built)} ({len(built[0].cache):,} vectors each, "
              f"{time.perf_counter() - t:.0f} s)", flush=True)
    return dict(zip(layers, dms))


def sentence_view(cache: ActivationCache, sentence_ids: np.ndarray) -> ActivationCache:
    """A view of ``cache`` holding only the rows of ``sentence_ids`` (in cache order; nothing is copied)."""
    sid = cache.metadata()[:, META_SENTENCE]
    view = copy.copy(cache)
    local = np.flatnonzero(np.isin(sid, sentence_ids))
    view.rows = local if cache.rows is None else cache.rows[local]
    return view


@dataclass
class TrainSpec:
    """How a study trains its SAEs."""

    steps: int = 2000
    lr: float | None = 5e-3
    warmup_ratio: float = 0.05
    decay_ratio: float = 0.2
    init_samples: int = 65536
    seed: int = 0
    accelerator: str = "auto"
    device: str = "cpu"
    """Where the trained (or reused) SAE is loaded: every later pass over it (scores, codes, the suite) runs there."""


def train_sae(dm: ActivationsDataModule, cfg: BatchTopKConfig, spec: TrainSpec, folder: str | Path):
    """Train an SAE with ``cfg`` on ``dm``'s training rows for ``spec.steps`` steps and export it to ``folder``, or
    load the one there when ``train.json`` records the same cache and settings. Returns ``(sae, record)``: the SAE
    as exported (eval mode, on ``spec.device``) and what ``train.json`` holds."""
    folder = Path(folder)
    settings = {"cache": str(dm.cache.folder), "sae": {**cfg.to_dict(), "d_in": dm.dim}, "steps": spec.steps,
                "batch_size": dm.batch_size, "lr": spec.lr, "warmup_ratio": spec.warmup_ratio,
                "decay_ratio": spec.decay_ratio, "init_samples": spec.init_samples, "seed": spec.seed}
    record_file = folder / TRAIN_FILE
    if record_file.is_file() and (folder / "cfg.json").is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            print(f"  reusing the SAE in {folder} (same settings)", flush=True)
            return load_sae(folder, device=spec.device).eval(), record
    if spec.steps < 1:
        raise DataError(f"steps={spec.steps}: an SAE needs at least one training step")
    pl.seed_everything(spec.seed, verbose=False)
    module = SAEModule(sae=BatchTopKConfig.from_dict({**cfg.to_dict(), "d_in": None}), lr=spec.lr,
                       warmup_ratio=spec.warmup_ratio, decay_ratio=spec.decay_ratio,
                       init_samples=spec.init_samples, seed=spec.seed)
    trainer = pl.Trainer(accelerator=spec.accelerator, devices=1, max_steps=spec.steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    t = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - t
    if module.sae.threshold.item() < 0:
        raise DataError(f"the SAE in {folder} has no inference threshold after {spec.steps} steps: give more steps "
                        f"than sae.threshold_start={cfg.threshold_start}")
    export_sae(module, folder, overwrite=True)
    record = {"settings": settings, "train_seconds": seconds, "steps": trainer.global_step,
              "train_vectors": trainer.global_step * dm.batch_size,
              "epochs": trainer.global_step * dm.batch_size / max(len(dm.train_rows), 1),
              "last_train_fvu": float(trainer.callback_metrics.get("sae/fvu", float("nan")))}
    record_file.write_text(json.dumps(record, indent=1))
    print(f"  trained {folder} ({trainer.global_step} steps, {seconds:.0f} s, last train FVU "
          f"{record['last_train_fvu']:.3f})", flush=True)
    return load_sae(folder, device=spec.device).eval(), record


def held_out_vectors(dm: ActivationsDataModule, max_rows: int, seed: int = 0) -> torch.Tensor:
    """Up to ``max_rows`` of the datamodule's held-out (validation) vectors, drawn without replacement; an error
    when the datamodule holds none out."""
    if not len(dm.val_rows):
        raise DataError("no held-out sentences: the study's caches need val_fraction > 0")
    return _draw(dm, dm.val_rows, max_rows, seed)


def training_vectors(dm: ActivationsDataModule, max_rows: int, seed: int = 0) -> torch.Tensor:
    """Up to ``max_rows`` of the vectors the SAEs train on, drawn without replacement: scored next to the held-out
    ones, the gap says whether a dictionary memorised its training sentences."""
    return _draw(dm, dm.train_rows, max_rows, seed)


def _draw(dm: ActivationsDataModule, rows: np.ndarray, max_rows: int, seed: int) -> torch.Tensor:
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return dm.cache.gather(rows)


def device_of(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


__all__ = ["CacheSpec", "TrainSpec", "device_of", "held_out_vectors", "sentence_view", "slug", "token_cache",
           "train_sae", "training_vectors"]
