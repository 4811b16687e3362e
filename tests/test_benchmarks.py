"""The measuring parts of the benchmark scripts: MFU's FLOP formula, the activation-memory counter, run_all."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules import ContrastiveModule
from lightning_modules.components.batch_topk import BatchTopKSAE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import grad_cache  # noqa: E402
import mfu  # noqa: E402
import periodic_work  # noqa: E402
import run_all  # noqa: E402
import sae_throughput  # noqa: E402

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


@pytest.mark.parametrize("drift", [0.0, 0.004])
def test_periodic_work_charges_each_event_to_the_steps_it_lands_on(drift):
    """Steps of 0.1 s (or slowing down by 4 ms a step: the machine's drift) after a warm-up of 2; an evaluation at
    step 15 (+half a step on step 15), two saves at the end of step 28 (+0.3 and +0.2 of a step on steps 29 and 30,
    where the writer still runs), the final weights' evaluation 0.04 s after the last step and a save at its end (no
    step after it to charge); a save and an evaluation inside the warm-up. Each event is charged in the steps around
    it, drift or not."""
    extra = {15: 0.5, 29: 0.3, 30: 0.2}
    ends, t, local = [], 0.0, {}
    for step in range(1, 43):
        local[step] = 0.1 + drift * step
        t += local[step] * (1 + extra.get(step, 0.0)) + (0.5 if step == 1 else 0.0)  # warm-up: not counted
        ends.append(t)
    times = {"ends": ends, "train_end": ends[-1] + 0.04, "save_steps": [1, 28, 28, 42], "eval_steps": [0, 1, 15, 42],
             "eval_in_step": [1, 15]}
    got = periodic_work.attribute(times, warmup=2)
    baseline = sum(local[k] for k in range(3, 43))
    assert got["steps"] == 40 and got["baseline"] == pytest.approx(baseline)
    assert got["excess"] == pytest.approx(0.5 * local[15] + 0.3 * local[29] + 0.2 * local[30] + 0.04)
    assert got["seconds"] == pytest.approx(ends[-1] + 0.04 - ends[1])
    # best and last.ckpt at step 28 are one save step; the save at the last step has no step after it to charge
    assert (got["evaluations"], got["saves"], got["save_triggers"]) == (2, 3, 1)
    assert got["eval_extra_steps"] == pytest.approx(0.5)  # step 42's own time is an untouched step's
    # 0.3 + 0.2 of a step; under drift the two steps missing from the neighbours' window shift it by < 1 %
    assert got["save_extra_steps"] == pytest.approx(0.5, abs=0.005)
    with pytest.raises(ValueError, match="warmup"):
        periodic_work.attribute(times, warmup=0)


def test_periodic_work_charges_a_save_at_the_warm_ups_last_step_and_needs_an_untouched_step():
    """A save at the end of step 2 (the warm-up's last) slows steps 3 and 4: it is charged, though it is not one of
    the window's files; a window whose every step holds an event has no typical step to measure against."""
    took = {3: 0.13, 4: 0.12}
    ends = [sum(took.get(k, 0.1) for k in range(1, step + 1)) for step in range(1, 11)]
    times = {"ends": ends, "train_end": ends[-1], "save_steps": [2], "eval_steps": [], "eval_in_step": []}
    got = periodic_work.attribute(times, warmup=2)
    assert (got["saves"], got["save_triggers"]) == (0, 1)
    assert got["save_extra_steps"] == pytest.approx(0.5) and got["excess"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="every timed step holds"):
        periodic_work.attribute({**times, "eval_in_step": list(range(3, 11))}, warmup=2)


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


def test_gpu_summary_reads_each_target_from_its_step_and_marks_what_was_not_measured(tmp_path):
    import gpu_summary

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "device.txt").write_text("NVIDIA H200\n")
    (parts / "contrastive-large-fast.json").write_text(json.dumps({
        "batch_size": 512, "sentences_per_s": {"embedlab": 9000.0, "sentence-transformers": 5555.0},
        "speedup": {"sentence-transformers": {"min": 1.5, "median": 1.62, "max": 1.7}}}))
    (parts / "sae.json").write_text(json.dumps({"saelens": [{"num_latents": 16384, "aux": {"ratio": 1.8}}]}))
    (parts / "mfu.json").write_text(json.dumps({"peak_bf16_dense_tflops": 989.4, "results": [
        {"batch_size": 64, "achieved_tflops": 200.0, "mfu": 0.2}, {"batch_size": 512, "achieved_tflops": 400.0,
                                                                    "mfu": 0.404}]}))
    (parts / "status.tsv").write_text("pytest\tok\t80\nmfu\tok\t30\nsae\ttimed out (120 s)\t120\n")
    (parts / "pytest.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="0">'
                                      '<testcase classname="tests.test_gpu" name="test_a"><failure/></testcase>'
                                      '</testsuite></testsuites>')
    gpu_summary.main([str(parts), str(tmp_path / "dest")])
    summary = json.loads((tmp_path / "dest" / "gpu-nvidia-h200.json").read_text())
    met = {t["target"].split(",")[0]: (t["value"], t["met"]) for t in summary["targets"]}
    assert met["SimCSE step / sentence-transformers trainer"] == (None, None)  # batch 64 first: not run
    batch512 = [t for t in summary["targets"] if "batch 512, gpu_fast" in t["target"]][0]
    assert (batch512["value"], batch512["met"]) == (1.62, True)
    assert met["SAE step / SAELens step"] == (1.8, False)
    assert met["MFU of the SimCSE step"] == (0.404, False)
    assert met["activation caching / bare forward"] == (None, None)  # the sae step timed out
    assert summary["pytest"]["failed"] == ["tests.test_gpu::test_a"]
    table = (tmp_path / "dest" / "gpu-nvidia-h200.md").read_text()
    assert "| MFU of the SimCSE step, batch 512, bf16 | 0.40 | >= 0.45 | NO |" in table
    assert "| sae | timed out (120 s) | 120 |" in table and "not measured" in table


