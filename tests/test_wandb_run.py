"""What a fit leaves for comparing runs, read back from the offline W&B run file: the evaluation table and its
summary values (the numbers of the export's model card and of ``eval.json``, measured once), the best checkpoint and
the export as artefacts, an SAE's figures, and ``train.py interpret`` grouped with the fit that made the SAE."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import train
from callbacks.run_results import COLUMNS, EVAL_FILE, TABLE_KEY
from commands.interpret import fit_group
from evaluation import evaluate as scoring
from tests.test_model_card import write_stsb
from tests.wandb_records import logged_artifacts, logged_history, logged_summary, read_records

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, tiny_model: str, sample_data: Path, sts: dict | None = None,
        export: dict | None = None):
    """A 4-step tiny SimCSE fit through ``train.py fit`` with the run defaults (a W&B logger, offline; the best
    checkpoint chosen on the synthetic dev pairs), ending with ``ExportOnFitEnd(**export)``. The run folder is
    absolute: wandb's service process resolves a relative one against its own working directory, the one of the
    first test that started it."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "runs"),
                    "callbacks": [{"class_path": "callbacks.STSEvaluator",
                                   "init_args": {"task": str(sample_data / "sts_dev.tsv"), "every_n_steps": 2,
                                                 **(sts or {})}},
                                  {"class_path": "callbacks.ExportOnFitEnd", "init_args": export or {}}]},
        "model": {"class_path": "lightning_modules.ContrastiveModule",
                  "init_args": {"model_name_or_path": tiny_model, "pooler": "mean", "max_length": 16, "lr": 1e-3}},
        "data": {"class_path": "datamodules.SentencesDataModule",
                 "init_args": {"source": str(sample_data / "sentences.txt"), "batch_size": 8}},
    }
    (tmp_path / "tiny_simcse.yaml").write_text(yaml.safe_dump(recipe))
    return train.main(["fit", "--config", str(tmp_path / "tiny_simcse.yaml")])


def finished_run(cli) -> tuple[Path, str, object]:
    """The W&B run file and id of a fit (the run finished, so the file is complete), and its ExportOnFitEnd."""
    run = cli.trainer.loggers[0].experiment
    run_file, run_id = next(Path(run.dir).parent.glob("run-*.wandb")), run.id
    run.finish()
    return run_file, run_id, next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ExportOnFitEnd")


def logged_table(run_file: Path) -> dict:
    """The evaluation table (columns, data) from the run's files."""
    (row,) = [r for r in logged_history(run_file) if f"{TABLE_KEY}/_type" in r]
    assert row[f"{TABLE_KEY}/_type"] == "table-file"
    return json.loads((run_file.parent / "files" / row[f"{TABLE_KEY}/path"]).read_text())


