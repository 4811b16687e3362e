"""What train.py fit supplies when a recipe leaves it unset: folders, loggers, checkpointing, LR monitoring, and the
W&B run's group, tags, job type and best-value summaries (read back from the offline run file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE

import train
from commands.run_defaults import apply_run_defaults, recipe_name, run_tags, wandb_mode_default
from tests.wandb_records import read_records

#: The progress bar the run defaults add (Rich where it is installed).
BAR = "RichMetricsBar" if _RICH_AVAILABLE else "TQDMMetricsBar"


def parsed(**trainer) -> Namespace:
    """A fit config as the parser leaves it: unset options are None."""
    return Namespace(
        trainer=Namespace(default_root_dir=None, logger=None, enable_checkpointing=None, **trainer),
        model=Namespace(class_path="lightning_modules.ContrastiveModule",
                        init_args=Namespace(model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
                                            candidates=None)),
        data=Namespace(class_path="datamodules.SentencesDataModule", init_args=Namespace(source="wiki/wiki1m.txt")))


def test_recipe_name_is_the_first_config_stem():
    assert recipe_name(["fit", "--config", "configs/quickstart.yaml", "--config", "configs/trainer/ddp.yaml"]) \
        == "quickstart"
    assert recipe_name(["fit", "--config=configs/sae_minilm_sentences.yaml"]) == "sae_minilm_sentences"
    assert recipe_name(["fit", "--model", "X"]) == "embedlab"


def test_unset_options_get_the_recipe_defaults():
    sts = Namespace(class_path="callbacks.STSEvaluator", init_args=Namespace(task="data/sts_dev.tsv",
                                                                             every_n_steps=25))
    cfg = parsed(callbacks=[sts])
    apply_run_defaults(cfg, "my_recipe")
    t = cfg.trainer
    assert t.default_root_dir == "runs/my_recipe"
    wandb, csv = t.logger
    assert wandb.class_path.endswith("WandbLogger") and csv.class_path.endswith("CSVLogger")
    assert wandb.init_args.name == "my_recipe" and wandb.init_args.save_dir == os.path.abspath("runs/my_recipe")
    assert wandb.dict_kwargs == {"group": "my_recipe", "job_type": "fit",
                                 "tags": ["simcse", "model:all-MiniLM-L6-v2", "data:sentences", "source:wiki1m.txt"]}
    names = [c.class_path.rpartition(".")[2] for c in t.callbacks]
    assert names == ["STSEvaluator", "ModelCheckpoint", BAR, "PreemptionCheckpoint", "LearningRateMonitor",
                     "WandbSummaries"]
    ckpt = t.callbacks[1].init_args
    assert (ckpt.monitor, ckpt.mode, ckpt.every_n_train_steps, ckpt.save_last) == ("val/sts_dev_spearman", "max", 25,
                                                                                  True)


def test_the_sae_defaults_name_the_checkpoint_run_defaults_would_add():
    """configs/defaults/sae.yaml shows the SAE recipes' ModelCheckpoint; it must stay the one computed without it."""
    shown = yaml.safe_load((Path(train.__file__).parent / "configs/defaults/sae.yaml").read_text())
    ckpt = next(c for c in shown["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    cfg = parsed(callbacks=None)
    cfg.model = Namespace(class_path="lightning_modules.SAEModule", init_args=Namespace(sae=None))
    cfg.trainer.logger = False
    apply_run_defaults(cfg, "r")
    computed = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("ModelCheckpoint"))
    assert ckpt["class_path"] == computed.class_path
    assert ckpt["init_args"] == computed.init_args.as_dict()


def test_checkpointing_off_drops_a_checkpoint_the_defaults_named():
    """configs/trainer/debug.yaml (enable_checkpointing: false) over an SAE recipe: Lightning would refuse the
    ModelCheckpoint that configs/defaults/sae.yaml lists."""
    ckpt = Namespace(class_path="pytorch_lightning.callbacks.ModelCheckpoint", init_args=Namespace(monitor="m"))
    export = Namespace(class_path="callbacks.ExportOnFitEnd", init_args=Namespace(output_dir=None))
    cfg = parsed(callbacks=[export, ckpt], enable_progress_bar=False)
    cfg.trainer.logger = False
    cfg.trainer.enable_checkpointing = False
    apply_run_defaults(cfg, "r")
    assert [c.class_path.rpartition(".")[2] for c in cfg.trainer.callbacks] == ["ExportOnFitEnd",
                                                                                 "PreemptionCheckpoint"]


def test_what_a_recipe_sets_is_kept():
    own_logger = Namespace(class_path="pytorch_lightning.loggers.CSVLogger", init_args=Namespace(save_dir="x"))
    own_ckpt = Namespace(class_path="pytorch_lightning.callbacks.ModelCheckpoint", init_args=Namespace(monitor="m"))
    cfg = parsed(callbacks=[own_ckpt])
    cfg.trainer.logger = [own_logger]
    cfg.trainer.default_root_dir = "elsewhere"
    apply_run_defaults(cfg, "r")
    assert cfg.trainer.logger == [own_logger] and cfg.trainer.default_root_dir == "elsewhere"
    assert [c.class_path.rpartition(".")[2] for c in cfg.trainer.callbacks] == ["ModelCheckpoint", BAR,
                                                                                 "PreemptionCheckpoint",
                                                                                 "LearningRateMonitor"]
    off = parsed(callbacks=None)
    off.trainer.logger = False
    off.trainer.enable_checkpointing = False
    off.trainer.enable_progress_bar = False
    apply_run_defaults(off, "r")
    assert off.trainer.logger is False  # the preemption callback stays: it owns SIGTERM until training starts
    assert [c.class_path.rpartition(".")[2] for c in off.trainer.callbacks] == ["PreemptionCheckpoint"]


def test_an_sae_recipe_checkpoints_on_fvu_and_is_tagged_by_level():
    cfg = parsed(callbacks=None)
    cfg.model = Namespace(class_path="lightning_modules.SAEModule",
                          init_args=Namespace(sae=Namespace(matryoshka_widths=[0.25, 1.0])))
    cfg.data = Namespace(class_path="datamodules.ActivationsDataModule",
                         init_args=Namespace(model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
                                             source="brown", level="token"))
    apply_run_defaults(cfg, "r")
    ckpt = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")).init_args
    assert (ckpt.monitor, ckpt.mode) == ("val/sae/fvu", "min")
    assert run_tags(cfg) == ["matryoshka-batchtopk-sae", "model:all-MiniLM-L6-v2", "data:activations",
                             "source:brown", "level:token"]


def test_wandb_goes_offline_only_when_nothing_says_how_to_reach_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode_default() is None
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode_default() is None
    (tmp_path / "netrc").write_text("")
    assert wandb_mode_default() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_a_recipe_without_logger_blocks_gets_a_comparable_wandb_run(tmp_path, tiny_model, sample_data, monkeypatch):
    """A recipe naming only its model, data and STS evaluator: the W&B run is grouped and tagged, the monitored
    metric has a max summary, and best/<metric> and its step are the best checkpoint's."""
    monkeypatch.chdir(tmp_path)
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [{"class_path": "callbacks.STSEvaluator",
                                   "init_args": {"task": str(sample_data / "sts_dev.tsv"), "every_n_steps": 2}}]},
        "model": {"class_path": "lightning_modules.ContrastiveModule",
                  "init_args": {"model_name_or_path": tiny_model, "pooler": "cls", "lr": 1e-3}},
        "data": {"class_path": "datamodules.SentencesDataModule",
                 "init_args": {"source": str(sample_data / "sentences.txt"), "batch_size": 8}},
    }
    (tmp_path / "tiny_recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = train.main(["fit", "--config", str(tmp_path / "tiny_recipe.yaml")])
    ckpt = cli.trainer.checkpoint_callback
    assert Path(ckpt.dirpath).resolve().is_relative_to(tmp_path / "runs" / "tiny_recipe")
    run = cli.trainer.loggers[0].experiment
    run_id = run.id
    run.finish()
    run_file = next((tmp_path / "runs" / "tiny_recipe" / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb"))
    records = read_records(run_file)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (header.run_group, header.job_type, header.display_name) == ("tiny_recipe", "fit", "tiny_recipe")
    assert list(header.tags) == ["simcse", f"model:{Path(tiny_model).name}", "data:sentences",
                                 "source:sentences.txt"]
    metrics = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert metrics["val/sts_dev_spearman"].summary.max
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    best_step = torch.load(ckpt.best_model_path, weights_only=True, mmap=True)["global_step"]
    assert summary["best/val/sts_dev_spearman"] == pytest.approx(float(ckpt.best_model_score))
    assert summary["best/val/sts_dev_spearman/step"] == best_step > 0


def test_the_short_config_flag_names_the_recipe_and_old_keys_in_a_recipe_file_are_named(tmp_path):
    from core.errors import DataError

    assert recipe_name(["fit", "-c", "configs/quickstart.yaml"]) == "quickstart"
    old = tmp_path / "old_sae.yaml"
    old.write_text("model:\n  class_path: lightning_modules.SAEModule\n  init_args:\n    k: 64\n")
    with pytest.raises(DataError, match=r"old_sae.yaml: model.init_args.k is now model.init_args.sae.k"):
        train.check_moved_options(["fit", "-c", str(old)])
    # a recipe that names its module only through the file it builds on is checked against that module
    (tmp_path / "widths.yaml").write_text("defaults: old_sae_base.yaml\nmodel:\n  init_args:\n    sae:\n      k: 8\n")
    (tmp_path / "old_sae_base.yaml").write_text("model:\n  class_path: lightning_modules.SAEModule\n")
    with pytest.raises(DataError, match=r"--model.init_args.k is now --model.init_args.sae.k \(SAEModule"):
        train.check_moved_options(["fit", "-c", str(tmp_path / "widths.yaml"), "--model.init_args.k", "64"])
    train.check_moved_options(["fit", "-c", str(tmp_path / "widths.yaml"), "--model.init_args.sae.k", "64"])
    (tmp_path / "plain.yaml").write_text("model: lightning_modules.SAEModule\n")
    train.check_moved_options(["fit", "--config", str(tmp_path / "plain.yaml")])  # no init_args: nothing moved


@pytest.mark.parametrize("bar", ["TQDMMetricsBar", "RichMetricsBar"])
def test_the_bar_redraws_on_its_own_interval_and_ends_each_epoch_complete(tmp_path, tiny_model, sample_data, bar,
                                                                          monkeypatch):
    """Training batches redraw the bar at most every redraw_seconds (here: the first and the last of an epoch's
    batches, so the bar ends showing every batch done, and the run's last step when max_steps stops it inside its
    second epoch); with redraw_seconds 0 every batch redraws. The values shown are read at every logging step,
    whether or not it redraws."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    from callbacks import progress
    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule

    if bar == "RichMetricsBar" and not _RICH_AVAILABLE:
        pytest.skip("rich is not installed")
    parent = RichProgressBar if bar == "RichMetricsBar" else TQDMProgressBar
    drawn, read = [], []
    real_draw, real_read = parent.on_train_batch_end, progress.PeriodicMetrics._read
    monkeypatch.setattr(parent, "on_train_batch_end", lambda self, *a: drawn.append(a[-1]) or real_draw(self, *a))
    monkeypatch.setattr(progress.PeriodicMetrics, "_read",
                        lambda self, trainer: read.append(trainer.global_step) or real_read(self, trainer))

    def fit(seconds: float, refresh_rate: int | None = None, **limits):
        drawn.clear()
        read.clear()
        callback = getattr(progress, bar)(**({} if refresh_rate is None else {"refresh_rate": refresh_rate}))
        callback.redraw_seconds = seconds
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, log_every_n_steps=2,
                             enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path, **limits)
        trainer.fit(ContrastiveModule(model_name_or_path=tiny_model, max_length=16),
                    SentencesDataModule(source=str(sample_data / "sentences.txt"), batch_size=16))
        if bar == "TQDMMetricsBar":
            return callback, callback.train_progress_bar.n
        return callback, callback.progress.tasks[callback.train_progress_bar_id].completed

    callback, shown = fit(3600.0, max_epochs=1)
    total = callback.trainer.num_training_batches
    assert total >= 4 and drawn == [0, total - 1] and shown == total
    fit(0.0, max_epochs=1)
    assert drawn == list(range(total))
    if bar == "TQDMMetricsBar":  # tqdm draws every refresh_rate-th batch: the interval opens on those only
        fit(0.0, refresh_rate=5, max_epochs=1)
        assert drawn == [b for b in range(total) if (b + 1) % 5 == 0 or b == total - 1]
    callback, shown = fit(3600.0, max_steps=total + 3)
    assert drawn == [0, total - 1, 2] and shown == 3
    # read at every other step (log_every_n_steps=2) and before the first logging step, not at every step
    assert (total + 3) // 2 - 1 <= len(set(read)) and len(read) <= (total + 3) // 2 + 3 and "loss" in callback._values
