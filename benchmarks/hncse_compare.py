"""SimCSE vs HNCSE-PM vs HNCSE-HNM from all-MiniLM-L6-v2: STS-B dev/test Spearman over seeds, and step time.

    nice -n 10 python benchmarks/hncse_compare.py                    # 3 seeds x 3 variants, 1 epoch each
    nice -n 10 python benchmarks/hncse_compare.py --max_steps 40     # fewer steps per run on a busy machine
    python benchmarks/hncse_compare.py --skip_training               # only the step-time ratios

Identical settings for every variant (only the candidate builder differs, each with its defaults, as in
configs/hncse_*_bert_base.yaml): the offline all-MiniLM-L6-v2, mean pooling and no MLP head (MiniLM was trained
with mean pooling), max_length 32, temperature 0.05, AdamW lr 3e-5 without warmup, linear decay over the run,
batch 64, shuffled, on ``<data_root>/wiki/wiki1m_for_simcse.head.txt`` (11,914 sentences: 186 steps per epoch),
float32 on CPU. Each run is seeded with ``seed_everything(seed)`` before the model is built. The final weights
are scored (no checkpoint selection): Spearman x 100 of cosine similarity vs gold on STS-B dev and test
(``load_sts('stsb', split, data_root)``), encoded without dropout at max_length 32.

Step time: one process, one model; for each of ``--timing_batches`` batches of 64 wiki sentences, one full
training step (both dropout views, builder, loss, backward, AdamW) of every variant, in an order that rotates
from batch to batch, so machine noise hits all alike. Reported: median step seconds per variant and the median
over batches of (variant step / SimCSE step on the same batch); also the builder + loss + its backward alone on
fixed embeddings (milliseconds, variants interleaved), which is the whole extra cost of a variant, and the step
ratio it implies (1 + extra milliseconds / SimCSE step), less noisy than the ratio of full steps.

Writes ``benchmarks/results/hncse_compare.json`` after every run; a rerun with the same settings skips the
runs already there (so an interrupted benchmark resumes). Prints a table at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from core.metrics import SentenceIndex  # noqa: E402
from datamodules import SentencesDataModule, STSPairs, load_sts  # noqa: E402
from lightning_modules import ContrastiveModule  # noqa: E402
from lightning_modules.losses import (  # noqa: E402
    CandidateBuilder,
    Candidates,
    HardNegativeMixing,
    InBatchNegatives,
    PositiveMixing,
    Views,
    info_nce,
)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WIKI = "wiki/wiki1m_for_simcse.head.txt"
VARIANTS = {"simcse": InBatchNegatives, "hncse_pm": PositiveMixing, "hncse_hnm": HardNegativeMixing}
OUT = ROOT / "benchmarks" / "results" / "hncse_compare.json"


class Diagnosed(CandidateBuilder):
    """Wraps a builder and records, per step, the mean cosine of each anchor with its positive and with its
    hardest in-batch negative, and for HNCSE-PM how many rows fell in each of its three cases."""

    def __init__(self, inner: CandidateBuilder) -> None:
        self.inner = inner
        self.positive_cos: list[float] = []
        self.hardest_cos: list[float] = []
        self.pm_cases = [0, 0, 0]

    def __call__(self, views: Views, temperature: float) -> Candidates:
        with torch.no_grad():
            cos_GG = F.normalize(views.anchors_GD, dim=-1) @ F.normalize(views.positives_GD, dim=-1).T
            self.positive_cos.append(cos_GG.diagonal().mean().item())
            G = cos_GG.shape[0]
            eye = torch.eye(G, dtype=torch.bool, device=cos_GG.device)
            self.hardest_cos.append(cos_GG.masked_fill(eye, -2.0).max(dim=1).values.mean().item())
            if isinstance(self.inner, PositiveMixing):
                counts = torch.bincount(self.inner.cases(views, temperature), minlength=4)[1:]
                self.pm_cases = [a + int(b) for a, b in zip(self.pm_cases, counts.tolist())]
        return self.inner(views, temperature)


class STSBScorer:
    """STS-B dev and test, each distinct sentence tokenised once and encoded once per evaluation."""

    def __init__(self, data_root: str, encoder, max_pairs: int | None) -> None:
        self.splits = {s: load_sts("stsb", s, data_root) for s in ("dev", "test")}
        if max_pairs:
            self.splits = {s: STSPairs(p.name, p.sentences1[:max_pairs], p.sentences2[:max_pairs],
                                       p.scores[:max_pairs]) for s, p in self.splits.items()}
        self.sentences = SentenceIndex(self.splits.values())
        self.ids = encoder.tokenize(self.sentences.sentences)

    def __call__(self, module: ContrastiveModule) -> dict[str, float]:
        z_ND = module.encoder.encode_ids(self.ids, batch_size=128)
        return {split: self.sentences.score(z_ND, pairs) for split, pairs in self.splits.items()}


def new_module(variant: str, args) -> ContrastiveModule:
    return ContrastiveModule(MODEL, pooler="mean", mlp="none", max_length=args.max_length, temperature=0.05,
                             lr=args.lr, candidates=VARIANTS[variant]())


def weights_digest(module: ContrastiveModule) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_run(variant: str, seed: int, args, scorer: STSBScorer, known: dict[str, dict]) -> dict:
    pl.seed_everything(seed, verbose=False)
    module = new_module(variant, args)
    diag = Diagnosed(module.candidates)
    module.candidates = diag
    data = SentencesDataModule(WIKI, data_root=args.data_root, batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1,
                         max_steps=args.max_steps or -1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, data)
    train_seconds = time.perf_counter() - start
    module.candidates = diag.inner
    digest = weights_digest(module)
    reused = known.get(digest)  # bitwise-identical weights (e.g. PM never left case 3): identical scores
    scores = reused if reused is not None else scorer(module)
    known[digest] = scores
    run = {"variant": variant, "seed": seed, "steps": trainer.global_step, "train_seconds": round(train_seconds, 1),
           "dev": scores["dev"], "test": scores["test"], "weights_sha256": digest,
           "scores_reused_from_identical_weights": reused is not None,
           "final_train_loss": float(trainer.callback_metrics["train/loss"]),
           "mean_positive_cos": statistics.fmean(diag.positive_cos),
           "mean_hardest_negative_cos": statistics.fmean(diag.hardest_cos)}
    if variant == "hncse_pm":
        total = sum(diag.pm_cases)
        run["pm_case_fractions"] = {f"case{i + 1}": c / total for i, c in enumerate(diag.pm_cases)}
    return run


def time_steps(args) -> dict:
    """Full training steps of every variant on the same batches, alternating (see the module docstring)."""
    pl.seed_everything(0, verbose=False)
    module = new_module("simcse", args)
    builders = {name: cls() for name, cls in VARIANTS.items()}
    data = SentencesDataModule(WIKI, data_root=args.data_root, batch_size=args.batch_size, shuffle=False)
    data.connect(module.encoder.tokenizer, args.max_length)
    loader = iter(data.train_dataloader())
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr)
    names = list(builders)
    step_s = {n: [] for n in names}
    loss_ms = {n: [] for n in names}
    for b in range(args.timing_batches + 1):  # batch 0 warms up and is not counted
        batch = next(loader)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        order = names[b % len(names):] + names[: b % len(names)]
        for name in order:
            start = time.perf_counter()
            z_BVD = module.embed_views(ids, mask)
            loss = info_nce(builders[name](Views(z_BVD[:, 0], z_BVD[:, 1], None, 0, ids.shape[0]), 0.05), 0.05)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if b:
                step_s[name].append(time.perf_counter() - start)
        # the variant's own work alone: builder + loss + backward on fixed embeddings, variants interleaved
        z1, z2 = (z_BVD[:, v].detach().clone().requires_grad_() for v in (0, 1))
        for _ in range(args.loss_reps):
            for name in order:
                start = time.perf_counter()
                info_nce(builders[name](Views(z1, z2, None, 0, z1.shape[0]), 0.05), 0.05).backward()
                if b:
                    loss_ms[name].append((time.perf_counter() - start) * 1000)
    ref = step_s["simcse"]
    return {
        "batches": args.timing_batches,
        "median_step_s": {n: statistics.median(v) for n, v in step_s.items()},
        "step_ratio_vs_simcse_median": {n: statistics.median(x / r for x, r in zip(v, ref))
                                        for n, v in step_s.items()},
        "step_ratio_vs_simcse_per_batch": {n: [round(x / r, 4) for x, r in zip(v, ref)] for n, v in step_s.items()},
        "builder_loss_backward_ms_median": {n: statistics.median(v) for n, v in loss_ms.items()},
        # 1 + (extra builder/loss time) / (SimCSE step): the step ratio implied by the isolated measurement
        "step_ratio_implied_by_builder_ms": {
            n: 1 + (statistics.median(v) - statistics.median(loss_ms["simcse"])) / 1000 / statistics.median(ref)
            for n, v in loss_ms.items()},
    }


def summarise(runs: list[dict]) -> dict:
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        out[variant] = {"seeds": [r["seed"] for r in mine]}
        for split in ("dev", "test"):
            xs = [r[split] for r in mine]
            out[variant][split] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                   "min": min(xs), "max": max(xs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max_steps", type=int, default=None, help="steps per run; default one epoch (186)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--timing_batches", type=int, default=8)
    ap.add_argument("--loss_reps", type=int, default=10, help="isolated builder+loss timings per batch")
    ap.add_argument("--skip_training", action="store_true")
    ap.add_argument("--skip_timing", action="store_true")
    ap.add_argument("--max_pairs", type=int, default=None, help="score only the first N STS-B pairs (smoke tests)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not (Path(args.data_root) / WIKI).exists():
        sys.exit(f"needs {Path(args.data_root) / WIKI} (../shared/data beside the checkout); set --data_root")

    settings = {"model": MODEL, "pooler": "mean", "mlp": "none", "data": WIKI, "batch_size": args.batch_size,
                "max_length": args.max_length, "lr": args.lr, "temperature": 0.05, "max_steps": args.max_steps,
                "max_pairs": args.max_pairs,
                "builders": {n: repr(cls()) for n, cls in VARIANTS.items()}}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("settings") != settings:
        result = {}
    result.setdefault("commands", []).append(" ".join(["python", *sys.argv]))  # every (resumed) invocation
    result.update({"benchmark": "hncse_compare", "settings": settings,
                   "machine": {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                               "load_average_at_start": os.getloadavg()},
                   "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                                "python": platform.python_version()}})
    result.setdefault("runs", [])

    def save() -> None:
        write_json(out, result)

    if not args.skip_timing:
        result["timing"] = time_steps(args)
        save()
        print("timing:", json.dumps(result["timing"]["step_ratio_vs_simcse_median"]), flush=True)
    if not args.skip_training:
        scorer = None
        if "baseline" not in result:
            module = new_module("simcse", args)
            scorer = STSBScorer(args.data_root, module.encoder, args.max_pairs)
            result["baseline"] = scorer(module)  # all-MiniLM-L6-v2 before any training
            save()
        known = {r["weights_sha256"]: {"dev": r["dev"], "test": r["test"]} for r in result["runs"]}
        for seed in args.seeds:
            for variant in VARIANTS:
                if any(r["variant"] == variant and r["seed"] == seed for r in result["runs"]):
                    continue
                if scorer is None:
                    scorer = STSBScorer(args.data_root, new_module("simcse", args).encoder, args.max_pairs)
                run = train_run(variant, seed, args, scorer, known)
                result["runs"].append(run)
                result["summary"] = summarise(result["runs"])
                result["machine"]["load_average_at_end"] = os.getloadavg()
                save()
                print(json.dumps(run), flush=True)

    lines = ["| variant | seeds | STS-B dev (mean ± std, min-max) | STS-B test (mean ± std, min-max) | "
             "step / SimCSE step (full; implied) | builder+loss+bwd ms |", "|---|---|---|---|---|---|"]
    timing = result.get("timing", {})
    if "baseline" in result:
        b = result["baseline"]
        lines.append(f"| MiniLM, untrained | - | {b['dev']:.2f} | {b['test']:.2f} | - | - |")
    for variant in VARIANTS:
        s = result.get("summary", {}).get(variant)
        cells = [f"{s[x]['mean']:.2f} ± {s[x]['std']:.2f} ({s[x]['min']:.2f}-{s[x]['max']:.2f})"
                 for x in ("dev", "test")] if s else ["-", "-"]
        ratio = timing.get("step_ratio_vs_simcse_median", {}).get(variant)
        implied = timing.get("step_ratio_implied_by_builder_ms", {}).get(variant)
        ms = timing.get("builder_loss_backward_ms_median", {}).get(variant)
        step = "-" if ratio is None else f"{ratio:.3f} (implied {implied:.3f})"
        lines.append(f"| {variant} | {len(s['seeds']) if s else 0} | {cells[0]} | {cells[1]} | {step} | "
                     f"{'-' if ms is None else f'{ms:.2f}'} |")
    print("\n".join(lines) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
