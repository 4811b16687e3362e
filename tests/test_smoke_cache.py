"""Smoke runs (fast_dev_run, an int limit_train_batches) build only the sentences they read, into a partial cache
that full runs never take for theirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl

from core.errors import DataError
from datamodules import ActivationsDataModule
from datamodules.activations import held_out


def data(model: str, sample_data, cache_dir, **kw) -> ActivationsDataModule:
    return ActivationsDataModule(model_name_or_path=model, source=str(sample_data / "sentences.txt"),
                                 cache_dir=str(cache_dir), max_length=32, **{"batch_size": 64, "val_fraction": 0.2,
                                                                            **kw})


def attach(dm: ActivationsDataModule, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         **trainer_kw)
    dm.trainer = trainer
    return trainer


@pytest.mark.parametrize("trainer_kw, train_batches", [({"fast_dev_run": True}, 1),
                                                       ({"limit_train_batches": 2, "limit_val_batches": 1}, 2)])
def test_a_smoke_run_builds_just_enough_sentences(tiny_model_no_dropout, sample_data, tmp_path, trainer_kw,
                                                  train_batches):
    dm = data(tiny_model_no_dropout, sample_data, tmp_path)
    attach(dm, **trainer_kw)
    dm.setup("fit")
    meta = dm.cache.meta
    n = meta["partial_sentences"]
    assert meta["partial"] and meta["n_sentences"] == n < 200 and dm.cache.folder.name.endswith(f"_partial{n}")
    # the first n sentences, each whole; n is the fewest that give a training epoch and held-out vectors in the
    # val_fraction proportion (64 x 0.2 / 0.8 = 16 per batch)
    sid = dm.cache.metadata()[:, 0].astype(np.int64)
    assert set(sid) == set(range(n))
    is_val = held_out(sid, 0.2)
    assert (~is_val).sum() >= train_batches * 64 and is_val.sum() >= train_batches * 16
    fewer = sid < n - 1
    assert (~is_val & fewer).sum() < train_batches * 64 or (is_val & fewer).sum() < train_batches * 16
    assert len(dm.train_dataloader()) >= train_batches


def test_the_partial_cache_is_never_a_full_one(tiny_model_no_dropout, sample_data, tmp_path):
    smoke = data(tiny_model_no_dropout, sample_data, tmp_path)
    attach(smoke, fast_dev_run=True)
    smoke.setup("fit")
    full = data(tiny_model_no_dropout, sample_data, tmp_path)
    attach(full, max_steps=1)
    assert full.cache_folder() != smoke.cache_folder() and not full.cache_folder().exists()
    pointed = data(tiny_model_no_dropout, sample_data, tmp_path, cache_path=str(smoke.cache_folder()))
    with pytest.raises(DataError, match="partial_sentences: cache has"):
        pointed.prepare_data()
    # once the full cache exists, a smoke run reads it (nothing to build)
    full.setup("fit")
    again = data(tiny_model_no_dropout, sample_data, tmp_path)
    attach(again, fast_dev_run=True)
    again.setup("fit")
    assert again.cache.folder == full.cache.folder and not json.loads(
        (full.cache.folder / "meta.json").read_text())["partial"]


def test_a_smoke_fit_end_to_end(tiny_model_no_dropout, sample_data, tmp_path):
    from lightning_modules import SAEModule

    dm = data(tiny_model_no_dropout, sample_data, tmp_path)
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=True, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SAEModule(sae=dict(expansion_factor=2, k=4), init_samples=64), dm)
    assert trainer.global_step == 1 and dm.cache.meta["partial"]
