"""Model FLOPs utilisation (MFU) of the unsupervised SimCSE training step on a BERT-base-sized encoder.

    python benchmarks/mfu.py [--batch_sizes 64 512] [--max_length 32] [--steps 5] [--warmup 2] [--compile]
    python benchmarks/mfu.py --layers 2 --batch_sizes 8 --steps 1   # a quick check of the script itself
    python benchmarks/mfu.py --profile    # also where a step's time goes (torch.profiler, 3 steps a batch size)

The encoder is ``BertConfig()`` (12 layers, hidden 768, FFN 3072, 12 heads; ``--layers`` / ``--hidden`` shrink it)
with random weights, written to a temporary folder with a synthetic 30,522-token vocabulary: nothing is
downloaded. The step is ContrastiveModule's (``pooler: cls``, MLP head in training, two dropout views per
sentence, in-batch negatives): ``training_step`` + backward + AdamW step, on full-length rows (every sentence
``max_length`` tokens, so every token is real). On CUDA: bf16 autocast and SDPA attention (and ``torch.compile``
with ``--compile``), timed with synchronisation; on CPU: float32.

FLOPs per step, counted analytically (the PaLM appendix B convention; multiply-add = 2 FLOPs, backward = 2 x
forward, so training = 3 x forward):

    T      = B * V * L                   tokens encoded (V = 2 views of each of B sentences, L = max_length)
    dense  = 6 * P_layers * T            P_layers: the weight matrices of the transformer layers, i.e. the
                                          non-embedding parameters less biases and LayerNorm (0.1% of them);
                                          embeddings are lookups, not matmuls
    attn   = 12 * n_layers * L * d * T   Q K^T and (softmax) V: 2 * 2 * L * d forward FLOPs per token per layer
    head   = 6 * P_head * B * V          the MLP head (its d x d weight) on each pooled [CLS] vector
    loss   = 6 * B * B * d               the (B, B) cosine logits
    FLOPs  = dense + attn + head + loss

Not counted (not matmuls, well under 1% together): biases, LayerNorm, softmax, GELU, dropout, the embedding
sums, the optimiser. The count equals ``torch.utils.flop_counter.FlopCounterMode``'s for the same step
(tests/test_benchmarks.py). MFU = FLOPs / step time / peak, with the peak dense bf16 throughput of the device
(table below; ``--peak_tflops`` overrides). On CPU (no such peak here) the achieved FLOP/s is reported alone.
With ``--profile`` each batch size also gets 3 steps under ``torch.profiler``: the device's time per step split into
matmuls, attention, the optimiser and the rest (elementwise, reductions, copies), by the aten op each kernel ran
under, and the host gap (wall time per step minus the device's busy time: where the GPU waited for the host). On a
CPU the split is of the CPU's own time. Writes JSON (default benchmarks/results/mfu-<device>.json) and prints tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_threads, parse, write_json, write_random_bert  # noqa: E402

#: Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets; matched in this order against
#: ``torch.cuda.get_device_name()`` (all words of a key must occur in it).
PEAK_BF16_DENSE = [
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),  # SXM4 and PCIe alike
]


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_DENSE:
        if all(word in device_name for word in key.split()):
            return peak
    return None


def step_flops(module, B: int, L: int, views: int = 2) -> dict[str, float]:
    model, cfg = module.encoder.model, module.encoder.model.config
    # matmul weights only: biases and LayerNorm (0.1% of BERT-base's layer parameters) are not matmuls
    p_layers = sum(p.numel() for p in model.encoder.parameters() if p.dim() == 2)
    p_head = sum(p.numel() for p in module.encoder.mlp.parameters() if p.dim() == 2) if module.encoder.mlp else 0
    T, d, n = B * views * L, cfg.hidden_size, cfg.num_hidden_layers
    parts = {"dense": 6 * p_layers * T, "attention": 12 * n * L * d * T, "head": 6 * p_head * B * views,
             "loss": 6 * B * B * d}
    return {**parts, "total": sum(parts.values()), "params_layers": p_layers, "tokens": T}


#: aten op name fragments of each category of :func:`profile_step` (first match wins; the rest is "other")
CATEGORIES = [("attention", ("attention", "sdpa", "_flash", "_efficient")),
              ("optimizer", ("adam", "_foreach", "_fused")),
              ("matmul", ("mm", "matmul", "linear", "baddbmm", "addmm"))]


def profile_step(step, steps: int, cuda: bool) -> dict[str, float]:
    """Milliseconds per step by category (see :data:`CATEGORIES`), the device's busy time and the host gap."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    ms = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        name = event.key.lower()
        if not name.startswith("aten::") and not cuda:
            continue  # on the CPU: the ops' own time, not the Python frames around them
        category = next((c for c, parts in CATEGORIES if any(part in name for part in parts)), "other")
        ms[category] += us / 1000 / steps
    busy = sum(ms.values())
    return {**ms, "busy": busy, "wall": wall * 1000 / steps, "host_gap": max(wall * 1000 / steps - busy, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--hidden", type=int, default=None, help="another hidden size (smoke runs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, if not in the table")
    ap.add_argument("--profile", action="store_true", help="also split a step's time with torch.profiler")
    ap.add_argument("--out", default=None)
    add_threads(ap)
    args = parse(ap)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer

    from lightning_modules import ContrastiveModule

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if cuda else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = write_random_bert(Path(tmp), args.layers, args.hidden)
        module = ContrastiveModule(tmp, pooler="cls", mlp="train_only", max_length=args.max_length,
                                   attn_implementation="sdpa", compile=args.compile and cuda).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(5, config.vocab_size, (B, 1, args.max_length), generator=g)
        ids[..., 0], ids[..., -1] = 2, 3  # [CLS] ... [SEP]
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        times = []

        def step() -> None:
            with autocast:
                loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        flops = step_flops(module, B, args.max_length)
        step_s = statistics.median(times)
        achieved = flops["total"] / step_s
        rows.append({"batch_size": B, "median_step_s": step_s, "step_s": times, "flops_per_step": flops,
                     "achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
                     "sentences_per_s": B / step_s})
        if args.profile:
            rows[-1]["profile_ms_per_step"] = profile_step(step, 3, cuda)
        print(f"batch {B}: {step_s * 1000:.1f} ms/step, {achieved / 1e12:.2f} TFLOP/s"
              + (f", MFU {achieved / peak:.1%}" if peak else ""), flush=True)
    result = {"benchmark": "mfu", "device": name, "peak_bf16_dense_tflops": peak / 1e12 if peak else None,
              "precision": "bf16-mixed" if cuda else "32-true", "attn_implementation": "sdpa",
              "compile": bool(args.compile and cuda), "torch_threads": torch.get_num_threads(),
              "encoder": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                          "ffn": config.intermediate_size, "heads": config.num_attention_heads},
              "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup, "results": rows,
              "flops_formula": "6*P_layers*T + 12*n_layers*L*d*T + 6*P_head*B*V + 6*B*B*d, T = B*V*L, V = 2",
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"mfu-{'gpu' if cuda else 'cpu'}.json", result)
    print("\n| batch | step ms | sentences/s | GFLOP/step | achieved TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "- (no peak on CPU)"
        print(f"| {r['batch_size']} | {r['median_step_s'] * 1000:.1f} | {r['sentences_per_s']:.1f} | "
              f"{r['flops_per_step']['total'] / 1e9:.1f} | {r['achieved_tflops']:.3f} | {mfu} |")
    if args.profile:
        names = [c for c, _ in CATEGORIES] + ["other", "host_gap"]
        print(f"\n| batch | {' | '.join(names)} | wall |\n|{'---|' * (len(names) + 2)}")
        for r in rows:
            p = r["profile_ms_per_step"]
            print(f"| {r['batch_size']} | " + " | ".join(f"{p[n]:.1f} ms" for n in names) + f" | {p['wall']:.1f} ms |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
