"""Step time of MCR2 projection-head training (MCR2Module's step with its teacher cache on), per grouping and K.

    python benchmarks/mcr2_step.py [--batch 1000] [--dims 32 128] [--steps 10] [--threads 0] [--out F]

With ``cache_teacher`` (the default) a step never runs the teacher: it looks up the batch's cached teacher
embeddings, applies the ProjectionHead, computes ``mcr2_loss`` (coding rate of the batch, grouped coding rate,
log-determinants by Cholesky in float32) and its backward, and takes an AdamW step. This times exactly that on
Gaussian stand-ins for teacher embeddings (D = 384, all-MiniLM-L6-v2's size; the cost does not depend on their
values), for ``pairs`` grouping (m/2 groups of 2) and ``kmeans``-style grouping (32 groups of uneven sizes).
Writes JSON (default benchmarks/results/mcr2_step-<device>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_threads, parse, write_json  # noqa: E402

from lightning_modules.components.heads import ProjectionHead  # noqa: E402
from lightning_modules.losses.mcr2 import mcr2_loss  # noqa: E402


def time_steps(teacher_ND: torch.Tensor, groups, out_dim: int, steps: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    head = ProjectionHead(teacher_ND.shape[1], out_dim).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):  # step 0 warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = mcr2_loss(head(teacher_ND), groups, eps2=0.5)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1000, help="sentences per batch (m)")
    ap.add_argument("--in_dim", type=int, default=384)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 128], help="K, the compressed sizes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    add_threads(ap)
    args = parse(ap)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    teacher_ND = torch.randn(args.batch, args.in_dim, generator=g).to(device)
    # pairs: rows 2i, 2i + 1 form a group; kmeans-like: 32 groups with Zipf-ish sizes
    clusters = torch.multinomial(1.0 / torch.arange(1, 33).float(), args.batch, replacement=True, generator=g)
    groupings = {"pairs": 2, "kmeans32": clusters.to(device)}
    rows = []
    for name, groups in groupings.items():
        for k in args.dims:
            times = time_steps(teacher_ND, groups, k, args.steps, device)
            rows.append({"grouping": name, "out_dim": k, "median_step_ms": statistics.median(times) * 1000,
                         "step_ms": [t * 1000 for t in times]})
    result = {"benchmark": "mcr2_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "batch": args.batch, "in_dim": args.in_dim,
              "steps": args.steps, "results": rows,
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"mcr2_step-{device.type}.json", result)
    print("| grouping | K | step ms (median) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['grouping']} | {r['out_dim']} | {r['median_step_ms']:.1f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
