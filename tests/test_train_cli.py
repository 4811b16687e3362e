"""The LightningCLI entry point: fit, resume, export, validate/test, config errors, W&B offline logging."""

import glob
from pathlib import Path

import cli_probes
import pytest
import torch
import torch.nn.functional as F
import yaml
from wandb_records import logged_config, logged_history

import train

SENTENCES = ["a man is playing a guitar .", "the dog is cleaning the car .", "a lady reads the daily paper ."] * 11


def fit_args(tmp_path, tiny_model, sample_data, *extra):
    return [
        "fit",
        "--seed_everything", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "4",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path),
        "--model", "lightning_modules.ContrastiveModule",
        "--model.model_name_or_path", tiny_model,
        "--model.pooler", "cls",
        "--model.lr", "1e-3",
        "--data", "datamodules.SentencesDataModule",
        "--data.source", str(sample_data / "sentences.txt"),
        "--data.batch_size", "8",
        *extra,
    ]


def test_fit_then_export_command(tmp_path, tiny_model, sample_data):
    from sentence_transformers import SentenceTransformer

    cli = train.main(fit_args(tmp_path, tiny_model, sample_data))
    assert cli.trainer.global_step == 4
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file()
    train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "st")])
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    got = st.encode(SENTENCES, convert_to_tensor=True)
    want = F.normalize(cli.model.encode(SENTENCES), dim=-1)  # the trained module, MLP dropped (train_only)
    assert (got - want).abs().max().item() < 1e-5


