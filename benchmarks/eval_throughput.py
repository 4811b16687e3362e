"""Encoding throughput of the evaluation path vs ``SentenceTransformer.encode``; the 7-task STS suite time.

The evaluation of a checkpoint encodes with ``EmbeddingModule.encode`` (tokenise all sentences once, sort by
length, pad per batch). This compares it with ``SentenceTransformer.encode`` on the same model
(all-MiniLM-L6-v2 with mean pooling, the same max length), the same batch size and the same sentences (the
distinct sentences of STS-B test), in one process: rounds alternate which side goes first so machine noise
hits both alike; the ratio is the median of per-round ratios (target >= 1.3). The outputs are checked to agree
first, in an untimed pass of both sides over every sentence.

    python benchmarks/eval_throughput.py [--batch_size 128] [--rounds 5] [--threads 2] [--suite]

``--suite`` also times ``train.py evaluate`` on the seven STS tasks (wall and process CPU time). Writes
benchmarks/results/eval_throughput-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_threads, parse, write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, sentences: list[str]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(sentences)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def synthetic_sentences(n: int) -> list[str]:
    import tempfile

    from datamodules.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        return sorted(set((write_sample(Path(tmp), n_sentences=n) / "sentences.txt").read_text().splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model", default=MODEL, help="hub name or folder")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--suite", action="store_true", help="also time the 7-task STS evaluation")
    parser.add_argument("--out", default=None)
    add_threads(parser)
    args = parse(parser)

    from sentence_transformers import SentenceTransformer

    from core.errors import DataError
    from core.hub import resolve_model
    from datamodules.sts import load_sts
    from lightning_modules import ContrastiveModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pairs = load_sts("stsb", "test", args.data_root, hub=False)
        sentences, source = sorted(set(pairs.sentences1) | set(pairs.sentences2)), "STS-B test"
    except DataError as err:  # no shared data (a GPU machine): the project's synthetic sentences
        print(f"STS-B test unavailable ({err}); using the project's synthetic sentences")
        sentences, source = synthetic_sentences(4000), "synthetic sample"
    st = SentenceTransformer(resolve_model(args.model), device=device)
    module = ContrastiveModule(args.model, pooler="mean", mlp="none", max_length=st.max_seq_length).to(device)

    def ours(s: list[str]) -> torch.Tensor:
        return module.encode(s, batch_size=args.batch_size)

    def theirs(s: list[str]) -> torch.Tensor:
        return st.encode(s, batch_size=args.batch_size, convert_to_tensor=True, show_progress_bar=False)

    # both normalised: all-MiniLM-L6-v2 ends in a Normalize module, a plain model folder (random BERT) does not.
    # On every sentence: an untimed pass of each side over every batch shape first (the steady state: the first
    # call of a shape pays for kernel selection and allocation, and it fell on whichever side went first)
    a, b = (F.normalize(x.cpu(), dim=-1) for x in (ours(sentences), theirs(sentences)))
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(
            f"the two paths disagree (max |diff| {diff:.2e}): the comparison would be meaningless"
        )
    rounds = []
    for r in range(args.rounds):
        order = [("embedlab", ours), ("sentence-transformers", theirs)]
        if r % 2:
            order.reverse()
        times = {name: timed(fn, sentences) for name, fn in order}
        rounds.append({name: len(sentences) / t for name, t in times.items()})
    ratio = statistics.median(r["embedlab"] / r["sentence-transformers"] for r in rounds)
    result = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or 'cpu'})",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "data": source,
        "sentences": len(sentences),
        "batch_size": args.batch_size,
        "max_length": st.max_seq_length,
        "max_abs_diff_normalised": diff,
        "rounds_sentences_per_s": rounds,
        "median_sentences_per_s": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "ratio_embedlab_over_st": ratio,
    }
    print(f"{'round':>5} | {'embedlab sent/s':>15} | {'ST sent/s':>10} | ratio")
    for i, r in enumerate(rounds):
        print(
            f"{i:>5} | {r['embedlab']:>15.1f} | {r['sentence-transformers']:>10.1f} | "
            f"{r['embedlab'] / r['sentence-transformers']:.3f}"
        )
    print(
        f"median ratio embedlab / sentence-transformers: {ratio:.3f}  ({len(sentences)} sentences, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, {result['device']})"
    )

    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"eval_throughput-{device}.json", result)
    if args.suite:
        from commands.evaluate import evaluate_main

        wall, cpu = time.perf_counter(), cpu_seconds()
        suite = evaluate_main(
            [
                "--model",
                args.model,
                "--data_root",
                args.data_root,
                "--device",
                device,
                "--batch_size",
                str(args.batch_size),
            ]
        )
        result["suite"] = {
            "wall_s": time.perf_counter() - wall,
            "process_cpu_s": cpu_seconds() - cpu,
            "scores": {t: s["all"] for t, s in suite["tasks"].items()},
            "avg": suite["avg"],
        }
        suite_s = result["suite"]
        print(
            f"7-task STS suite: {suite_s['wall_s']:.1f} s wall, {suite_s['process_cpu_s']:.1f} s process CPU "
            "(model load and data reading included)"
        )
        write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