def test_device_wheels_keeps_the_requirements_that_apply_to_the_gpu_machine(tmp_path):
    import zipfile

    import device_wheels

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo-1.0.dist-info/METADATA", "\n".join([
            "Metadata-Version: 2.1", "Name: demo", "Version: 1.0",
            "Requires-Dist: always>=1", "Requires-Dist: old-python; python_version < '3.9'",
            "Requires-Dist: windows-only; sys_platform == 'win32'",
            "Requires-Dist: linux-only; sys_platform == 'linux'",
            "Requires-Dist: extra-dep; extra == 'signatures'", "Requires-Dist: other-extra; extra == 'docs'"]) + "\n")
    names = lambda extras: sorted(r.name for r in device_wheels.requirements(wheel, extras, "3.12"))  # noqa: E731
    assert names(set()) == ["always", "linux-only"]
    assert names({"signatures"}) == ["always", "extra-dep", "linux-only"]
    assert device_wheels.canonical("Typing_Extensions") == device_wheels.canonical("typing-extensions")


def test_sae_throughput_plain_reference_keeps_every_tensor_on_the_sae_device():
    """Its dead-latent counts once stayed on the CPU while the SAE ran on CUDA: a move to the meta device shows any
    tensor left behind."""
    sae = sae_throughput.start_sae(torch.randn(512, 16), 16, 4, 4, 64)
    plain = sae_throughput.PlainSAE(sae)
    assert int((plain.counts >= sae.cfg.dead_after).sum()) == 64 // 10  # the 10% dead latents it starts with
    plain.to("meta")
    assert {t.device.type for t in [*plain.parameters(), *plain.buffers()]} == {"meta"}
    assert plain.counts.device.type == "meta"  # a plain attribute would not be among the buffers


def test_sae_throughput_times_sae_lens_from_the_same_weights_and_inputs():
    """SAELens' step and ours start from the same SAE: with AuxK off, their first losses (the reconstruction error
    of the same batch top-k codes) are equal, so the benchmark compares like with like."""
    pytest.importorskip("sae_lens", reason="needs sae-lens: pip install -e '.[peers]'")
    x = torch.randn(512, 16) * 3 + 1
    start = sae_throughput.start_sae(x, 16, 4, 4, 64)
    ours = BatchTopKSAE(dataclasses.replace(start.cfg, aux_coef=0.0))
    ours.load_state_dict(start.state_dict())
    loss_ours = sae_throughput.our_step(ours.train(), x[:64], torch.optim.Adam(ours.parameters(), lr=1e-3))
    theirs = sae_throughput.SAELensStep(start, aux=False, lr=1e-3, batch=64, device=torch.device("cpu"))
    torch.testing.assert_close(theirs(x[:64]), loss_ours, rtol=1e-5, atol=1e-6)
    held = theirs.held_dead
    assert int(held.sum()) == start.num_latents // 10  # the 10% dead latents the benchmark starts with
    # after the step exactly the held-dead latents that did not fire count as dead (those that fired are revived)
    assert torch.equal(theirs.since_fired > theirs.window, held & (theirs.since_fired != 0))


