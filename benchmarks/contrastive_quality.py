"""What Matryoshka prefixes, duplicate-free batches and mined hard negatives do to a MiniLM's STS scores.

    nice -n 10 python benchmarks/contrastive_quality.py matryoshka   # (a) 3 seeds x {plain, matryoshka}
    nice -n 10 python benchmarks/contrastive_quality.py supervised   # (b) 3 seeds x {duplicates, no_duplicates}
    python benchmarks/contrastive_quality.py supervised --mined runs/mined/nli_mined.csv   # (c) needs the mined file:
        python train.py mine --model <all-MiniLM-L6-v2 folder> --pairs ../shared/data/nli/snli_devtest_for_simcse.csv \
            --output runs/mined/nli_mined.csv --range_min 10 --max_score 0.8 --relative_margin 0.05

Every run starts from the offline all-MiniLM-L6-v2 with mean pooling and no MLP head (as it was trained), max_length
32, temperature 0.05, AdamW without warmup and a linear decay over the run, float32 on CPU, one epoch, seeded with
``seed_everything(seed)`` before the model is built. The final weights are scored (no checkpoint selection):
Spearman x 100 of cosine similarity on STS-B dev and test (and SICK-R test in (a)), encoded without dropout.

(a) ``matryoshka``: unsupervised SimCSE on ``wiki/wiki1m_for_simcse.head.txt`` (11,914 sentences, batch 64, lr 3e-5,
186 steps), plain vs ``matryoshka_dims = [32, 64, 128, 256, 384]`` (weights 1). Both are scored at each of those
sizes; the plain run at k dims is the plain model truncated to its first k dims (cosine of the prefixes).

(b) and (c) ``supervised``: supervised SimCSE on ``nli/snli_devtest_for_simcse.csv`` (6,503 SNLI triplets, batch
512, lr 5e-5 as SimCSE's supervised recipe, 12 steps), with the batches as a plain shuffle (``no_duplicates``
off), duplicate-free (on), and on the same pairs with mined hard negatives in place of the dataset's own (``--mined``,
duplicate-free too). For the two samplers it also counts, over the epoch's actual batches, the texts that occur
more than once in a batch (anchor, positive or hard negative).

Writes ``benchmarks/results/contrastive_quality_<experiment>.json`` after every run; a rerun with the same settings
skips the runs already there. Prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from core.metrics import SentenceIndex  # noqa: E402
from datamodules import NLIDataModule, SentencesDataModule, load_sts  # noqa: E402
from datamodules.no_duplicates import repeats_per_batch  # noqa: E402
from lightning_modules import ContrastiveModule  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WIKI = "wiki/wiki1m_for_simcse.head.txt"
NLI = "nli/snli_devtest_for_simcse.csv"
DIMS = [32, 64, 128, 256, 384]
EXPERIMENTS = {
    "matryoshka": {"data": WIKI, "batch_size": 64, "lr": 3e-5, "variants": ["plain", "matryoshka"],
                   "splits": [("stsb", "dev"), ("stsb", "test"), ("sickr", "test")]},
    "supervised": {"data": NLI, "batch_size": 512, "lr": 5e-5, "variants": ["duplicates", "no_duplicates", "mined"],
                   "splits": [("stsb", "dev"), ("stsb", "test")]},
}


class Scorer:
    """STS splits (STS-B dev/test, SICK-R test): each distinct sentence tokenised once and encoded once per model."""

    def __init__(self, data_root: str, encoder, splits: list[tuple[str, str]]) -> None:
        self.pairs = {f"{task}_{split}": load_sts(task, split, data_root) for task, split in splits}
        self.sentences = SentenceIndex(self.pairs.values())
        self.ids = encoder.tokenize(self.sentences.sentences)

    def __call__(self, module: ContrastiveModule, dims: list[int | None]) -> dict[str, dict[str, float]]:
        """{split: {dims: Spearman x 100}} with the cosine of the first ``dims`` dims (None: all)."""
        module.eval()
        z_ND = module.encoder.encode_ids(self.ids, batch_size=128)
        return {name: {str(k or z_ND.shape[1]): self.sentences.score(z_ND, p, [k]) for k in dims}
                for name, p in self.pairs.items()}


def new_module(variant: str, lr: float) -> ContrastiveModule:
    dims = DIMS if variant == "matryoshka" else None
    return ContrastiveModule(MODEL, pooler="mean", mlp="none", max_length=32, temperature=0.05, lr=lr,
                             matryoshka_dims=dims)


def new_data(experiment: str, variant: str, args, seed: int):
    spec = EXPERIMENTS[experiment]
    kw = dict(data_root=args.data_root, batch_size=spec["batch_size"], shuffle=True, seed=seed)
    if experiment == "matryoshka":
        return SentencesDataModule(WIKI, **kw)
    source = str(Path(args.mined).resolve()) if variant == "mined" else NLI
    return NLIDataModule(source, no_duplicates=variant != "duplicates", **kw)


def duplicates_in_batches(data, module: ContrastiveModule) -> dict:
    """Over the epoch's batches as the sampler cuts them: batches holding a text in two rows, and such repeats (3
    SNLI rows whose anchor equals their own positive are not false negatives and are not counted)."""
    data.connect(module.encoder.tokenizer, module.encoder.max_length)
    order = list(data.train_dataloader().sampler)
    repeats = repeats_per_batch(data.text_keys(), order, data.batch_size, drop_last=True)  # as training cuts them
    return {"batches": len(repeats), "batches_with_a_repeat": sum(r > 0 for r in repeats),
            "repeated_texts_per_batch_mean": statistics.fmean(repeats), "repeated_texts_per_batch_max": max(repeats),
            "rows_trained": len(repeats) * data.batch_size, "rows": len(data.texts)}


def train_run(experiment: str, variant: str, seed: int, args, scorer: Scorer) -> dict:
    spec = EXPERIMENTS[experiment]
    pl.seed_everything(seed, verbose=False)
    module = new_module(variant, spec["lr"])
    data = new_data(experiment, variant, args, seed)
    run: dict = {"variant": variant, "seed": seed}
    if experiment == "supervised" and variant != "mined":
        run["batch_duplicates"] = duplicates_in_batches(data, module)
        data = new_data(experiment, variant, args, seed)  # a fresh sampler for training
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1,
                         max_steps=args.max_steps or -1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, data)
    run.update(steps=trainer.global_step, train_seconds=round(time.perf_counter() - start, 1),
               final_train_loss=float(trainer.callback_metrics["train/loss"]),
               scores=scorer(module, DIMS if experiment == "matryoshka" else [None]))
    return run


def summarise(runs: list[dict]) -> dict:
    """{variant: {split: {dims: {mean, std, min, max}}}} over seeds."""
    out: dict = {}
    for run in runs:
        for split, by_dims in run["scores"].items():
            for k, rho in by_dims.items():
                out.setdefault(run["variant"], {}).setdefault(split, {}).setdefault(k, []).append(rho)
    return {v: {s: {k: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                        "min": min(xs), "max": max(xs), "n": len(xs)} for k, xs in d.items()}
                for s, d in splits.items()} for v, splits in out.items()}


def table(result: dict) -> str:
    summary, base = result.get("summary", {}), result.get("baseline", {})
    rows = ["| variant | split | dims | Spearman x 100 (mean ± std over seeds, min-max) | MiniLM untrained |",
            "|---|---|---|---|---|"]
    for variant, splits in summary.items():
        for split, by_dims in splits.items():
            for k, s in by_dims.items():
                b = base.get(split, {}).get(k)
                rows.append(f"| {variant} | {split} | {k} | {s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}-"
                            f"{s['max']:.2f}, n={s['n']}) | {'-' if b is None else f'{b:.2f}'} |")
    dup = [r for r in result.get("runs", []) if "batch_duplicates" in r]
    if dup:
        rows += ["", "| variant | seed | batches | with a repeated text | repeated texts per batch (mean, max) |",
                 "|---|---|---|---|---|"]
        rows += [f"| {r['variant']} | {r['seed']} | {d['batches']} | {d['batches_with_a_repeat']} | "
                 f"{d['repeated_texts_per_batch_mean']:.2f}, {d['repeated_texts_per_batch_max']} |"
                 for r in dup for d in [r["batch_duplicates"]]]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=list(EXPERIMENTS))
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of the experiment's variants")
    ap.add_argument("--mined", default=None, help="(c): triplets written by `train.py mine` from the NLI pairs")
    ap.add_argument("--max_steps", type=int, default=None, help="steps per run; default one epoch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec = EXPERIMENTS[args.experiment]
    if not (Path(args.data_root) / spec["data"]).exists():
        sys.exit(f"error: needs {Path(args.data_root) / spec['data']} (../shared/data beside the checkout); "
                 "set --data_root")
    variants = args.variants or [v for v in spec["variants"] if v != "mined" or args.mined]
    if "mined" in variants and not (args.mined and Path(args.mined).is_file()):
        sys.exit(f"error: --mined {args.mined!r} is not a file: make it with `python train.py mine` (see --help)")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"contrastive_quality_{args.experiment}.json")
    settings = {"model": MODEL, "pooler": "mean", "mlp": "none", "max_length": 32, "temperature": 0.05,
                "max_steps": args.max_steps, **{k: v for k, v in spec.items() if k not in ("variants", "splits")},
                "splits": [f"{task}_{split}" for task, split in spec["splits"]],
                "matryoshka_dims": DIMS if args.experiment == "matryoshka" else None,
                "mined": args.mined}
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("settings") != settings:
        result = {}
    result.setdefault("commands", []).append(" ".join(["python", *sys.argv]))
    result.update({"benchmark": f"contrastive_quality {args.experiment}", "settings": settings,
                   "machine": {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                               "load_average_at_start": os.getloadavg()},
                   "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                                "python": platform.python_version()}})
    result.setdefault("runs", [])
    scorer = Scorer(args.data_root, new_module("plain", spec["lr"]).encoder, spec["splits"])
    if "baseline" not in result:
        result["baseline"] = scorer(new_module("plain", spec["lr"]),
                                    DIMS if args.experiment == "matryoshka" else [None])
        write_json(out, result)
    for seed in args.seeds:
        for variant in variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in result["runs"]):
                continue
            run = train_run(args.experiment, variant, seed, args, scorer)
            result["runs"].append(run)
            result["summary"] = summarise(result["runs"])
            result["machine"]["load_average_at_end"] = os.getloadavg()
            write_json(out, result)
            print(json.dumps({k: v for k, v in run.items() if k != "scores"}), flush=True)
    print(table(result))


if __name__ == "__main__":
    main()
