"""MTEBEvaluator: official task names on local data, logged value == a direct Spearman, no stale cache, rank 0
+ broadcast, W&B table, bad task names, and the configs/callbacks/mteb_sts.yaml extra config."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import spearmanr

from callbacks.mteb import MTEBEvaluator
from core.errors import DataError
from datamodules.sts import load_sts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def pairs_tsv(sample_data, tmp_path_factory) -> Path:
    """The sample STS pairs without the pairs of identical sentences: their cosines are 1 up to float noise,
    and two computations of the same number may order them differently."""
    rows = list(csv.reader((sample_data / "sts_dev.tsv").open(), delimiter="\t"))
    kept = [rows[0]] + [r for r in rows[1:] if r[0] != r[1]]
    out = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    out.write_text("\n".join("\t".join(r) for r in kept) + "\n")
    return out


@pytest.fixture(scope="module")
def data_root(pairs_tsv, tmp_path_factory) -> Path:
    """A folder in the STS-B and SICK layouts (datamodules/sts.py), filled with the project's synthetic
    pairs."""
    root = tmp_path_factory.mktemp("root")
    p = load_sts(str(pairs_tsv))
    rows = [
        ("main-captions", "MSRvid", "2012test", f"{i:04d}", f"{s:.3f}", a, b)
        for i, (a, b, s) in enumerate(zip(p.sentences1, p.sentences2, p.scores))
    ]
    (root / "stsb").mkdir()
    (root / "stsb" / "sts-test.csv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    (root / "stsb" / "sts-dev.csv").write_text("\n".join("\t".join(r) for r in rows[:30]) + "\n")
    (root / "sick").mkdir()
    thirds = {
        "SICK_train.txt": rows[:20],
        "SICK_trial.txt": rows[20:30],
        "SICK_test_annotated.txt": rows[30:],
    }
    for name, part in thirds.items():
        lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
        lines += [f"{r[3]}\t{r[5]}\t{r[6]}\t{1 + 0.8 * float(r[4]):.3f}\tNEUTRAL" for r in part]
        (root / "sick" / name).write_text("\n".join(lines) + "\n")
    return root


def direct_spearman(module, tsv: Path) -> float:
    """Spearman x 100 of cosine similarity, computed here from ``module.encode``."""
    p = load_sts(str(tsv))
    z = module.encode(p.sentences1 + p.sentences2)
    cos = F.cosine_similarity(z[: len(p)], z[len(p) :], dim=-1)
    return float(spearmanr(cos.double().numpy(), p.scores).statistic * 100)


@pytest.fixture
def module(tiny_model):
    from lightning_modules import ContrastiveModule

    torch.manual_seed(0)
    return ContrastiveModule(tiny_model, pooler="mean", max_length=16, lr=1e-2)


# ------------------------------------------------------------------------------------------------ data
def test_local_data_keeps_official_names_and_pairs(data_root, pairs_tsv):
    cb = MTEBEvaluator(["STSBenchmark", "SICK-R"], data_root=str(data_root))
    stsb, sick = cb.load_tasks()
    assert (stsb.metadata.name, sick.metadata.name) == ("STSBenchmark", "SICK-R")
    p = load_sts(str(pairs_tsv))
    assert stsb.dataset["test"]["sentence1"] == p.sentences1 and stsb.dataset["test"][
        "score"
    ] == pytest.approx(p.scores, abs=1e-3)
    # MTEB's SICK-R is train + trial + test together
    assert sick.dataset["test"]["sentence2"] == p.sentences2 and len(sick.dataset["test"]) == len(p)


def test_eval_splits_select_the_local_dev_split(data_root, module):
    cb = MTEBEvaluator(["STSBenchmark"], data_root=str(data_root), eval_splits=["validation"])
    (task,) = cb.load_tasks()
    assert list(task.dataset) == ["validation"] and len(task.dataset["validation"]) == 30  # stsb/sts-dev.csv
    scores, rows = cb.run(module, step=1)
    assert rows[0][2] == "validation" and "mteb/STSBenchmark" in scores


def test_unknown_task_and_missing_data():
    with pytest.raises(
        ValueError, match=r"unknown MTEB task 'STSBenchmarkk'; did you mean STSBenchmark.*STS12"
    ):
        MTEBEvaluator(["STSBenchmarkk"]).load_tasks()
    with pytest.raises(DataError, match=r"sts12-16/STS12 not found.*STS.input.<subset>.txt"):
        MTEBEvaluator(["STS12"], data_root="/nonexistent/root").load_tasks()
    with pytest.raises(ValueError, match="only STS tasks take local pairs"):
        MTEBEvaluator(
            ["Banking77Classification"], local_data={"Banking77Classification": "x.tsv"}
        ).load_tasks()


# ------------------------------------------------------------------------------------------- scores
def test_score_is_the_current_weights_not_a_cached_one(module, pairs_tsv):
    cb = MTEBEvaluator(["STSBenchmark"], local_data={"STSBenchmark": str(pairs_tsv)})
    first, rows = cb.run(module, step=5)
    assert first["mteb/STSBenchmark"] == pytest.approx(direct_spearman(module, pairs_tsv), abs=1e-6)
    assert rows[0][:4] == [5, "STSBenchmark", "test", "default"]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second, _ = cb.run(module, step=5)  # same model name and step: a result cache would return `first`
    assert second["mteb/STSBenchmark"] == pytest.approx(direct_spearman(module, pairs_tsv), abs=1e-6)
    assert abs(second["mteb/STSBenchmark"] - first["mteb/STSBenchmark"]) > 0.1


def test_fit_logs_every_n_steps_and_at_end(module, sample_data, data_root, pairs_tsv, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from datamodules import SentencesDataModule

    cb = MTEBEvaluator(["STSBenchmark"], every_n_steps=2, data_root=str(data_root))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=CSVLogger(tmp_path),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16))
    assert [step for step, _ in cb.history] == [2, 3]  # step 2, then the end (step 3)
    logged = list(csv.DictReader(Path(trainer.logger.log_dir, "metrics.csv").open()))
    values = {int(r["step"]): float(r["mteb/STSBenchmark"]) for r in logged if r.get("mteb/STSBenchmark")}
    assert values == pytest.approx(
        {2: cb.history[0][1]["mteb/STSBenchmark"], 3: cb.history[1][1]["mteb/STSBenchmark"]}
    )
    assert values[3] == pytest.approx(direct_spearman(module, pairs_tsv), abs=1e-6)
    assert float(trainer.callback_metrics["mteb/STSBenchmark"]) == pytest.approx(values[3], abs=1e-4)


# ------------------------------------------------------------------------------------ rank 0 + broadcast
class FakeStrategy:
    def __init__(self, from_rank0):
        self.from_rank0 = from_rank0
        self.sent = []

    def broadcast(self, obj, src=0):
        self.sent.append(obj)
        return self.from_rank0


def fake_trainer(rank: int, from_rank0) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=rank == 0,
        global_step=7,
        callback_metrics={},
        loggers=[],
        strategy=FakeStrategy(from_rank0),
    )


def test_only_rank0_evaluates_and_every_rank_gets_its_scores(monkeypatch):
    cb = MTEBEvaluator(["STSBenchmark"])
    calls = []
    monkeypatch.setattr(
        cb, "run", lambda module, step: calls.append(step) or ({"mteb/STSBenchmark": 12.5}, [])
    )
    rank0_payload = ("ok", {"mteb/STSBenchmark": 12.5}, [])
    other = fake_trainer(1, rank0_payload)
    assert cb.evaluate_and_log(other, None) == {"mteb/STSBenchmark": 12.5}
    assert calls == []  # rank 1 did not evaluate
    assert float(other.callback_metrics["mteb/STSBenchmark"]) == 12.5  # but can monitor the value
    zero = fake_trainer(0, rank0_payload)
    cb.evaluate_and_log(zero, None)
    assert calls == [7] and zero.strategy.sent == [rank0_payload]


def test_failure_on_rank0_raises_on_every_rank(monkeypatch):
    cb = MTEBEvaluator(["STSBenchmark"])

    def boom(module, step):
        raise OSError("dataset unreachable")

    monkeypatch.setattr(cb, "run", boom)
    zero = fake_trainer(0, ("error", "OSError: dataset unreachable", []))
    with pytest.raises(RuntimeError, match="failed on rank 0: OSError: dataset unreachable"):
        cb.evaluate_and_log(zero, None)
    assert zero.strategy.sent[0][0] == "error"  # rank 0 reached the broadcast before raising
    with pytest.raises(RuntimeError, match="dataset unreachable"):
        cb.evaluate_and_log(fake_trainer(1, ("error", "OSError: dataset unreachable", [])), None)


def test_setup_failure_stops_every_rank():
    cb = MTEBEvaluator(["NoSuchTask"])
    zero = fake_trainer(0, "ValueError: unknown MTEB task")
    with pytest.raises(ValueError, match="unknown MTEB task 'NoSuchTask'"):
        cb.setup(zero, None, "fit")
    assert zero.strategy.sent[0].startswith("ValueError: unknown MTEB task 'NoSuchTask'")  # told the others
    with pytest.raises(RuntimeError, match="could not load its tasks on rank 0: ValueError: unknown MTEB"):
        cb.setup(fake_trainer(1, "ValueError: unknown MTEB task"), None, "fit")


# ------------------------------------------------------------------------------------------------ W&B
def test_wandb_gets_the_metric_and_a_table(module, sample_data, pairs_tsv, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from datamodules import SentencesDataModule
    from tests.wandb_records import logged_history

    logger = WandbLogger(project="embedlab-test", save_dir=str(tmp_path))
    cb = MTEBEvaluator(["STSBenchmark"], every_n_steps=2, local_data={"STSBenchmark": str(pairs_tsv)})
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=logger,
        default_root_dir=tmp_path,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16))
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    history = logged_history(next(run_dir.glob("run-*.wandb")))
    metric_rows = [r for r in history if "mteb/STSBenchmark" in r]
    table_rows = [r for r in history if "mteb/results/_type" in r]
    score = cb.history[0][1]["mteb/STSBenchmark"]
    assert metric_rows[0]["mteb/STSBenchmark"] == pytest.approx(score)
    assert metric_rows[0]["trainer/global_step"] == 2
    assert [r["mteb/results/_type"] for r in table_rows] == ["table-file"]
    table = json.loads((run_dir / "files" / table_rows[0]["mteb/results/path"]).read_text())
    assert table["columns"] == ["step", "task", "split", "subset", "main_score", "scores"]
    assert table["data"][0][:5] == [2, "STSBenchmark", "test", "default", pytest.approx(score)]


# --------------------------------------------------------------------------------------------- config
def test_extra_config_appends_the_callback_and_runs(
    tmp_path, tiny_model, sample_data, data_root, monkeypatch
):
    import train

    monkeypatch.chdir(tmp_path)
    extra = yaml.safe_load((CONFIGS / "callbacks" / "mteb_sts.yaml").read_text())
    block = extra["trainer"]["callbacks+"][0]
    assert block["class_path"] == "callbacks.MTEBEvaluator"
    block["init_args"].update(data_root=str(data_root), every_n_steps=1)
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    base = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "callbacks": [{"class_path": "callbacks.Throughput"}],
        },
        "model": {
            "class_path": "lightning_modules.ContrastiveModule",
            "init_args": {"model_name_or_path": tiny_model, "pooler": "mean", "max_length": 16},
        },
        "data": {
            "class_path": "datamodules.SentencesDataModule",
            "init_args": {"source": str(sample_data / "sentences.txt"), "batch_size": 8},
        },
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cli = train.main(
        ["fit", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "extra.yaml")]
    )
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    # appended to the recipe's callbacks, not replacing them
    assert "Throughput" in names and "MTEBEvaluator" in names
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, MTEBEvaluator))
    assert [step for step, _ in cb.history] == [1, 2]
    assert set(cb.history[-1][1]) == {"mteb/STSBenchmark", "mteb/SICK-R"}


# ------------------------------------------------------------------------------------------ real DDP
def ddp_main(argv: list[str]) -> None:
    """Run as a script (``strategy="ddp"`` re-launches it): 2 CPU processes, 2 steps, one file per rank."""
    import json as json_
    import sys

    import pytorch_lightning as pl

    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule

    model_dir, sentences, tsv, out_dir = argv

    class CountingEvaluator(MTEBEvaluator):
        runs = 0

        def run(self, pl_module, step=0):
            self.runs += 1
            return super().run(pl_module, step)

    cb = CountingEvaluator(["STSBenchmark"], every_n_steps=1, local_data={"STSBenchmark": tsv})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        default_root_dir=out_dir,  # the run folder: the TaskResults go to <out_dir>/mteb
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = ContrastiveModule(model_dir, pooler="mean", max_length=16, lr=1e-2)
    trainer.fit(module, datamodule=SentencesDataModule(sentences, batch_size=8))
    result = {
        "runs": cb.runs,
        "history": cb.history,
        "monitored": float(trainer.callback_metrics["mteb/STSBenchmark"]),
    }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json_.dumps(result))
    sys.stdout.flush()


@pytest.mark.slow
def test_ddp_rank0_evaluates_and_both_ranks_monitor(tiny_model, sample_data, pairs_tsv, tmp_path):
    import subprocess
    import sys

    args = [tiny_model, str(sample_data / "sentences.txt"), str(pairs_tsv), str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, __file__, "--ddp", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["runs"], rank1["runs"]) == (2, 0)  # steps 1 and 2, on rank 0 only
    assert rank0["history"] == rank1["history"] and [s for s, _ in rank0["history"]] == [1, 2]
    stored = tmp_path / "mteb" / "results" / "embedlab__ContrastiveModule"
    assert sorted(p.parent.name for p in stored.glob("*/STSBenchmark.json")) == ["step1", "step2"]
    assert (
        rank0["monitored"]
        == rank1["monitored"]
        == pytest.approx(rank0["history"][-1][1]["mteb/STSBenchmark"])
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--ddp"]:
        ddp_main(sys.argv[2:])
