"""Steady-state training speed of embedlab's SimCSE step against a minimal Lightning loop and sentence-transformers'
trainer, in one process.

All sides train the same encoder (all-MiniLM-L6-v2, or ``--model`` FOLDER, e.g. a random BERT-base) with the same
objective: unsupervised SimCSE, i.e. in-batch InfoNCE at temperature 0.05 over two dropout views of each sentence
(sentence-transformers: MultipleNegativesRankingLoss, scale 20, on (sentence, sentence) pairs). Same batch size,
max length, precision, optimiser (AdamW) and learning rate.

- ``embedlab``: ``ContrastiveModule`` + ``SentencesDataModule`` under a plain ``pl.Trainer``.
- ``lightning``: the least a Lightning user would write (:class:`MinimalSimCSE`: AutoModel, mean pooling, the loss
  in three lines, the texts tokenised once up front; the same model work as embedlab, one forward of the batch
  twice over): what embedlab costs on top of Lightning itself.
- ``sentence-transformers``: ``SentenceTransformerTrainer`` with its defaults.

The steady state: every sentence is long enough to be cut at ``--max_length`` tokens, so every batch has the same
shape on every side (no step meets a padding length the warm-up did not compile or tune for); each run times
``--steps`` steps (default 100) after ``--warmup`` steps (default 20), from the end of the last warm-up step to the
end of the last step, data loading, forward, backward and optimiser included; the sides run in a rotated order in
each of ``--rounds`` rounds (default 3), so slow phases of a noisy machine hit all alike; each side's milliseconds
per step are reported as min / median / max over the rounds, and the ratios are paired per round.

With ``--gpu_fast`` embedlab gets the switches of configs/trainer/gpu_fast.yaml (model and data ``init_args`` and
precision; on a CPU without compile and bf16). Its ``torch.compile`` caches compiled graphs on disk: set
``TORCHINDUCTOR_CACHE_DIR`` to one folder for every run of a check (benchmarks/gpu_check.sh does) so that each
shape is compiled once.

    python benchmarks/contrastive_throughput.py [--batch_size 64] [--max_length 32] [--steps 100] [--warmup 20]
        [--rounds 3] [--model NAME_OR_FOLDER] [--sides embedlab lightning sentence-transformers] [--gpu_fast]
        [--threads N] [--out F]

Writes benchmarks/results/contrastive_throughput-<cpu|gpu>.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from common import add_threads, parse, write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SIDES = ("embedlab", "lightning", "sentence-transformers")


def load_sentences(n: int) -> tuple[list[str], str]:
    """Up to ``n`` non-empty lines of the wiki sample in ../shared/data, else of the project's synthetic sample."""
    wiki = ROOT.parent / "shared" / "data" / "wiki" / "wiki1m_for_simcse.head.txt"
    if wiki.exists():
        with wiki.open(encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), (x.rstrip("\n") for x in f if x.strip()))]
        return lines, str(wiki)
    from datamodules.sample import write_sample

    folder = write_sample(ROOT / "benchmarks" / "results" / "sample", n_sentences=max(n, 2000))
    return [x for x in (folder / "sentences.txt").read_text().splitlines() if x.strip()][:n], "synthetic sample"


def long_sentences(n: int, max_length: int) -> tuple[list[str], str]:
    """``n`` texts of at least ``max_length`` words (so at least that many tokens: every batch is cut to the same
    length), each made of consecutive sentences of :func:`load_sentences`."""
    lines, source = load_sentences(n * 8)
    texts, words, i = [], [], 0
    while len(texts) < n:
        words += lines[i % len(lines)].split()
        i += 1
        if len(words) >= max_length:
            texts.append(" ".join(words))
            words = []
    return texts, source


class StepClock(pl.Callback):
    """The time at the end of each training step (after the device finished it)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def ms_per_step(ends: list[float], warmup: int) -> float:
    measured = ends[warmup - 1:]
    return 1000 * (measured[-1] - measured[0]) / (len(measured) - 1)


def gpu_fast_switches() -> tuple[dict, dict, str]:
    """(model init_args, data init_args, precision) of configs/trainer/gpu_fast.yaml."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "trainer" / "gpu_fast.yaml").read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]["precision"]


def lightning_trainer(args, accelerator: str, precision: str, clock: StepClock) -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=args.warmup + args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[clock])


def run_embedlab(texts: list[str], args, accelerator: str, precision: str) -> float:
    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule

    path = ROOT / "benchmarks" / "results" / "_sentences.txt"
    path.write_text("\n".join(texts) + "\n")
    model_kw, data_kw = {}, {}
    if args.gpu_fast:
        fast_model, data_kw, precision = gpu_fast_switches()
        model_kw = dict(fast_model)
        if accelerator == "cpu":  # compile and bf16 are slow on a CPU (docs/pitfalls.md): a smoke run of the script
            model_kw["compile"], precision = False, "32-true"
    model = ContrastiveModule(args.model, pooler="mean", max_length=args.max_length, lr=3e-5, **model_kw)
    data = SentencesDataModule(str(path), batch_size=args.batch_size, shuffle=False, **data_kw)
    clock = StepClock()
    lightning_trainer(args, accelerator, precision, clock).fit(model, data)
    path.unlink()
    return ms_per_step(clock.ends, args.warmup)


