"""Gather what benchmarks/gpu_check.sh measured into one JSON and one markdown table, against the GPU targets.

    python benchmarks/gpu_summary.py PARTS_DIR DEST_DIR

PARTS_DIR holds each step's JSON (``<step>.json``), ``status.tsv`` (step, status, seconds) and ``pytest.xml``;
DEST_DIR receives ``gpu-<device>.json`` and ``gpu-<device>.md``. Steps not run (yet) read "not measured", so the
check can call this after every step and a timeout still leaves a summary of what was done.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _speedup(r: dict) -> float:
    """How many times faster embedlab's step is than the sentence-transformers trainer's (median of the rounds)."""
    return r["speedup"]["sentence-transformers"]["median"]


def _saelens(r: dict) -> float:
    """Our SAE step's speed over SAELens' at 16k latents, with AuxK (the training setting)."""
    return next(x["aux"]["ratio"] for x in r["saelens"] if x["num_latents"] == 16384)


# (what, step, how to read the figure from its JSON, target, comparison): the targets of the GPU speed issue,
# BERT-base shapes at max length 32
TARGETS = [
    ("SimCSE step / sentence-transformers trainer, batch 64, gpu_fast", "contrastive-small-fast", _speedup, 1.5, ">="),
    ("SimCSE step / sentence-transformers trainer, batch 512, gpu_fast", "contrastive-large-fast", _speedup, 1.5,
     ">="),
    ("SimCSE step / sentence-transformers trainer, batch 64, no switches", "contrastive-small", _speedup, 1.0, ">="),
    ("SimCSE step / sentence-transformers trainer, batch 512, no switches", "contrastive-large", _speedup, 1.0, ">="),
    ("encode / SentenceTransformer.encode, same precision and batch", "encode",
     lambda r: r["ratio_embedlab_over_st"], 1.3, ">="),
    ("MFU of the SimCSE step, batch 512, bf16", "mfu", lambda r: next(
        x["mfu"] for x in r["results"] if x["batch_size"] == 512), 0.45, ">="),
    ("SAE step / SAELens step, 16k latents, AuxK on", "sae", _saelens, 2.0, ">="),
    ("SAE step, 16k latents: fraction of the W_enc + W_dec bandwidth bound", "sae",
     lambda r: r["sae"][0]["fraction_of_bound"], 0.5, ">="),
    ("activation caching / bare forward", "sae", lambda r: r["cache"]["ratio"], 0.9, ">="),
]


def load(parts: Path, step: str) -> dict | None:
    path = parts / f"{step}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pytest_counts(parts: Path) -> dict | None:
    try:
        suite = ET.parse(parts / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def figures(parts: Path) -> list[dict]:
    """The throughput rows of the table: every contrastive setting, MFU per batch, switches, encode, SAE, cache."""
    rows = []
    for size in ("small", "large"):
        for fast in (False, True):
            r = load(parts, f"contrastive-{size}{'-fast' if fast else ''}")
            for side in ("sentence-transformers", "lightning"):
                if r and side in r.get("speedup", {}):
                    rows.append({"what": f"SimCSE vs {'ST trainer' if side != 'lightning' else 'minimal Lightning'}"
                                         f", batch {r['batch_size']}{' + gpu_fast' if fast else ''}",
                                 "embedlab": r["sentences_per_s"]["embedlab"],
                                 "reference": r["sentences_per_s"][side], "unit": "sentences/s (median round)",
                                 "ratio": r["speedup"][side]["median"]})
    if r := load(parts, "mfu"):
        for x in r["results"]:
            rows.append({"what": f"MFU, batch {x['batch_size']}", "embedlab": x["achieved_tflops"],
                         "reference": r.get("peak_bf16_dense_tflops"), "unit": "TFLOP/s (vs bf16 peak)",
                         "ratio": x["mfu"]})
            for part, ms in x.get("profile_ms_per_step", {}).items():
                if part not in ("busy", "wall"):  # where the step's time goes: each part's share of the wall time
                    rows.append({"what": f"batch {x['batch_size']} step: {part.replace('_', ' ')}", "embedlab": ms,
                                 "reference": x["profile_ms_per_step"]["wall"], "unit": "ms of the step's wall ms",
                                 "ratio": ms / x["profile_ms_per_step"]["wall"]})
    if r := load(parts, "switches"):
        for k, v in r["ratio_to_baseline"].items():
            if k != "baseline":
                rows.append({"what": f"switch {k} alone" if k != "all" else "all switches",
                             "embedlab": max(r["sentences_per_s"][k]),
                             "reference": max(r["sentences_per_s"]["baseline"]), "unit": "sentences/s (vs baseline)",
                             "ratio": v})
    if r := load(parts, "encode"):
        med = r["median_sentences_per_s"]
        rows.append({"what": "encode vs SentenceTransformer.encode", "embedlab": med["embedlab"],
                     "reference": med["sentence-transformers"], "unit": "sentences/s",
                     "ratio": r["ratio_embedlab_over_st"]})
    if r := load(parts, "sae"):
        for s in r.get("sae", []):
            rows.append({"what": f"SAE step F={s['num_latents']} k={s['k']} vs plain", "embedlab":
                         s["vectors_per_s"]["ours"], "reference": s["vectors_per_s"]["plain"], "unit": "vectors/s",
                         "ratio": s["ratio"]})
            if "bandwidth_bound_vectors_per_s" in s:
                rows.append({"what": f"SAE step F={s['num_latents']} vs bandwidth bound", "embedlab":
                             s["vectors_per_s"]["ours"], "reference": s["bandwidth_bound_vectors_per_s"],
                             "unit": "vectors/s", "ratio": s["fraction_of_bound"]})
        if "cache" in r:
            c = r["cache"]
            rows.append({"what": "activation caching vs bare forward", "embedlab": c["vectors_per_s"]["cache"],
                         "reference": c["vectors_per_s"]["bare_forward"], "unit": "vectors/s", "ratio": c["ratio"]})
    return rows


def targets(parts: Path) -> list[dict]:
    out = []
    for what, step, read, target, op in TARGETS:
        r = load(parts, step)
        try:
            value = read(r) if r else None
        except (KeyError, IndexError, StopIteration, TypeError):
            value = None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"target": what, "value": value, "goal": f"{op} {target}", "met": met})
    return out


def status(parts: Path) -> list[dict]:
    try:
        lines = (parts / "status.tsv").read_text().splitlines()
    except OSError:
        return []
    return [dict(zip(("step", "status", "seconds"), line.split("\t"))) for line in lines if line]


def device_slug(parts: Path) -> str:
    name = (parts / "device.txt").read_text().strip() if (parts / "device.txt").exists() else "unknown"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(summary: dict) -> str:
    fmt = lambda v, d=2: "not measured" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# GPU check on {summary['device']}", ""]
    t = summary["pytest"]
    lines.append("pytest -m gpu: not run" if t is None else
                 f"pytest -m gpu: {t['tests']} tests, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
                 + (f" (failed: {', '.join(t['failed'])})" if t["failed"] else ""))
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for x in summary["targets"]:
        met = "-" if x["met"] is None else ("yes" if x["met"] else "NO")
        lines.append(f"| {x['target']} | {fmt(x['value'])} | {x['goal']} | {met} |")
    lines += ["", "| measurement | embedlab | reference | unit | ratio |", "|---|---|---|---|---|"]
    for x in summary["figures"]:
        lines.append(f"| {x['what']} | {fmt(x['embedlab'], 1)} | {fmt(x['reference'], 1)} | {x['unit']} | "
                     f"{fmt(x['ratio'], 3)} |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parts, dest = Path(argv[0]), Path(argv[1])
    summary = {"device": (parts / "device.txt").read_text().strip() if (parts / "device.txt").exists() else "?",
               "pytest": pytest_counts(parts), "targets": targets(parts), "figures": figures(parts),
               "steps": status(parts), "raw": {p.stem: load(parts, p.stem) for p in sorted(parts.glob("*.json"))}}
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{device_slug(parts)}"
    (dest / f"{stem}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (dest / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