def test_contrastive_quality_counts_repeats_across_rows_and_summarises_over_seeds(tmp_path, tiny_model):
    import contrastive_quality as cq

    from datamodules import NLIDataModule
    from lightning_modules import ContrastiveModule

    # premise "p0" in three rows, "p1" in two, and one row whose anchor is its own positive (not a false negative)
    rows = ["sent0,sent1,hard_neg", "p0,e0,c0", "p0,e1,c1", "p0,e2,c2", "p1,e3,c3", "p1,e4,c4", "q,q,c5"]
    (tmp_path / "nli.csv").write_text("\n".join(rows) + "\n")
    module = ContrastiveModule(tiny_model, pooler="mean")
    kw = dict(batch_size=6, shuffle=True, seed=0, drop_last=True)
    plain = cq.duplicates_in_batches(NLIDataModule(str(tmp_path / "nli.csv"), no_duplicates=False, **kw), module)
    # one batch of all 6 rows: p0 twice more, p1 once more; q inside its own row is not counted
    assert plain == {"batches": 1, "batches_with_a_repeat": 1, "repeated_texts_per_batch_mean": 3.0,
                     "repeated_texts_per_batch_max": 3, "rows_trained": 6, "rows": 6}
    kw["batch_size"] = 2
    free = cq.duplicates_in_batches(NLIDataModule(str(tmp_path / "nli.csv"), no_duplicates=True, **kw), module)
    assert free["batches_with_a_repeat"] == 0 and free["batches"] == 3

    runs = [{"variant": "plain", "seed": s, "scores": {"stsb_test": {"32": x}}} for s, x in enumerate([70.0, 72.0])]
    s = cq.summarise(runs)["plain"]["stsb_test"]["32"]
    assert (s["mean"], s["min"], s["max"], s["n"]) == (71.0, 70.0, 72.0, 2) and abs(s["std"] - 2 ** 0.5) < 1e-9
    row = "| plain | stsb_test | 32 | 71.00 ± 1.41 (70.00-72.00, n=2) | - |"
    assert row in cq.table({"summary": cq.summarise(runs)})


def test_benchmark_sts_scorers_give_the_project_sts_score(tmp_path, tiny_model, sample_data):
    """contrastive_quality's and hncse_compare's STS scores are core.metrics.sts_spearman of the same embeddings."""
    import contrastive_quality as cq
    import hncse_compare as hc

    from core.metrics import sts_spearman
    from datamodules.sts import load_sts

    tsv = str(sample_data / "sts_dev.tsv")
    pairs = load_sts(tsv)
    rows = [("main-captions", "MSRvid", "2012test", f"{i:04d}", f"{s:.3f}", a, b)
            for i, (a, b, s) in enumerate(zip(pairs.sentences1, pairs.sentences2, pairs.scores))]
    (tmp_path / "stsb").mkdir()
    # test: the pairs in reverse with the scores kept in place, so a scorer that read one split for the other fails
    split_rows = {"dev": rows, "test": [(*r[:4], s[4], *r[5:]) for r, s in zip(rows[::-1], rows)]}
    for split, split_rows_ in split_rows.items():
        (tmp_path / "stsb" / f"sts-{split}.csv").write_text("\n".join("\t".join(r) for r in split_rows_) + "\n")
    module = ContrastiveModule(tiny_model, pooler="mean", max_length=16)
    module.eval()

    def want(p, dims=None) -> float:  # from the pairs' own sentences, not the scorer's index of them
        with torch.no_grad():
            return sts_spearman(module.encode(list(p.sentences1)), module.encode(list(p.sentences2)), p.scores, dims)

    quality = cq.Scorer(None, module.encoder, [(tsv, "dev")])
    p = quality.pairs[f"{tsv}_dev"]
    assert quality(module, [8, None]) == {f"{tsv}_dev": {"8": pytest.approx(want(p, [8]), abs=1e-4),
                                                        "32": pytest.approx(want(p), abs=1e-4)}}
    compare = hc.STSBScorer(str(tmp_path), module.encoder, max_pairs=40)
    scores = compare(module)
    assert scores == {s: pytest.approx(want(p), abs=1e-4) for s, p in compare.splits.items()}
    assert len(compare.splits["dev"]) == 40 and abs(scores["dev"] - scores["test"]) > 1
    assert (compare.splits["dev"].sentences1[0], compare.splits["test"].sentences1[0]) == (pairs.sentences1[0],
                                                                                          pairs.sentences1[-1])
