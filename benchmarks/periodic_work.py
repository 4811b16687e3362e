"""What the periodic work of a run costs: checkpoint saves, STS evaluation, logging and the progress bar, as the
quickstart recipe runs them, against the same training steps with all of it off, in one process.

    python benchmarks/periodic_work.py [--steps 200] [--warmup 20] [--rounds 3] [--model FOLDER] [--threads 1]

Sides (``train.py fit --config configs/quickstart.yaml``, on a tiny random BERT unless ``--model`` names one; each
side its own run folder in a temporary directory, W&B offline):

- ``recipe``: the recipe as users run it: STS evaluation every 10 steps and at each epoch's end, checkpoint on the
  STS metric (best and last), W&B (offline) and CSV loggers every 5 steps, LR monitor, throughput, progress bar;
- ``foreground-checkpoints``: the recipe with each checkpoint written before training goes on (the synchronous
  ``AtomicCheckpointIO``, what runs used before background writes);
- ``no-checkpoint``: the same without checkpointing (what the saves cost);
- ``logging``: loggers, LR monitor, throughput and progress bar only (no STS evaluation, no checkpoint);
- ``bare``: the same steps with no callbacks, loggers, checkpoints or bar.

Each side's time is the training loop's wall time from the end of step ``--warmup`` to the end of training (the
export at fit end is once per fit and left out); the rounds rotate the order. Overheads against ``bare``, paired per
round (target: the recipe's <= 10 %); the cost of one STS evaluation = (no-checkpoint - logging) / evaluations in
the window and of one checkpoint = (recipe - no-checkpoint) / saves in the window (and the same for the foreground
writes), in training steps of ``bare``,
so the overhead at other intervals follows: evaluations x eval cost + saves x save cost + logging.
Writes benchmarks/results/periodic_work-cpu.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from common import add_threads, parse, write_json, write_random_bert  # noqa: E402

#: LoopClock's record: step ends, the end of training, checkpoints saved and STS evaluations after the warm-up
TIMES: dict = {}


class LoopClock(pl.Callback):
    """Records the end of each training step, the end of training and the checkpoints saved after ``warmup``."""

    def __init__(self, warmup: int = 20) -> None:
        self.warmup = warmup
        TIMES.clear()
        TIMES.update(ends=[], saves=0, evaluations=0)

    def on_train_batch_end(self, trainer, *args) -> None:
        TIMES["ends"].append(time.perf_counter())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step > self.warmup:
            TIMES["saves"] += 1

    def on_train_end(self, trainer, pl_module) -> None:
        TIMES["train_end"] = time.perf_counter()
        for callback in trainer.callbacks:
            TIMES["evaluations"] += sum(step > self.warmup for step, _ in getattr(callback, "history", []))


def run(side: str, args, model: str, root: Path) -> dict:
    """Seconds from the end of the warm-up steps to the end of training, and the checkpoints saved and STS
    evaluations made in that window."""
    import train

    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--model.init_args.model_name_or_path", model, "--trainer.max_steps", str(args.warmup + args.steps),
            "--trainer.default_root_dir", str(root / side), "--trainer.enable_model_summary", "false"]
    if side == "bare":
        argv += ["--trainer.callbacks=[]", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    if side == "logging":
        argv += ["--trainer.callbacks=[]", "--trainer.callbacks+=callbacks.Throughput"]
    if side == "foreground-checkpoints":
        argv += ["--trainer.plugins=lightning_modules.checkpoints.AtomicCheckpointIO"]
    elif side != "recipe":
        argv += ["--trainer.enable_checkpointing", "false"]
    argv += ["--trainer.callbacks+=periodic_work.LoopClock", f"--trainer.callbacks.warmup={args.warmup}"]
    train.main(argv)
    import periodic_work  # the module the CLI imported LoopClock from (this file runs as __main__)

    times = periodic_work.TIMES
    return {"seconds": times["train_end"] - times["ends"][args.warmup - 1], "saves": times["saves"],
            "evaluations": times["evaluations"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="model folder or hub name (default: a tiny random BERT)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "periodic_work-cpu.json"))
    add_threads(ap, default=1)
    args = parse(ap)
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.chdir(ROOT)  # the recipe names its data relative to the repository
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = str(tmp / "tiny-bert")
            Path(model).mkdir()
            write_random_bert(Path(model), layers=2, hidden=64)
        sides = ["recipe", "foreground-checkpoints", "no-checkpoint", "logging", "bare"]
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                runs[side].append(run(side, args, model, tmp / f"round{r}"))
            print(f"round {r}: " + ", ".join(f"{s} {runs[s][-1]['seconds']:.2f} s" for s in sides), flush=True)
    seconds = {side: [x["seconds"] for x in v] for side, v in runs.items()}
    bare_step = [b / args.steps for b in seconds["bare"]]  # seconds per bare training step, per round
    overhead = {side: [t / b - 1 for t, b in zip(seconds[side], seconds["bare"])] for side in sides[:-1]}

    def per_event(more: str, less: str, key: str) -> list[float]:
        """Cost of one event (STS evaluation or checkpoint), in bare training steps, per round."""
        return [(t - u) / x[key] / step for t, u, x, step in zip(seconds[more], seconds[less], runs[more], bare_step)
                if x[key]]

    eval_cost = per_event("no-checkpoint", "logging", "evaluations")
    save_cost = per_event("recipe", "no-checkpoint", "saves")
    fg_cost = per_event("foreground-checkpoints", "no-checkpoint", "saves")
    med = statistics.median
    result = {
        "benchmark": "periodic_work", "device": f"cpu-{torch.get_num_threads()}threads", "model": args.model or
        "random BERT, 2 layers, hidden 64", "recipe": "configs/quickstart.yaml", "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "runs": runs,
        "ms_per_step": {s: med(v) * 1000 / args.steps for s, v in seconds.items()},
        "overhead_vs_bare": {s: {"rounds": v, "median": med(v)} for s, v in overhead.items()},
        "sts_evaluation_in_bare_steps": med(eval_cost) if eval_cost else None,
        "checkpoint_in_bare_steps": med(save_cost) if save_cost else None,
        "ms_per_checkpoint": med(save_cost) * med(bare_step) * 1000 if save_cost else None,
        "ms_per_foreground_checkpoint": med(fg_cost) * med(bare_step) * 1000 if fg_cost else None,
        "target": "recipe overhead <= 0.10",
    }
    out = write_json(args.out, result)
    print("\n| side | ms/step (median) | overhead vs bare (median) |\n|---|---|---|")
    for side, ms in result["ms_per_step"].items():
        o = result["overhead_vs_bare"].get(side)
        print(f"| {side} | {ms:.2f} | {'-' if o is None else format(o['median'], '.1%')} |")
    x = runs["recipe"][0]
    print(f"\nin the timed window of a run: {x['evaluations']} STS evaluations of "
          f"{result['sts_evaluation_in_bare_steps'] or float('nan'):.2f} bare steps each, {x['saves']} checkpoints of "
          f"{result['checkpoint_in_bare_steps'] or float('nan'):.2f} bare steps each (written in the foreground: "
          f"{result['ms_per_foreground_checkpoint'] or float('nan'):.0f} ms, in the background: "
          f"{result['ms_per_checkpoint'] or float('nan'):.0f} ms of the training loop's time)\nwrote {out}")


if __name__ == "__main__":
    main()
