"""Cost of the whole interpretability suite: 1M Brown tokens through a 16k-feature SAE (target: < 10 min on 2 cores).

    python benchmarks/interpret_cost.py [--data_root ../shared/data] [--tokens 1000000] [--num_latents 16384]
                                        [--sae DIR --compare_sae DIR] [--train_steps 150] [--threads 2]

Data: all-MiniLM-L6-v2 layer-6 token vectors of the Brown Corpus with [CLS]/[SEP] kept (``ActivationsDataModule``,
built on first use under $EMBEDLAB_CACHE), cut to ``--tokens`` tokens of whole sentences drawn at random.
SAEs: ``--sae`` / ``--compare_sae`` exported folders, or else two ``--num_latents`` BatchTopK SAEs (k 32, seeds 0
and 1) trained here for ``--train_steps`` steps of ``--batch_size`` vectors at ``--lr`` (not part of the
measured cost).

Measured: ``run_suite`` exactly as ``train.py interpret`` runs it (codes, POS labels, pooling decomposition,
Hungarian stability, group share, PS-Eval on the WiC dev split, the JSON files and the HTML browser), per part and
in total, against a reference run in the same process: the SAE encoder matmul alone over the same tokens (the
suite's irreducible cost), timed after the suite with the vectors read once before both.
Writes benchmarks/results/interpret_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from datamodules.activations import ActivationsDataModule  # noqa: E402
from datamodules.wic import load_wic  # noqa: E402
from evaluation.interpret.codes import read_rows  # noqa: E402
from evaluation.interpret.suite import run_suite  # noqa: E402
from lightning_modules.export import export_sae, load_sae  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TARGET_S = 600.0


def train_sae(dm: ActivationsDataModule, num_latents: int, seed: int, steps: int, lr: float, out: Path) -> Path:
    """A BatchTopK SAE trained for ``steps`` steps, exported to ``out``."""
    import pytorch_lightning as pl

    from lightning_modules.sae import SAEModule

    pl.seed_everything(seed)
    module = SAEModule(sae=dict(num_latents=num_latents, k=32, threshold_start=min(20, steps // 2),
                                dead_after=steps * dm.batch_size // 2), init_samples=8192, seed=seed, lr=lr)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    print(f"  trained SAE seed {seed}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return export_sae(module, out)


@torch.no_grad()
def bare_encode_seconds(sae, cache, chunk_rows: int = 4096) -> float:
    """Reading the vectors and the encoder matmul + ReLU alone, chunk by chunk: the suite's irreducible work."""
    start = time.perf_counter()
    for lo in range(0, len(cache), chunk_rows):
        sae.pre_acts(read_rows(cache, lo, min(lo + chunk_rows, len(cache))))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache_dir", default=None, help="activation caches (default $EMBEDLAB_CACHE)")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--num_latents", type=int, default=16384)
    ap.add_argument("--sae", default=None, help="exported SAE folder (else one is trained here)")
    ap.add_argument("--compare_sae", default=None, help="exported SAE of another seed (else one is trained here)")
    ap.add_argument("--train_steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-3, help="of the SAEs trained here (configs/sae_minilm_brown_tokens)")
    ap.add_argument("--batch_size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max_sentences", type=int, default=None, help="only the first N Brown sentences (quick checks)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "interpret_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dm = ActivationsDataModule(MODEL, source="brown", data_root=args.data_root, level="token", layer=6,
                               special_tokens="keep", max_length=256, cache_dir=args.cache_dir,
                               max_sentences=args.max_sentences, batch_size=args.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    work = Path(tempfile.mkdtemp(prefix="interpret_cost_"))
    saes = []
    for seed, given in enumerate((args.sae, args.compare_sae)):
        saes.append(Path(given) if given else train_sae(dm, args.num_latents, seed, args.train_steps, args.lr,
                                                        work / f"sae_seed{seed}"))
    sae, sae_b = load_sae(saes[0]), load_sae(saes[1])
    pairs = load_wic("dev", args.data_root)
    view = dm.cache.sample_sentences(args.tokens)

    bare_encode_seconds(sae, view)  # reads the sampled vectors once, so both timings below find them in memory
    start = time.perf_counter()
    result = run_suite(sae, dm.cache, work / "interpret", sae_b=sae_b, wic_pairs=pairs, max_tokens=args.tokens,
                       title=f"cost benchmark: {args.num_latents} features")
    total = time.perf_counter() - start
    bare = bare_encode_seconds(sae, view)
    parts = {k.rsplit("/", 1)[1]: v for k, v in result.summary.items() if k.startswith("interpret/seconds/")}
    parts["load_and_other"] = total - sum(parts.values())
    s = result.summary
    out = {
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cache": str(dm.cache.folder), "tokens": int(s["interpret/n_tokens"]),
        "num_latents": sae.num_latents, "k": sae.cfg.k, "sae": str(saes[0]), "compare_sae": str(saes[1]),
        "train_steps": None if args.sae else args.train_steps,
        "alive_share": s["interpret/alive_share"], "l0": s["interpret/l0"],
        "stability_method": s.get("interpret/stability_method"),
        "seconds": {"total": total, **parts, "reference_bare_encode": bare},
        "ratio_total_to_bare_encode": total / bare,
        "target_s": TARGET_S, "meets_target": total < TARGET_S,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "browser_mib": result.files["browser"].stat().st_size / 2**20,
        "files": {k: str(v) for k, v in result.files.items()},
    }
    write_json(args.out, out)
    print(f"\n{out['tokens']:,} tokens, {out['num_latents']} features (alive {out['alive_share']:.1%}, L0 "
          f"{out['l0']:.1f}), {out['torch_threads']} threads")
    print(f"{'part':<24}{'seconds':>10}")
    for k, v in out["seconds"].items():
        print(f"{k:<24}{v:>10.1f}")
    print(f"total / bare encode: {out['ratio_total_to_bare_encode']:.2f}x; total {total / 60:.1f} min vs target "
          f"{TARGET_S / 60:.0f} min: {'met' if out['meets_target'] else 'NOT met'}; peak RSS {out['peak_rss_gib']:.1f}"
          f" GiB; browser {out['browser_mib']:.1f} MiB -> {args.out}")


if __name__ == "__main__":
    main()
