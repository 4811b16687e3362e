"""What the periodic work of a run costs: checkpoint saves, STS evaluation, logging and the progress bar, as the
quickstart recipe runs them, against the same training steps with all of it off, in one process.

    python benchmarks/periodic_work.py [--steps 300] [--warmup 20] [--rounds 3] [--sides recipe ... bare]
        [--model FOLDER | --placeholder_vocab] [--threads 1]

Sides (``train.py fit --config configs/quickstart.yaml``, each its own run folder in a temporary directory, W&B
offline), on a tiny random BERT (2 layers, hidden 64) whose tokenizer knows the words of the quickstart's data (86
tokens; 0.14 M parameters, a 1.7 MB checkpoint with Adam's state), unless ``--model`` names another or
``--placeholder_vocab`` gives it BERT's 30,522 placeholder tokens (every word then [UNK]; 2.1 M parameters, 94 % of
them the embedding, a 25 MB checkpoint: on this machine the kernel's writeback of those bytes competes with the
training thread, ~0.3 s of CPU per checkpoint):

- ``recipe``: the recipe as users run it: STS evaluation every 25 steps, checkpoint on the STS metric (best and
  last), W&B (offline) and CSV loggers every 5 steps, LR monitor, throughput, progress bar;
- ``foreground-checkpoints``: the recipe with each checkpoint written before training goes on (the synchronous
  ``AtomicCheckpointIO``, what runs used before background writes);
- ``no-checkpoint``: the same without checkpointing;
- ``logging``: loggers, LR monitor, throughput and progress bar only (no STS evaluation, no checkpoint);
- ``bare``: the same steps with no callbacks, loggers, checkpoints or bar.

Each side's time is the training loop's wall time from the end of step ``--warmup`` to the end of training (the
export at fit end is once per fit and left out); the rounds rotate the order. Two estimates of each side's overhead
against ``bare`` (target: the recipe's <= 10 % by both, medians of the rounds):

- ``paired``: its time over ``bare``'s in the same round. On this shared 2-core machine the speed drifts by 10-20 %
  between runs a minute apart, so the judged run is ``--sides recipe bare --rounds 8``: the two alone, adjacent,
  alternating which goes first.
- ``within_run``: the time of the steps the periodic work lands on, over the same run's typical steps, plus how
  much the typical step itself grew. A step's time is from one step's end to the next; an evaluation lands on its
  own step, a save made at the end of step k on steps k+1 and k+2 (where the writer thread still runs). Each
  step's local typical time is the median of the untouched steps within 10 of it, so that the machine's drift
  during a run moves the baseline too. ``events`` = the window's time over the sum of those local times, - 1
  (logging steps, bar redraws and whatever the writer thread slows down are in it, wherever they fall; ``bare``'s
  own is the method's noise); ``per_step`` = the run's median untouched step over ``bare``'s in the same round,
  - 1: the work every step pays (the bar's bookkeeping, throughput, LR monitor, Lightning's hooks), which carries
  the drift between runs. Overhead = (1 + events) x (1 + per_step) - 1. The table shows each part, each round's
  in brackets.

One STS evaluation and one save step (the best checkpoint and ``last.ckpt`` saved at one step count once), in the
run's typical steps, come from the same split (the extra time of the evaluation steps, and of the two steps after
each save step), so the overhead at another schedule follows: evaluations x eval cost + save steps x save cost +
logging. Writes benchmarks/results/periodic_work-cpu.json (or
``--out``) and prints a table.
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
from common import add_threads, parse, text_words, write_json, write_random_bert  # noqa: E402

#: LoopClock's record: step ends, the end of training, the steps at whose end a checkpoint was saved, the steps
#: whose own time holds an STS evaluation, and the steps of every evaluation (one of the final weights made at the
#: end of training is in the time after the last step, not in a step)
TIMES: dict = {}

SIDES = ("recipe", "foreground-checkpoints", "no-checkpoint", "logging", "bare")


def evaluations(trainer) -> list[int]:
    return [step for callback in trainer.callbacks for step, _ in getattr(callback, "history", [])]


class LoopClock(pl.Callback):
    """Records the end of each training step, the end of training, and the steps of each save and evaluation. It
    comes after STSEvaluator in the callbacks (and Lightning puts ModelCheckpoint last), so an evaluation at a step
    lands in that step's time and a save in the next one's."""

    def __init__(self, warmup: int = 20) -> None:
        self.warmup = warmup
        self._seen = 0
        TIMES.clear()
        TIMES.update(ends=[], save_steps=[], eval_steps=[], eval_in_step=[])

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = len(evaluations(trainer))  # the evaluation before the first step

    def on_train_batch_end(self, trainer, *args) -> None:
        TIMES["ends"].append(time.perf_counter())
        seen = len(evaluations(trainer))
        if seen > self._seen:
            TIMES["eval_in_step"].append(trainer.global_step)
        self._seen = seen

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        TIMES["save_steps"].append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        TIMES["train_end"] = time.perf_counter()
        TIMES["eval_steps"] = evaluations(trainer)


def run(side: str, args, model: str, root: Path) -> dict:
    """One run of ``side`` and its figures (:func:`attribute`)."""
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

    return attribute(periodic_work.TIMES, args.warmup)


def attribute(times: dict, warmup: int, window: int = 10) -> dict:
    """One run's figures from LoopClock's record (see the module docstring): ``seconds`` (the window's wall time),
    ``median_step`` (the run's typical step, seconds), ``baseline`` (the sum of each step's local typical time: the
    median of the steps within ``window`` of it that no evaluation or save touched, so that a machine that slows
    down or speeds up during the run moves the baseline with it), ``excess`` (window's time - baseline), the
    evaluations and checkpoint files saved in the window, the steps that saved (``save_triggers``: a step's best
    and ``last.ckpt`` are one trigger), and the extra time of the evaluation steps and of the two steps after each
    trigger, in local typical steps per event."""
    if warmup < 1:
        raise ValueError("periodic_work: --warmup must be at least 1 (the window starts at the end of a step)")
    ends, steps = times["ends"], len(times["ends"]) - warmup
    evals = [s for s in times["eval_steps"] if s > warmup]
    saves = [s for s in times["save_steps"] if s > warmup]
    # step k (1-based) ends at ends[k - 1]; its time runs from the end of step k - 1
    took = {k: ends[k - 1] - ends[k - 2] for k in range(warmup + 1, len(ends) + 1)}
    eval_hit = set(times["eval_in_step"]) & took.keys()
    triggers = sorted({k for k in times["save_steps"] if k + 1 in took})  # their aftermath is inside the window
    save_hit = {k + d for k in triggers for d in (1, 2)} & took.keys() - eval_hit
    plain = [k for k in took if k not in eval_hit | save_hit]
    if not plain:
        raise ValueError("periodic_work: every timed step holds an evaluation or a save; time more steps")
    median = statistics.median(took[k] for k in plain)
    local = {k: statistics.median([took[j] for j in plain if abs(j - k) <= window] or [median]) for k in took}
    seconds = times["train_end"] - ends[warmup - 1]

    def extra(hit: set) -> float:
        return sum(took[k] / local[k] - 1 for k in hit)

    baseline = sum(local.values())
    return {"seconds": seconds, "steps": steps, "median_step": median, "baseline": baseline,
            "excess": seconds - baseline, "evaluations": len(evals), "saves": len(saves),
            "save_triggers": len(triggers),
            "eval_extra_steps": extra(eval_hit) / len(eval_hit) if eval_hit else None,
            "save_extra_steps": extra(save_hit) / len(triggers) if triggers else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                    help="the sides to run (recipe and bare always do; the two alone alternate run by run)")
    ap.add_argument("--model", default=None, help="model folder or hub name (default: a tiny random BERT)")
    ap.add_argument("--placeholder_vocab", action="store_true",
                    help="the tiny BERT with BERT's 30,522 placeholder tokens instead of the data's words")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "periodic_work-cpu.json"))
    add_threads(ap, default=1)
    args = parse(ap)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the timed window starts at the end of a step)")
    args.sides = [s for s in SIDES if s in args.sides or s in ("recipe", "bare")]
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
            data = ROOT / "configs" / "quickstart_data"
            words = None if args.placeholder_vocab else text_words(data / "sentences.txt", data / "sts_dev.tsv")
            write_random_bert(Path(model), layers=2, hidden=64, words=words)
        sides = args.sides
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                runs[side].append(run(side, args, model, tmp / f"round{r}"))
            print(f"round {r}: " + ", ".join(f"{s} {runs[s][-1]['seconds']:.2f} s" for s in sides), flush=True)
    med = statistics.median
    bare = runs["bare"]

    def overheads(side: str) -> dict:
        paired = [x["seconds"] / b["seconds"] - 1 for x, b in zip(runs[side], bare)]
        events = [x["excess"] / x["baseline"] for x in runs[side]]
        per_step = [x["median_step"] / b["median_step"] - 1 for x, b in zip(runs[side], bare)]
        within = [(1 + e) * (1 + p) - 1 for e, p in zip(events, per_step)]
        return {name: {"rounds": v, "median": med(v)} for name, v in
                [("within_run", within), ("events", events), ("per_step", per_step), ("paired", paired)]}

    def per_event(side: str, key: str) -> float | None:
        values = [x[key] for x in runs[side] if x[key] is not None]
        return med(values) if values else None

    overhead = {side: overheads(side) for side in sides[:-1]}
    typical_ms = {side: med(x["median_step"] for x in v) * 1000 for side, v in runs.items()}
    save_steps = per_event("recipe", "save_extra_steps")
    fg_steps = per_event("foreground-checkpoints", "save_extra_steps") if "foreground-checkpoints" in runs else None
    vocabulary = "BERT's 30,522 placeholders" if args.placeholder_vocab else "the quickstart data's words"
    result = {
        "benchmark": "periodic_work", "device": f"cpu-{torch.get_num_threads()}threads",
        "model": args.model or f"random BERT, 2 layers, hidden 64, vocabulary: {vocabulary}",
        "recipe": "configs/quickstart.yaml", "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "runs": runs,
        "ms_per_step": {s: med(x["seconds"] for x in v) * 1000 / args.steps for s, v in runs.items()},
        "typical_step_ms": typical_ms,
        "overhead_vs_bare": overhead,
        "bare_excess_within_run": med(x["excess"] / x["baseline"] for x in bare),
        "sts_evaluation_in_steps": per_event("recipe", "eval_extra_steps"),
        "save_trigger_in_steps": save_steps,
        "ms_per_save_trigger": save_steps * typical_ms["recipe"] if save_steps is not None else None,
        "ms_per_foreground_save_trigger": fg_steps * typical_ms["foreground-checkpoints"] if fg_steps is not None
        else None,
        "target": "recipe overhead <= 0.10, paired and within_run (medians of the rounds)",
        "target_met": max(overhead["recipe"][k]["median"] for k in ("paired", "within_run")) <= 0.10,
    }
    out = write_json(args.out, result)
    columns = ("within_run", "events", "per_step", "paired")
    print("\n| side | ms/step | typical step, ms | overhead within run | of it: periodic events | of it: typical step "
          "vs bare's | paired overhead |\n|---|---|---|---|---|---|---|")
    for side, ms in result["ms_per_step"].items():
        o = result["overhead_vs_bare"].get(side)
        cells = ["-"] * len(columns) if o is None else [
            f"{o[k]['median']:+.1%} ({', '.join(format(v, '+.0%') for v in o[k]['rounds'])})" for k in columns]
        print(f"| {side} | {ms:.2f} | {typical_ms[side]:.2f} | {' | '.join(cells)} |")
    x = runs["recipe"][0]

    def fmt(v, spec=".2f"):
        return "nan" if v is None else format(v, spec)

    print(f"\nin the timed window of a run: {x['evaluations']} STS evaluations of "
          f"{fmt(result['sts_evaluation_in_steps'])} typical steps each, {x['saves']} checkpoint files at "
          f"{x['save_triggers']} save steps of {fmt(save_steps)} typical steps each "
          f"({fmt(result['ms_per_save_trigger'], '.0f')} ms of the training "
          f"loop's time; written in the foreground: {fmt(result['ms_per_foreground_save_trigger'], '.0f')} ms); "
          f"bare's own excess over its typical step (the method's noise): {result['bare_excess_within_run']:+.1%}"
          f"\ntarget (paired and within the run, medians) <= 10 %: {'met' if result['target_met'] else 'NOT met'}"
          f"\nwrote {out}")


if __name__ == "__main__":
    main()
