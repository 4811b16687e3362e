"""Each speed switch of the contrastive step alone and all together, as ratios to a baseline run in the same process.

    python benchmarks/switches.py [--batch_size 64] [--max_length 32] [--steps 20] [--warmup 3] [--rounds 2]
                                  [--switches sdpa pad8 group bf16 compile workers] [--model NAME]

Unsupervised SimCSE (``ContrastiveModule``, mean pooling) from all-MiniLM-L6-v2 on wiki sentences (the project's
synthetic sample when ../shared/data is absent), through a Lightning ``Trainer`` exactly as ``train.py fit`` runs it.
Baseline: float32, eager attention, no compile, batches padded to their longest row, random order, no workers.
Switches (configs/trainer/gpu_fast.yaml turns all of them on):

    sdpa     model.attn_implementation=sdpa          pad8     data.pad_to_multiple_of=8
    group    data.group_by_length=true               bf16     trainer.precision=bf16-mixed
    compile  model.compile=true (dynamic shapes)     workers  data.num_workers=4, data.pin_memory=true

Each run is one epoch of exactly ``warmup + steps`` batches (the same sentences for every setting), timed from the
end of its warm-up steps to its last step (compile's first-step compilation falls in the warm-up; on a GPU each step
ends with a synchronisation); rounds repeat every setting in the same order, and the
ratio is the median over rounds of (setting sentences/s) / (baseline sentences/s of the same round). Defaults: every
switch on a GPU; on a CPU ``sdpa pad8 group workers`` (bf16 autocast and compile are slow on CPU, docs/pitfalls.md #10;
name them to measure them anyway). Writes benchmarks/results/switches-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_json  # noqa: E402
from contrastive_throughput import StepClock, load_sentences, ms_per_step  # noqa: E402

SWITCHES = {
    "sdpa": ({"attn_implementation": "sdpa"}, {}, {}),
    "pad8": ({}, {"pad_to_multiple_of": 8}, {}),
    "group": ({}, {"group_by_length": True}, {}),
    "bf16": ({}, {}, {"precision": "bf16-mixed"}),
    "compile": ({"compile": True}, {}, {}),
    "workers": ({}, {"num_workers": 4, "pin_memory": True}, {}),
}


def run(sentences_file: Path, names: list[str], args, accelerator: str) -> float:
    """Sentences per second of the SimCSE step with the named switches on."""
    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule

    model_kw: dict = {"attn_implementation": "eager"}
    data_kw: dict = {}
    trainer_kw: dict = {"precision": "32-true"}
    for name in names:
        m, d, t = SWITCHES[name]
        model_kw, data_kw, trainer_kw = {**model_kw, **m}, {**data_kw, **d}, {**trainer_kw, **t}
    pl.seed_everything(0)
    model = ContrastiveModule(args.model, pooler="mean", max_length=args.max_length, lr=3e-5, **model_kw)
    data = SentencesDataModule(str(sentences_file), batch_size=args.batch_size, **data_kw)
    clock = StepClock()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock], **trainer_kw)
    trainer.fit(model, data)
    return args.batch_size * 1000 / ms_per_step(clock.ends, args.warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--switches", nargs="+", choices=list(SWITCHES), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    names = args.switches or (list(SWITCHES) if cuda else ["sdpa", "pad8", "group", "workers"])
    settings = {"baseline": [], **{n: [n] for n in names}, "all": names}
    # exactly one epoch per run: every setting trains on the same sentences (length grouping reorders them, so a
    # timed window shorter than the epoch would see other lengths than the baseline's)
    sentences, source = load_sentences(args.batch_size * (args.warmup + args.steps))
    path = ROOT / "benchmarks" / "results" / "_switches_sentences.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sentences) + "\n")
    rates: dict[str, list[float]] = {k: [] for k in settings}
    try:
        for r in range(args.rounds):
            for key, on in settings.items():
                rates[key].append(run(path, on, args, "gpu" if cuda else "cpu"))
                print(f"round {r}: {key:<9} {rates[key][-1]:8.1f} sentences/s", flush=True)
    finally:
        path.unlink(missing_ok=True)
    ratio = {k: statistics.median(v / b for v, b in zip(rates[k], rates["baseline"])) for k in settings}
    device = torch.cuda.get_device_name() if cuda else f"cpu-{torch.get_num_threads()}threads"
    result = {"benchmark": "switches", "device": device, "model": args.model, "data": source,
              "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
              "warmup": args.warmup, "settings": settings, "sentences_per_s": rates, "ratio_to_baseline": ratio,
              "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__}}
    tag = "gpu" if cuda else "cpu"
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"switches-{tag}.json", result)
    print("\n| setting | switches | sentences/s (rounds) | x baseline |\n|---|---|---|---|")
    for key, on in settings.items():
        print(f"| {key} | {' + '.join(on) or '-'} | {', '.join(f'{x:.1f}' for x in rates[key])} | {ratio[key]:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
