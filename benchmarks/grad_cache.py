"""GradCache (``ContrastiveModule(mini_batch_size=...)``) against one pass: step time and activation memory.

    python benchmarks/grad_cache.py [--batch_size 64] [--mini 0 32 16 8] [--steps 3] [--threads 0] [--out F]

One process, one model (all-MiniLM-L6-v2, offline; mean pooling; unsupervised SimCSE, dropout on), the same batch
of sentences for every setting (wiki head from ../shared/data, else the project's synthetic sentences). A step is
``training_step`` + backward + AdamW step, timed after one warm-up step; settings alternate round by round.
``--mini 0`` is the plain one-pass step.

Activation memory is measured on any device as the peak of the bytes autograd holds for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``: every saved tensor's storage, counted once while any reference to it
lives, parameters excluded). GradCache should bound it by one chunk's instead of the whole batch's. On CUDA the
peak of ``torch.cuda.max_memory_allocated`` (parameters and optimiser state included) is reported too.
Writes JSON (default benchmarks/results/grad_cache-<device>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_threads, parse, write_json  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class SavedTensorBytes:
    """Live and peak bytes of the storages autograd saves for backward (each storage counted once)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.refs, self.sizes = exclude, {}, {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or key == 0:
            return t
        self.refs[key] = self.refs.get(key, 0) + 1
        if self.refs[key] == 1:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    def __init__(self, t, key, owner) -> None:
        self.t, self.key, self.owner = t, key, owner

    def __del__(self) -> None:
        self.owner.release(self.key)


def load_sentences(n: int) -> tuple[list[str], str]:
    wiki = ROOT.parent / "shared" / "data" / "wiki" / "wiki1m_for_simcse.head.txt"
    if wiki.exists():
        return wiki.read_text(encoding="utf-8").splitlines()[:n], str(wiki.name)
    return (ROOT / "configs" / "quickstart_data" / "sentences.txt").read_text().splitlines()[:n], "synthetic"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--mini", type=int, nargs="+", default=[0, 32, 16, 8], help="chunk sizes; 0 = one pass")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (rounds)")
    ap.add_argument("--out", default=None)
    add_threads(ap)
    args = parse(ap)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer

    from lightning_modules import ContrastiveModule

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    module = ContrastiveModule(args.model, pooler="mean", mlp="none", max_length=args.max_length).to(device)
    sentences, source = load_sentences(args.batch_size)
    b = module.encoder.collate(module.encoder.tokenize(sentences))
    batch = {k: v[:, None].to(device) for k, v in b.items()}  # (B, 1, L): two dropout views
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(mini: int) -> tuple[float, int, int]:
        module.mini_batch_size = mini or None
        saved = SavedTensorBytes(params)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with saved.hooks():
            with autocast:
                loss = module.training_step(batch, 0)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, saved.peak, torch.cuda.max_memory_allocated() if cuda else 0

    for mini in args.mini:  # warm-up
        step(mini)
    times = {m: [] for m in args.mini}
    saved_peak, cuda_peak = {}, {}
    for r in range(args.steps):
        for mini in args.mini if r % 2 == 0 else args.mini[::-1]:
            t, s, c = step(mini)
            times[mini].append(t)
            saved_peak[mini], cuda_peak[mini] = s, c
    base = args.mini[0]
    rows = []
    for mini in args.mini:
        rows.append({"mini_batch_size": mini or None, "median_step_s": statistics.median(times[mini]),
                     "step_s": times[mini], "saved_activation_peak_MiB": saved_peak[mini] / 2**20,
                     "cuda_max_allocated_MiB": cuda_peak[mini] / 2**20 if cuda else None,
                     "time_vs_first": statistics.median(times[mini]) / statistics.median(times[base]),
                     "activation_memory_vs_first": saved_peak[mini] / max(saved_peak[base], 1)})
    result = {
        "benchmark": "grad_cache", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(), "model": args.model, "batch_size": args.batch_size,
        "max_length": args.max_length, "padded_length": int(batch["input_ids"].shape[-1]), "data": source,
        "precision": "bf16-mixed" if cuda else "32-true", "steps": args.steps, "results": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"grad_cache-{'gpu' if cuda else 'cpu'}.json",
                     result)
    print(f"| mini_batch_size | step s (median) | x one pass | saved activations MiB | x one pass |"
          f"{' CUDA peak MiB |' if cuda else ''}\n|---|---|---|---|---|{'---|' if cuda else ''}")
    for r in rows:
        print(f"| {r['mini_batch_size'] or 'one pass'} | {r['median_step_s']:.3f} | {r['time_vs_first']:.2f} | "
              f"{r['saved_activation_peak_MiB']:.1f} | {r['activation_memory_vs_first']:.2f} |"
              + (f" {r['cuda_max_allocated_MiB']:.0f} |" if cuda else ""))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
