"""When STSEvaluator scores: its step schedule, epoch ends only for a callback that reads the score there, the final
weights once, and a checkpoint that would file weights under a stale score refused."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from callbacks.sts import STSEvaluator
from datamodules import SentencesDataModule
from lightning_modules import ContrastiveModule

METRIC = "val/sts_dev_spearman"


def fit(tmp_path, tiny_model, sample_data, *callbacks, max_steps: int = 7) -> STSEvaluator:
    """A tiny SimCSE fit of ``max_steps`` over 24 sentences in batches of 8 (epochs end after steps 3, 6, ...),
    scored every 2 steps; returns the evaluator."""
    lines = (sample_data / "sentences.txt").read_text().splitlines(keepends=True)
    (tmp_path / "s.txt").write_text("".join(lines[:24]))
    sts = STSEvaluator(task=str(sample_data / "sts_dev.tsv"), every_n_steps=2, batch_size=64)
    for callback in callbacks:
        if isinstance(callback, STSEvaluator):
            sts = callback
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         callbacks=[sts, *(c for c in callbacks if c is not sts)])
    pl.seed_everything(0)
    module = ContrastiveModule(model_name_or_path=tiny_model, max_length=16, lr=1e-3)
    trainer.fit(module, SentencesDataModule(source=str(tmp_path / "s.txt"), batch_size=8))
    return sts


def steps(sts: STSEvaluator) -> list[int]:
    return [step for step, _ in sts.history]


def test_a_step_checkpoint_needs_no_epoch_end_scores(tmp_path, tiny_model, sample_data):
    """ModelCheckpoint every 2 steps (train.py's default): scored at 0 (start), 2, 4, 6 and the final step 7, not
    at the epoch ends 3 and 6-as-epoch-end; the checkpoint files hold the scores of their own steps."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor=METRIC, mode="max", save_top_k=-1,
                           every_n_train_steps=2, filename="{step}")
    sts = fit(tmp_path, tiny_model, sample_data, ckpt)
    assert steps(sts) == [0, 2, 4, 6, 7]
    history = dict(sts.history)
    saved = {int(Path(path).stem.split("=")[1]): float(score) for path, score in ckpt.best_k_models.items()}
    assert saved == {s: pytest.approx(history[s], abs=1e-4) for s in (2, 4, 6)}


@pytest.mark.parametrize("reader", ["checkpoint", "early_stopping", "asked"])
def test_epoch_ends_are_scored_when_something_reads_them(tmp_path, tiny_model, sample_data, reader):
    """An epoch-end ModelCheckpoint or EarlyStopping on the metric (or at_epoch_end: true) gets a fresh score at each
    epoch's end (step 3; 6 is on the schedule anyway)."""
    callbacks = {"checkpoint": [ModelCheckpoint(dirpath=tmp_path / "ck", monitor=METRIC, mode="max", save_top_k=-1,
                                                filename="{step}")],
                 "early_stopping": [EarlyStopping(monitor=METRIC, mode="max", patience=100)],
                 "asked": [STSEvaluator(task=str(sample_data / "sts_dev.tsv"), every_n_steps=2,
                                        at_epoch_end=True)]}[reader]
    sts = fit(tmp_path, tiny_model, sample_data, *callbacks)
    assert steps(sts) == [0, 2, 3, 4, 6, 7]
    if reader == "checkpoint":  # the epoch-end saves (3, 6 and the run's end, 7) hold their own step's score
        history = dict(sts.history)
        saved = {int(Path(path).stem.split("=")[1]): float(score)
                 for path, score in callbacks[0].best_k_models.items()}
        assert saved == {s: pytest.approx(history[s], abs=1e-4) for s in (3, 6, 7)}


def test_at_epoch_end_false_and_a_step_schedule_of_zero(tmp_path, tiny_model, sample_data):
    """every_n_steps: 0 scores epoch ends only; with at_epoch_end: false it would never score and is refused."""
    sts = fit(tmp_path, tiny_model, sample_data,
              STSEvaluator(task=str(sample_data / "sts_dev.tsv"), every_n_steps=0))
    assert steps(sts) == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="never evaluate"):
        STSEvaluator(every_n_steps=0, at_epoch_end=False)
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        STSEvaluator(every_n_steps=-1)


def test_early_stopping_against_no_epoch_end_scores_is_refused_with_its_own_fix(tmp_path, tiny_model, sample_data):
    sts = STSEvaluator(task=str(sample_data / "sts_dev.tsv"), every_n_steps=2, at_epoch_end=False)
    with pytest.raises(ValueError, match=r"^EarlyStopping\(monitor=.*drop at_epoch_end, or remove the EarlyStopping$"):
        fit(tmp_path, tiny_model, sample_data, sts, EarlyStopping(monitor=METRIC, mode="max"))


@pytest.mark.parametrize(("scores", "trigger", "refused"), [
    ({}, {"every_n_train_steps": 3}, r"every_n_train_steps=3\).*every_n_steps=2\).*a multiple of 2"),
    ({}, {"train_time_interval": datetime.timedelta(seconds=1)}, r"train_time_interval=0:00:01\).*every_n_steps=2"),
    ({"at_epoch_end": True}, {"every_n_train_steps": 3}, r"every_n_train_steps=3\).*every_n_steps=2"),
    ({"every_n_steps": 0}, {"every_n_train_steps": 2}, r"every_n_train_steps=2\).*every_n_steps=0\).*drop its"),
    ({"at_epoch_end": False}, {}, r"ModelCheckpoint\(monitor='val/sts_dev_spearman'\) reads the score at epoch "
                                  r"ends.*at_epoch_end: false"),
])
def test_a_checkpoint_saving_between_scores_is_refused(tmp_path, tiny_model, sample_data, scores, trigger, refused):
    """A ModelCheckpoint on the metric that saves where the evaluator does not score (every 3 steps against scores
    every 2, on a timer, every 2 steps against epoch-end scores, at epoch ends against at_epoch_end: false) would file
    weights under an older score: refused at setup, naming both, whatever the evaluator's schedule."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor=METRIC, mode="max", **trigger)
    sts = STSEvaluator(task=str(sample_data / "sts_dev.tsv"), **{"every_n_steps": 2, **scores})
    with pytest.raises(ValueError, match=refused):
        fit(tmp_path, tiny_model, sample_data, sts, ckpt)