class MinimalSimCSE(pl.LightningModule):
    """Unsupervised SimCSE as a Lightning user writes it in a few lines: the reference for framework overhead."""

    def __init__(self, model: str, lr: float) -> None:
        super().__init__()
        from transformers import AutoModel

        # without BERT's unused pooler; train(): from_pretrained leaves dropout off
        self.encoder = AutoModel.from_pretrained(model, add_pooling_layer=False).train()
        self.lr = lr

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # two dropout views from one forward of the batch twice over, as the SimCSE authors' code does
        z1, z2 = self.embed({k: torch.cat([v, v]) for k, v in batch.items()}).chunk(2)
        sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / 0.05
        return F.cross_entropy(sim.float(), torch.arange(len(sim), device=sim.device))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def run_lightning(texts: list[str], args, accelerator: str, precision: str) -> float:
    from transformers import AutoTokenizer

    from core.hub import resolve_model

    path = resolve_model(args.model)
    tokens = AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=args.max_length,
                                                 return_tensors="pt")  # once, as embedlab's datamodule does
    rows = torch.utils.data.TensorDataset(tokens["input_ids"], tokens["attention_mask"])
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, drop_last=True,
                                         collate_fn=lambda b: dict(zip(("input_ids", "attention_mask"),
                                                                       map(torch.stack, zip(*b)))))
    clock = StepClock()
    lightning_trainer(args, accelerator, precision, clock).fit(MinimalSimCSE(path, 3e-5), loader)
    return ms_per_step(clock.ends, args.warmup)


def run_sentence_transformers(texts: list[str], args, accelerator: str, precision: str) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from core.hub import resolve_model

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *a, **k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    cpu = accelerator == "cpu"
    model = SentenceTransformer(resolve_model(args.model), device="cpu" if cpu else "cuda")
    model.max_seq_length = args.max_length
    clock = Clock()
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(ROOT / "benchmarks" / "results" / "_st_trainer"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=3e-5, warmup_ratio=0.0, lr_scheduler_type="linear",
        save_strategy="no", report_to="none", logging_steps=10_000, use_cpu=cpu, bf16=precision.startswith("bf16"),
        dataloader_drop_last=True, seed=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=targs, train_dataset=Dataset.from_dict({"anchor": texts, "positive": texts}),
        loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[clock])
    trainer.train()
    return ms_per_step(clock.ends, args.warmup)


RUNS = {"embedlab": run_embedlab, "lightning": run_lightning, "sentence-transformers": run_sentence_transformers}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--model", default=MODEL, help="hub name or folder (the same for every side)")
    ap.add_argument("--gpu_fast", action="store_true", help="embedlab with configs/trainer/gpu_fast.yaml's switches")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/contrastive_throughput-<tag>)")
    add_threads(ap)
    args = parse(ap)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")

    cuda = torch.cuda.is_available()
    accelerator, precision = ("gpu", "bf16-mixed") if cuda else ("cpu", "32-true")
    texts, source = long_sentences(args.batch_size * (args.warmup + args.steps + 1), args.max_length)
    ms: dict[str, list[float]] = {side: [] for side in args.sides}
    for r in range(args.rounds):
        order = args.sides[r % len(args.sides):] + args.sides[:r % len(args.sides)]
        for side in order:
            ms[side].append(RUNS[side](texts, args, accelerator, precision))
        print(f"round {r}: " + ", ".join(f"{side} {ms[side][-1]:.1f} ms/step" for side in order), flush=True)
    base = args.sides[0]
    result = {
        "benchmark": "contrastive_throughput",
        "device": torch.cuda.get_device_name() if cuda else f"cpu-{torch.get_num_threads()}threads",
        "precision": precision, "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "data": source, "model": args.model, "gpu_fast": args.gpu_fast,
        "ms_per_step": {side: {"rounds": v, **spread(v)} for side, v in ms.items()},
        "sentences_per_s": {side: args.batch_size * 1000 / statistics.median(v) for side, v in ms.items()},
        # paired per round: how many times faster the first side's step is than each other side's
        "speedup": {side: spread([o / b for o, b in zip(ms[side], ms[base])]) for side in args.sides[1:]},
        "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                     "sentence_transformers": __import__("sentence_transformers").__version__,
                     "python": platform.python_version()},
    }
    if "sentence-transformers" in ms and base == "embedlab":
        result["ratio_median"] = result["speedup"]["sentence-transformers"]["median"]  # gpu_summary.py reads it
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"contrastive_throughput-{'gpu' if cuda else 'cpu'}"
                                                                  ".json", result)
    print(f"\n| side | ms/step min | median | max | {base} faster by (median, min-max) |\n|---|---|---|---|---|")
    for side, v in result["ms_per_step"].items():
        s = result["speedup"].get(side)
        faster = f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" if s else "-"
        print(f"| {side} | {v['min']:.1f} | {v['median']:.1f} | {v['max']:.1f} | {faster} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
