"""Training throughput of embedlab's SimCSE step vs sentence-transformers' own training, in one process.

Both train the same encoder (all-MiniLM-L6-v2, or ``--model`` FOLDER, e.g. a random BERT-base) on the same
sentences with the same objective: unsupervised SimCSE is MultipleNegativesRankingLoss (scale 20 = 1 / temperature
0.05) on (sentence, sentence) pairs with dropout on.
Same batch size, max length, precision, optimiser (AdamW) and learning rate. Each side is timed from the end of
its warm-up steps to the end of its last step (data loading, forward, backward, optimiser step all included);
rounds alternate between the two so machine noise hits both alike. Sentences per second counts each input
sentence once (both sides encode it twice).

    python benchmarks/contrastive_throughput.py [--batch_size 64] [--steps 10] [--warmup 3] [--rounds 2] [--out F]
                                                [--model NAME_OR_FOLDER] [--gpu_fast]

``--gpu_fast`` gives the embedlab side the switches of configs/trainer/gpu_fast.yaml (read from that file: its
model and data ``init_args`` and precision); sentence-transformers keeps its own defaults (bf16 on a GPU).

Writes benchmarks/results/contrastive_throughput-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from common import write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def load_sentences(n: int) -> tuple[list[str], str]:
    wiki = ROOT.parent / "shared" / "data" / "wiki" / "wiki1m_for_simcse.head.txt"
    if wiki.exists():
        return wiki.read_text(encoding="utf-8").splitlines()[:n], str(wiki)
    from datamodules.sample import write_sample

    folder = write_sample(ROOT / "benchmarks" / "results" / "sample", n_sentences=n)
    return (folder / "sentences.txt").read_text().splitlines(), "synthetic sample"


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def rate(ends: list[float], warmup: int, batch_size: int) -> float:
    measured = ends[warmup - 1 :]
    return (len(measured) - 1) * batch_size / (measured[-1] - measured[0])


def gpu_fast_switches() -> tuple[dict, dict, str]:
    """(model init_args, data init_args, precision) of configs/trainer/gpu_fast.yaml."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "trainer" / "gpu_fast.yaml").read_text())
    return (cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]["precision"])


def run_embedlab(sentences, args, accelerator: str, precision: str) -> float:
    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule

    path = ROOT / "benchmarks" / "results" / "_sentences.txt"
    path.write_text("\n".join(sentences) + "\n")
    model_kw, data_kw = {"attn_implementation": args.attn}, {}
    if args.gpu_fast:
        fast_model, fast_data, precision = gpu_fast_switches()
        model_kw, data_kw = {**model_kw, **fast_model}, fast_data
        if accelerator == "cpu":  # compile on CPU takes minutes (a smoke run of the script only)
            model_kw["compile"], precision = False, "32-true"
    model = ContrastiveModule(args.model, pooler="mean", max_length=args.max_length, lr=3e-5, **model_kw)
    data = SentencesDataModule(str(path), batch_size=args.batch_size, shuffle=False, **data_kw)
    clock = StepClock()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision,
                         max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(model, data)
    path.unlink()
    return rate(clock.ends, args.warmup, args.batch_size)


def run_sentence_transformers(sentences, args, use_cpu: bool, bf16: bool) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from lightning_modules.components.hub import resolve_model

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *a, **k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    model = SentenceTransformer(resolve_model(args.model), device="cpu" if use_cpu else "cuda")
    model.max_seq_length = args.max_length
    dataset = Dataset.from_dict({"anchor": sentences, "positive": sentences})
    clock = Clock()
    out = ROOT / "benchmarks" / "results" / "_st_trainer"
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=3e-5, warmup_ratio=0.0, lr_scheduler_type="linear", save_strategy="no", report_to="none",
        logging_steps=10_000, use_cpu=use_cpu, bf16=bf16, dataloader_drop_last=True, seed=0,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[clock])
    trainer.train()
    return rate(clock.ends, args.warmup, args.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--attn", default=None, help="attn_implementation for embedlab, e.g. sdpa")
    ap.add_argument("--model", default=MODEL, help="hub name or folder (the same for both sides)")
    ap.add_argument("--gpu_fast", action="store_true", help="embedlab with configs/trainer/gpu_fast.yaml's switches")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/contrastive_throughput-<tag>)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    accelerator, precision = ("gpu", "bf16-mixed") if cuda else ("cpu", "32-true")
    sentences, source = load_sentences(args.batch_size * (args.warmup + args.steps) + args.batch_size)
    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(run_embedlab(sentences, args, accelerator, precision))
        theirs.append(run_sentence_transformers(sentences, args, use_cpu=not cuda, bf16=cuda))
        print(f"round {r}: embedlab {ours[-1]:.1f} sent/s, sentence-transformers {theirs[-1]:.1f} sent/s", flush=True)
    device = torch.cuda.get_device_name() if cuda else f"cpu-{torch.get_num_threads()}threads"
    result = {
        "benchmark": "contrastive_throughput", "device": device, "precision": precision,
        "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
        "data": source, "model": args.model, "gpu_fast": args.gpu_fast,
        "embedlab_sentences_per_s": ours, "sentence_transformers_sentences_per_s": theirs,
        "ratio_median": statistics.median(o / t for o, t in zip(ours, theirs)),
        "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                     "sentence_transformers": __import__("sentence_transformers").__version__,
                     "python": platform.python_version()},
    }
    tag = "gpu" if cuda else "cpu"
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"contrastive_throughput-{tag}.json", result)
    mine, other = (", ".join(f"{x:.1f}" for x in xs) for xs in (ours, theirs))
    print(f"\n| side | sentences/s (per round) |\n|---|---|\n| embedlab SimCSE | {mine} |"
          f"\n| sentence-transformers MNRL | {other} |"
          f"\n| ratio (median) | {result['ratio_median']:.2f} |\n\nwrote {out}")


if __name__ == "__main__":
    main()