def test_fit_end_logs_the_measured_sts_table_and_the_artifacts(tmp_path, tiny_model, sample_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stsb(tmp_path / "data")  # STS-B test only: SICK-R is asked for and missing
    measured = []
    real = scoring.measure_sts  # the caller of the export scores it, once
    monkeypatch.setattr(scoring, "measure_sts", lambda *a, **k: measured.append(a) or real(*a, **k))
    cli = fit(tmp_path, tiny_model, sample_data, sts={"data_root": str(tmp_path / "data")},
              export={"sts_tasks": ["stsb", "sickr"]})
    ckpt_cb = cli.trainer.checkpoint_callback
    ckpt = Path(ckpt_cb.best_model_path)
    step = torch.load(ckpt, weights_only=True, mmap=True)["global_step"]
    run_file, run_id, export_cb = finished_run(cli)
    exported = export_cb.exported
    assert len(measured) == 1  # the card's measurement is the one logged

    # eval.json beside the run holds the card's numbers
    record = json.loads((ckpt.parent.parent / EVAL_FILE).read_text())
    assert record == export_cb.eval_record
    assert (record["checkpoint"], record["checkpoint_step"], record["missing"]) == (str(ckpt), step, ["sickr"])
    (row,) = record["rows"]
    assert (row["task"], row["split"], row["n_pairs"], row["checkpoint_step"]) == ("stsb", "test", 40, step)
    card = (exported / "README.md").read_text()
    assert f"| stsb | test | 40 | {row['spearman']:.2f} |" in card

    # W&B: the table, the summary values
    table = logged_table(run_file)
    assert table["columns"] == COLUMNS == ["task", "split", "spearman", "n_pairs", "checkpoint_step"]
    assert table["data"] == [[r[c] for c in COLUMNS] for r in record["rows"]]
    summary = logged_summary(run_file)
    assert summary["eval/stsb_spearman"] == pytest.approx(row["spearman"])
    assert summary["eval/checkpoint_step"] == step
    assert record["summary"] == {"eval/stsb_spearman": row["spearman"], "eval/checkpoint_step": step}

    # the artefacts: the checkpoint by reference, the export file by file from its folder
    artifacts = {a["name"]: a for a in logged_artifacts(run_file) if a["type"] != "run_table"}  # wandb's own
    assert set(artifacts) == {f"model-{run_id}", f"export-{run_id}"}
    model, export = artifacts[f"model-{run_id}"], artifacts[f"export-{run_id}"]
    assert model["type"] == "model" and "best" in model["aliases"]
    meta = {"step": step, "run_steps": 4, "checkpoint": str(ckpt.resolve()), "monitor": "val/sts_dev_spearman",
            "mode": "max", "score": pytest.approx(float(ckpt_cb.best_model_score))}
    assert model["metadata"] == meta
    assert model["files"] == {ckpt.name: {"local_path": "", "ref": ckpt.resolve().as_uri(),
                                          "size": ckpt.stat().st_size, "digest": model["files"][ckpt.name]["digest"]}}
    assert export["type"] == "sentence-transformers"
    assert export["metadata"] == {**meta, "format": "sentence-transformers", "eval": record["summary"],
                                  "load": f"SentenceTransformer('{exported}')"}
    on_disk = {p.relative_to(exported).as_posix(): p for p in exported.rglob("*") if p.is_file()}
    assert {"README.md", "run.json", "modules.json", "model.safetensors"} <= set(on_disk) == set(export["files"])
    for name, entry in export["files"].items():
        assert entry["local_path"] == str(on_disk[name].resolve()) and entry["size"] == on_disk[name].stat().st_size


def test_without_test_sets_the_dev_metric_is_the_table(tmp_path, tiny_model, sample_data, monkeypatch):
    """No data root: the row is the dev metric the best checkpoint was chosen by; log_artifacts false logs none."""
    monkeypatch.chdir(tmp_path)
    cli = fit(tmp_path, tiny_model, sample_data, export={"log_artifacts": False})
    ckpt_cb = cli.trainer.checkpoint_callback
    step = torch.load(ckpt_cb.best_model_path, weights_only=True, mmap=True)["global_step"]
    run_file, _, export_cb = finished_run(cli)
    record = json.loads((Path(ckpt_cb.dirpath).parent / EVAL_FILE).read_text())
    score = float(ckpt_cb.best_model_score)
    assert record["rows"] == [{"task": "sts_dev", "split": "dev", "spearman": pytest.approx(score), "n_pairs": 60,
                               "checkpoint_step": step}]
    assert record["source"] == "the dev metric logged for these weights"
    card = (export_cb.exported / "README.md").read_text()
    assert f"| `val/sts_dev_spearman` | {record['rows'][0]['spearman']:.2f} | {step} |" in card
    assert logged_table(run_file)["data"] == [[r[c] for c in COLUMNS] for r in record["rows"]]
    summary = logged_summary(run_file)
    assert summary["eval/dev/sts_dev_spearman"] == pytest.approx(score) == summary["best/val/sts_dev_spearman"]
    assert "eval/sts_dev_spearman" not in summary  # a dev score never poses as a test score
    assert [a["type"] for a in logged_artifacts(run_file)] == ["run_table"]  # the table's own, by wandb


def test_an_sae_fit_logs_its_figures_and_interpret_joins_its_group(tmp_path, tiny_model_no_dropout, sample_data,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = train.main([
        "fit", "--config", str(ROOT / "configs" / "sae_minilm_sentences.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.max_epochs", "1",
        "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),  # absolute: see fit()
        "--data.model_name_or_path", tiny_model_no_dropout, "--data.source", str(sample_data / "sentences.txt"),
        "--data.data_root", "null", "--data.subset", "null", "--data.column", "text", "--data.text_prefix", "",
        "--data.max_sentences", "null", "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "32",
        "--data.max_length", "32", "--data.val_fraction", "0.2", "--model.init_args.sae.threshold_start", "1",
        "--model.init_samples", "256",
    ])
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    run_file, run_id, export_cb = finished_run(cli)
    exported = export_cb.exported
    metrics = json.loads((exported / "sae_metrics.json").read_text())
    record = json.loads((ckpt.parent.parent / EVAL_FILE).read_text())
    want = {f"eval/{k}": v for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "global_step"}
    assert {"eval/val/sae/fvu", "eval/dead_latents", "eval/num_latents"} <= set(want)
    step = torch.load(ckpt, weights_only=True, mmap=True)["global_step"]
    assert record["summary"] == {**want, "eval/checkpoint_step": step} and record["rows"] == []
    summary = logged_summary(run_file)
    assert {k: summary[k] for k in record["summary"]} == pytest.approx(record["summary"])
    export = next(a for a in logged_artifacts(run_file) if a["name"] == f"export-{run_id}")
    assert export["type"] == "sae" and export["metadata"]["format"] == "sparsify"
    assert export["metadata"]["monitor"] == "val/sae/fvu" and export["metadata"]["step"] == step
    assert {"cfg.json", "sae.safetensors", "sparsity.safetensors", "sae_metrics.json", "README.md"} <= set(
        export["files"])
    # the held-out feature density as a W&B histogram (its bins' counts are also scalars, in the CSV and above)
    (hist,) = [r for r in logged_history(run_file) if "val/sae/log10_density/_type" in r]
    assert hist["val/sae/log10_density/_type"] == "histogram"
    assert sum(hist["val/sae/log10_density/values"]) == metrics["num_latents"]
    assert sum(metrics[f"val/sae/log10_density_hist/{b}"] for b in range(-10, 0)) == metrics["num_latents"]

    # train.py interpret on the export or the checkpoint: grouped with the fit, job type interpret
    from commands import interpret  # the command (phase 1 moved it out of callbacks)

    assert fit_group(exported) == fit_group(ckpt) == "sae_minilm_sentences"
    assert fit_group(tmp_path) is None
    monkeypatch.setattr(interpret, "ActivationCache", lambda folder: SimpleNamespace(folder=folder))
    monkeypatch.setattr(interpret, "check_sae_reads", lambda *a, **k: None)  # the stand-in cache holds no vectors
    monkeypatch.setattr(interpret.InterpretSAE, "run", lambda self, *a, **k: SimpleNamespace(summary={"i/x": 1.0}))
    train.main(["interpret", "--sae", str(exported), "--cache", str(tmp_path / "cache"), "--wandb_project", "p"])
    (interpret_file,) = (exported / "interpret" / "wandb").glob("offline-run-*/run-*.wandb")
    (header,) = [r.run for r in read_records(interpret_file) if r.WhichOneof("record_type") == "run"]
    assert (header.run_group, header.job_type) == ("sae_minilm_sentences", "interpret")


def test_a_second_fit_in_one_process_starts_its_own_run(tmp_path, tiny_model, sample_data):
    """WandbLogger logs into an open ``wandb.run``: the run a first fit left open is finished when the next fit
    starts (a notebook or sweep loop), so each fit has its own run, complete on disk; a run the user opened with
    ``wandb.init`` is still the one a fit logs to."""
    import wandb

    for name in "abc":
        (tmp_path / name).mkdir()
    first = fit(tmp_path / "a", tiny_model, sample_data).trainer.loggers[0].experiment
    first_id, first_dir = first.id, Path(first.dir).parent
    second = fit(tmp_path / "b", tiny_model, sample_data).trainer.loggers[0].experiment
    assert second.id != first_id
    assert wandb.run is not None and wandb.run.id == second.id
    assert any(r.get("_step") is not None for r in logged_history(next(first_dir.glob("run-*.wandb"))))
    second.finish()

    mine = wandb.init(project="embedlab-test", dir=str(tmp_path), mode="offline")
    assert fit(tmp_path / "c", tiny_model, sample_data).trainer.loggers[0].experiment.id == mine.id
