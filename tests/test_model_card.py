"""Model cards of sentence-transformers exports: generated from the run (fit-end export and `train.py export`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import train
from lightning_modules.loading import load_module
from lightning_modules.model_card import model_card

SENTENCES = ["a man is playing a guitar .", "the dog is cleaning the car .", "a lady reads the daily paper ."]


def fit_with_export(tmp_path: Path, tiny_model: str, sample_data: Path):
    """A 4-step tiny SimCSE fit logged to an offline W&B run, the best checkpoint chosen on the dev pairs."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "log_every_n_steps": 1, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": [{"class_path": "pytorch_lightning.loggers.WandbLogger",
                        "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "cards"}}],
            "callbacks": [
                {"class_path": "callbacks.STSEvaluator",
                 "init_args": {"task": str(sample_data / "sts_dev.tsv"), "every_n_steps": 2}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/sts_dev_spearman", "mode": "max", "every_n_train_steps": 2}},
                {"class_path": "callbacks.ExportOnFitEnd"},
            ],
        },
        "model": {"class_path": "lightning_modules.ContrastiveModule",
                  "init_args": {"model_name_or_path": tiny_model, "pooler": "mean", "max_length": 16,
                                "temperature": 0.07, "lr": 1e-3}},
        "data": {"class_path": "datamodules.SentencesDataModule",
                 "init_args": {"source": str(sample_data / "sentences.txt"), "batch_size": 8}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    return train.main(["fit", "--config", str(tmp_path / "fit.yaml")])


def load_line(card: str) -> str:
    """The folder the card's usage snippet loads."""
    found = re.findall(r"SentenceTransformer\('([^']+)'\)", card)
    assert len(found) == 1, card
    return found[0]


def check_card(card: str, tiny_model: str, ckpt: str, score: float, run_id: str) -> None:
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert f"| base model | `{tiny_model}` |" in card
    assert "unsupervised SimCSE (`lightning_modules.contrastive.ContrastiveModule`)" in card
    assert "| temperature | 0.07 |" in card and "| max_length | 16 |" in card and "| pooler | `mean` |" in card
    assert f"| steps | {step} optimiser steps" in card
    assert f"| `val/sts_dev_spearman` | {score:.2f} | {step} |" in card
    assert f"- W&B run `{run_id}`, project `cards`" in card
    assert "No STS test set was measured at export: the run names no data root" in card


def test_fit_export_and_export_command_write_the_runs_card(tmp_path, tiny_model, sample_data):
    from sentence_transformers import SentenceTransformer

    cli = fit_with_export(tmp_path, tiny_model, sample_data)
    trainer = cli.trainer
    ckpt = trainer.checkpoint_callback.best_model_path
    score = trainer.checkpoint_callback.best_model_score.item()
    run = trainer.logger.experiment
    run_id, run_dir = run.id, str(Path(run.dir).parent)
    exported = next(cb for cb in trainer.callbacks if type(cb).__name__ == "ExportOnFitEnd").exported
    run.finish()

    card = (exported / "README.md").read_text()
    check_card(card, tiny_model, ckpt, score, run_id)
    assert "sentences.txt" in card and "`datamodules.SentencesDataModule`" in card
    assert f"folder `{run_dir}` (offline" in card
    assert "kept as the run's best by `val/sts_dev_spearman`" in card
    if trainer.global_step != torch.load(ckpt, weights_only=True)["global_step"]:
        assert f"(the run went on to {trainer.global_step}; kept as the run's best" in card
    # the dev metric is the one the run logged for these weights, as STSEvaluator recorded it
    sts = next(cb for cb in trainer.callbacks if type(cb).__name__ == "STSEvaluator")
    assert dict(sts.history)[torch.load(ckpt, weights_only=True)["global_step"]] == pytest.approx(score)

    st = SentenceTransformer(load_line(card), device="cpu")
    want = F.normalize(load_module(ckpt).encode(SENTENCES), dim=-1)
    assert (st.encode(SENTENCES, convert_to_tensor=True) - want).abs().max().item() < 1e-5

    # the same facts from the checkpoint alone
    train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "st")])
    again = (tmp_path / "st" / "README.md").read_text()
    check_card(again, tiny_model, ckpt, score, run_id)
    assert load_line(again) == str(tmp_path / "st")
    wandb_line = next(line for line in card.splitlines() if line.startswith("- W&B run"))
    assert wandb_line in again.splitlines()
    assert f"- checkpoint: `{ckpt}`" in again


