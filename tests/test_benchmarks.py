"""The measuring parts of the benchmark scripts: MFU's FLOP formula, the activation-memory counter, run_all."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules import ContrastiveModule

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import grad_cache  # noqa: E402
import mfu  # noqa: E402
import run_all  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mfu_analytic_flops_equal_torch_flop_counter(tiny_model, attn):
    """6 P T + 12 n L d T + head + loss is exactly what FlopCounterMode counts for the SimCSE step."""
    module = ContrastiveModule(tiny_model, pooler="cls", mlp="train_only", max_length=16, attn_implementation=attn)
    B, L = 6, 16
    ids = torch.randint(5, 50, (B, 1, L))
    with FlopCounterMode(display=False) as counter:
        module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0).backward()
    flops = mfu.step_flops(module, B, L)
    assert flops["tokens"] == B * 2 * L
    assert flops["total"] == counter.get_total_flops()


def test_mfu_peak_table_matches_device_names():
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert mfu.peak_flops("NVIDIA H100 NVL") == 835.5e12
    assert mfu.peak_flops("NVIDIA H200") == 989.4e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB") == mfu.peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert mfu.peak_flops("Tesla T4") is None


def test_grad_cache_bounds_the_saved_activations_by_one_chunk(tiny_model):
    """The benchmark's memory measure, and GradCache's point: the peak of tensors saved for backward falls
    with the chunk size (a quarter of the rows, about a quarter of the bytes)."""
    module = ContrastiveModule(tiny_model, pooler="mean")
    ids = torch.randint(5, 50, (8, 1, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    peaks = {}
    for mini in (None, 2):
        module.mini_batch_size = mini
        saved = grad_cache.SavedTensorBytes(params)
        with saved.hooks():
            module.training_step(batch, 0).backward()
        assert saved.live == 0 and not saved.refs  # everything released after the backward
        peaks[mini] = saved.peak
    assert peaks[None] > 0 and 0.2 < peaks[2] / peaks[None] < 0.35


def test_run_all_collects_a_benchmark_into_the_machine_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "mcr2_step", "--threads", "1",
                                      "--results", str(tmp_path)])
    run_all.main()
    (summary_path,) = tmp_path.glob("*.json")
    summary = json.loads(summary_path.read_text())
    assert summary["machine_tag"] == summary_path.stem
    assert {"torch", "transformers", "pytorch_lightning"} <= set(summary["machine"]["versions"])
    assert summary["machine"]["cpu_count"] and summary["machine"]["device"]
    entry = summary["benchmarks"]["mcr2_step"]
    assert entry["status"] == "ok" and entry["result"]["results"]
    assert (tmp_path / summary_path.stem / "mcr2_step.json").is_file()
    table = (tmp_path / f"{summary_path.stem}.md").read_text()
    assert "| mcr2_step | ok |" in table


def test_every_registered_benchmark_script_exists():
    for name, bench in run_all.BENCHMARKS.items():
        assert (BENCHMARKS / bench.script).is_file(), name


def test_run_all_only_keeps_the_other_entries_of_the_same_size(tmp_path, monkeypatch):
    import socket

    tag = f"{run_all.slug(socket.gethostname())}-{run_all.slug(run_all.device_name())}"
    kept = {"status": "ok", "headline": "kept from before",
            "run": {"started": "2026-01-02T03:04:05+00:00", "threads": 2, "versions": {"torch": "2.0"}}}
    stale = {"status": "failed"}
    (tmp_path / f"{tag}.json").write_text(json.dumps(
        {"size": "small", "benchmarks": {"mfu": kept, "mcr2_step": stale, "contrastive_throughput": kept}}))
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "mcr2_step", "--threads", "1",
                                      "--results", str(tmp_path)])
    run_all.main()
    summary = json.loads((tmp_path / f"{tag}.json").read_text())
    assert list(summary["benchmarks"]) == ["contrastive_throughput", "mcr2_step", "mfu"]  # registry order
    assert summary["benchmarks"]["mfu"] == kept and summary["benchmarks"]["mcr2_step"]["status"] == "ok"
    table = (tmp_path / f"{tag}.md").read_text()
    assert "kept from before (earlier run 2026-01-02T03:04:05+00:00, threads 2, torch 2.0)" in table
    fresh = summary["benchmarks"]["mcr2_step"]["run"]
    assert fresh["started"] == summary["started"] and fresh["threads"] == 1
    assert [line for line in table.splitlines() if line.startswith("| mcr2_step")][0].endswith("ms |")  # no note
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "mcr2_step", "--threads", "1", "--size", "full",
                                      "--results", str(tmp_path)])
    run_all.main()  # another size: the small entries are not mixed in
    assert list(json.loads((tmp_path / f"{tag}.json").read_text())["benchmarks"]) == ["mcr2_step"]