def test_training_moves_the_weights_and_logs_the_loss(tmp_path, tiny_model, sample_data):
    cli = train.main(fit_args(tmp_path, tiny_model, sample_data))
    metrics = (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "train/loss" in metrics
    from transformers import AutoModel

    start = AutoModel.from_pretrained(tiny_model).embeddings.word_embeddings.weight
    assert not torch.allclose(start, cli.model.encoder.model.embeddings.word_embeddings.weight)


def test_resume_from_last_continues_at_the_saved_step(tmp_path, tiny_model, sample_data):
    ckpt_args = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
                 "--trainer.callbacks.every_n_train_steps=2", f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    train.main(fit_args(tmp_path, tiny_model, sample_data, "--trainer.max_steps", "2", *ckpt_args))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2

    resumed = train.main(fit_args(tmp_path, tiny_model, sample_data, "--trainer.max_steps", "4", *ckpt_args,
                                  "--trainer.callbacks+=cli_probes.RecordTrainStart", "--ckpt_path", "last"))
    assert cli_probes.SEEN["step"] == 2
    want = saved["optimizer_states"][0]["state"][0]
    assert set(cli_probes.SEEN["state"]) >= {"exp_avg", "exp_avg_sq"}
    for key, value in cli_probes.SEEN["state"].items():
        torch.testing.assert_close(value, want[key])
    torch.testing.assert_close(
        cli_probes.SEEN["weights"], saved["state_dict"]["encoder.model.embeddings.word_embeddings.weight"])
    assert resumed.trainer.global_step == 4


def test_typo_in_an_option_is_rejected_at_parse_time(tmp_path, tiny_model, sample_data, capsys):
    with pytest.raises(SystemExit):
        train.main(fit_args(tmp_path, tiny_model, sample_data, "--model.temprature", "0.1"))
    assert "temprature" in capsys.readouterr().err


def test_a_batch_of_one_sentence_is_refused_before_training(tmp_path, tiny_model, sample_data):
    """One row per step leaves InfoNCE a single candidate: loss 0, nothing learnt. Said before the first step."""
    with pytest.raises(ValueError, match=r"data.batch_size=1 on 1 process\(es\): a global batch of one row"):
        train.main(fit_args(tmp_path, tiny_model, sample_data, "--data.batch_size", "1"))


def test_bad_values_end_the_command_with_one_line_naming_them(tmp_path, tiny_model, sample_data):
    """From the shell, a bad option value or data file ends with `error: ...` naming it, not a traceback through
    jsonargparse or Lightning (EMBEDLAB_TRACEBACK=1 brings the traceback back)."""
    import os
    import subprocess
    import sys

    script = str(Path(train.__file__))
    env = {**os.environ, "EMBEDLAB_TRACEBACK": ""}
    for extra, message in [(["--model.temperature", "0"],
                            "error: lightning_modules.ContrastiveModule: temperature must be > 0, got 0.0"),
                           (["--data.source", str(tmp_path / "nope.txt")], "nope.txt' not found")]:
        proc = subprocess.run([sys.executable, script, *fit_args(tmp_path, tiny_model, sample_data, *extra)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, script, *fit_args(tmp_path, tiny_model, sample_data, "--model.temperature",
                                                             "0")],
                          capture_output=True, text=True, env={**env, "EMBEDLAB_TRACEBACK": "1"}, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_override_reaches_the_module(tmp_path, tiny_model, sample_data):
    cli = train.main(fit_args(tmp_path, tiny_model, sample_data, "--model.temperature", "0.1",
                              "--trainer.max_steps", "1"))
    assert cli.model.temperature == 0.1


def test_validate_and_test_on_sts_pairs(tmp_path, tiny_model, sample_data):
    args = ["--model", "lightning_modules.ContrastiveModule", "--model.model_name_or_path", tiny_model,
            "--model.pooler", "mean", "--data", "datamodules.STSDataModule",
            "--data.tasks", f"[{sample_data / 'sts_dev.tsv'}]", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = train.main(["test", *args])
    rho = cli.trainer.callback_metrics["test/sts_dev_spearman"].item()

    from torchmetrics.functional import spearman_corrcoef

    from datamodules import load_sts

    pairs = load_sts(str(sample_data / "sts_dev.tsv"))
    cos = F.cosine_similarity(cli.model.encode(pairs.sentences1), cli.model.encode(pairs.sentences2))
    assert rho == pytest.approx(spearman_corrcoef(cos, torch.tensor(pairs.scores)).item() * 100, abs=1e-3)
    cli = train.main(["validate", *args])
    assert "val/sts_dev_spearman" in cli.trainer.callback_metrics


def test_wandb_offline_records_the_config_and_metrics(tmp_path, tiny_model, sample_data):
    cfg = {
        "trainer": {
            "logger": [{"class_path": "pytorch_lightning.loggers.WandbLogger",
                        "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "t"}}],
            "callbacks": [{"class_path": "callbacks.STSEvaluator",
                           "init_args": {"task": str(sample_data / "sts_dev.tsv"), "every_n_steps": 2}}],
        }
    }
    (tmp_path / "wandb.yaml").write_text(yaml.safe_dump(cfg))
    args = fit_args(tmp_path, tiny_model, sample_data)
    i = args.index("--trainer.logger")
    del args[i : i + 4]
    cli = train.main([*args, "--config", str(tmp_path / "wandb.yaml"), "--model.temperature", "0.07"])
    run = cli.trainer.logger.experiment
    run_dir = Path(run.dir).parent
    run.finish()  # this run, whatever else the session has open: flushes every record to its file
    run_file = glob.glob(str(run_dir / "run-*.wandb"))[0]
    config = logged_config(run_file)
    assert "model" in config, sorted(config)
    assert config["model"]["init_args"]["temperature"] == 0.07
    assert config["data"]["init_args"]["batch_size"] == 8
    history = logged_history(run_file)
    assert any("train/loss" in row for row in history)
    # each evaluation logged once, at the number of steps taken (self.log would repeat it on later logging steps)
    sts = next(c for c in cli.trainer.callbacks if type(c).__name__ == "STSEvaluator")
    logged = [(row["trainer/global_step"], row["val/sts_dev_spearman"]) for row in history
              if "val/sts_dev_spearman" in row]
    assert len(sts.history) >= 3 and logged == [(step, pytest.approx(rho)) for step, rho in sts.history]


def test_resume_mid_epoch_sees_the_same_batches_as_an_uninterrupted_run(tmp_path, tiny_model):
    """Interrupted at step 3 of a 5-batch epoch, resumed to step 8: the batch sequence equals a straight run's."""
    from datamodules.sample import write_sample

    data = write_sample(tmp_path / "d", n_sentences=40, n_pairs=5)

    def run(steps, *extra):
        cli_probes.BATCHES.clear()
        train.main(fit_args(tmp_path, tiny_model, data, "--trainer.max_steps", str(steps), "--data.batch_size", "8",
                            "--trainer.callbacks+=cli_probes.RecordBatches", *extra))
        return list(cli_probes.BATCHES)

    straight = run(8)
    ckpt = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.every_n_train_steps=1", f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    interrupted = run(3, *ckpt)
    resumed = run(8, *ckpt, "--ckpt_path", "last")
    assert [b[:3] for b in straight] == [(s, s // 5, s % 5) for s in range(8)]  # (step, epoch, batch_idx)
    assert interrupted + resumed == straight
    assert len({b[3] for b in straight}) == 8  # the fingerprints tell batches apart


def test_an_old_callback_name_says_what_replaced_it(capsys):
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", quickstart, "--trainer.callbacks+=callbacks.SAEReport", "--print_config"])
    said = " ".join(capsys.readouterr().err.split())  # jsonargparse wraps the message over lines
    assert "class_path 'callbacks.SAEReport': is gone: use callbacks.ExportOnFitEnd" in said


def test_a_recipe_with_a_tab_is_one_line_naming_file_line_and_column(tmp_path, tiny_model, sample_data):
    import subprocess
    import sys

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  init_args:\n\tpooler: mean\n")  # a tab where YAML wants spaces
    proc = subprocess.run([sys.executable, str(Path(train.__file__)),
                           *fit_args(tmp_path, tiny_model, sample_data, "--config", str(recipe))],
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {recipe}, line 3, column 1: not valid YAML: found character '\\t' that cannot start any "
                      "token (YAML indents with spaces, not tabs)"], proc.stderr[-2000:]
    assert proc.returncode == 1 and "usage:" not in proc.stderr and "Traceback" not in proc.stderr


def test_the_config_is_dumped_once_per_fit_not_at_every_checkpoint(tmp_path, tiny_model, sample_data, monkeypatch):
    """Each save re-dumped the whole config through jsonargparse and yaml (~150 ms, 17 saves per 100 quickstart
    steps): a run saving at each of 6 steps must dump as often as one saving at each of 2. The data config must
    still be in every checkpoint."""
    from jsonargparse import ArgumentParser

    dumps = []
    dump = ArgumentParser.dump
    monkeypatch.setattr(ArgumentParser, "dump", lambda self, *a, **k: dumps.append(1) or dump(self, *a, **k))
    counts = {}
    for steps in (2, 6):
        dumps.clear()
        folder = tmp_path / str(steps)
        train.main(fit_args(folder, tiny_model, sample_data, "--trainer.max_steps", str(steps),
                            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
                            "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.dirpath={folder / 'c'}"))
        counts[steps] = len(dumps)
        saved = sorted((folder / "c").glob("*.ckpt"))
        assert len(saved) >= steps
        for ckpt in saved:
            data = torch.load(ckpt, weights_only=False, mmap=True)[train.DATA_CONFIG_KEY]
            assert data["init_args"]["source"] == str(sample_data / "sentences.txt")
    assert counts[6] == counts[2]