def test_a_fit_without_wandb_or_checkpoint_says_so(tmp_path, tiny_model, sample_data):
    cli = train.main([
        "fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
        "--trainer.callbacks+=callbacks.ExportOnFitEnd", f"--trainer.callbacks.output_dir={tmp_path / 'out'}",
        "--model", "lightning_modules.ContrastiveModule", "--model.model_name_or_path", tiny_model,
        "--data", "datamodules.SentencesDataModule", "--data.source", str(sample_data / "sentences.txt"),
        "--data.batch_size", "8"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert cli.trainer.global_step == 2 and "| steps | 2 optimiser steps |" in card
    assert "- W&B: the run had no WandbLogger" in card and "The run logged no dev metric" in card
    assert "| MLP over the pooled vector | `train_only` |" in card  # cls pooling: SimCSE's default


def test_mcr2_card_names_its_settings(tiny_model):
    from lightning_modules import MCR2Module

    module = MCR2Module(tiny_model, out_dim=6, grouping="kmeans", num_clusters=4, eps2=0.25, distill_weight=3.0,
                        max_length=16)
    card = model_card(module, {}, "out", 6)
    assert "# tiny_bert" in card.split("---")[2] and "MCR2 projection head on a frozen teacher" in card
    for row in ("| output dim | 32 -> 6 (linear) |", "| grouping | kmeans (k = 4) |", "| eps2 | 0.25 |",
                "| distillation weight | 3 |", "6-d sentence embeddings"):
        assert row in card, row


def write_stsb(root: Path, n: int = 40) -> None:
    """A small STS-B test file in the organisers' layout (genre, file, year, id, score, sentence1, sentence2)."""
    words = "a man dog lady child plays reads cleans guitar car paper park".split()
    rows = []
    for i in range(n):
        s1 = " ".join(words[j % len(words)] for j in range(i % 5, i % 5 + 4))
        s2 = " ".join(words[j % len(words)] for j in range(i % 7, i % 7 + 4))
        rows.append(f"main-news\tx\t2012\t{i}\t{(i * 37 % 50) / 10:.1f}\t{s1} .\t{s2} .")
    (root / "stsb").mkdir(parents=True)
    (root / "stsb" / "sts-test.csv").write_text("\n".join(rows) + "\n")


def test_sts_measured_at_export_on_the_tasks_found(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    from evaluation.evaluate import SentenceTransformerEmbedder, evaluate_sts, score_export
    from lightning_modules import ContrastiveModule
    from lightning_modules.export import export

    write_stsb(tmp_path / "data")
    module = ContrastiveModule(tiny_model, pooler="mean", max_length=16)
    facts = {"sts_data_root": str(tmp_path / "data")}
    out = export(module, tmp_path / "st", card=facts)  # export writes; its caller scores the folder for the card
    score_export(out, module, facts, ["stsb", "sickr"])
    card = (out / "README.md").read_text()
    want = evaluate_sts(SentenceTransformerEmbedder(SentenceTransformer(str(out), device="cpu"), "st"), ["stsb"],
                        str(tmp_path / "data"))["stsb"].all
    assert f"| stsb | test | 40 | {want:.2f} |" in card
    assert "measured at export on this folder's model" in card
    assert f"Not found under `{tmp_path / 'data'}`, so not measured: sickr." in card


@pytest.mark.data
def test_sts_measured_at_export_when_the_run_names_a_data_root(tmp_path, tiny_model, sample_data, shared_data):
    """The STSEvaluator's data_root (here the real STS-B dev set) is where the card finds the test sets, at fit end
    and from the checkpoint; the numbers are train.py evaluate's on the exported folder."""
    from sentence_transformers import SentenceTransformer

    from evaluation.evaluate import SentenceTransformerEmbedder, evaluate_sts

    train.main([
        "fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
        "--trainer.callbacks+=callbacks.STSEvaluator",
        "--trainer.callbacks.task=stsb", f"--trainer.callbacks.data_root={shared_data}",
        "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks+=callbacks.ExportOnFitEnd",
        f"--trainer.callbacks.output_dir={tmp_path / 'fit'}", "--trainer.callbacks.sts_tasks=[stsb]",
        "--model", "lightning_modules.ContrastiveModule", "--model.model_name_or_path", tiny_model,
        "--model.pooler", "mean", "--data", "datamodules.SentencesDataModule",
        "--data.source", str(sample_data / "sentences.txt"), "--data.batch_size", "8"])
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    train.main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "cmd")])
    for out, tasks in ((tmp_path / "fit", ["stsb"]), (tmp_path / "cmd", ["stsb", "sickr"])):
        card = (out / "README.md").read_text()
        st = SentenceTransformer(str(out), device="cpu")
        want = evaluate_sts(SentenceTransformerEmbedder(st, "st"), tasks, str(shared_data))
        assert f"test sets from `{shared_data}`" in card
        for task, score in want.items():
            assert f"| {task} | test | {score.n_pairs} | {score.all:.2f} |" in card, (task, card)
        assert "| `val/stsb_spearman` |" in card  # the dev metric, beside the test sets
