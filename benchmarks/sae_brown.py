"""BatchTopK SAEs on all-MiniLM-L6-v2 last-layer token vectors of the Brown Corpus: FVU, L0 and dead latents.

    python benchmarks/sae_brown.py [--data_root ../shared/data] [--cache_dir DIR] [--configs 8x32,8x64,32x32,32x64]
                                   [--epochs 1] [--max_tokens N]

Data: ``ActivationsDataModule`` with the settings of configs/sae_minilm_brown_tokens.yaml (layer 6 = last, special
tokens dropped, max_length 256); 2% of the sentences (a fixed hash of the sentence id) are held out. The cache is
built on first use (one MiniLM pass over Brown) and reused.

Each configuration (dictionary expansion x k) trains an ``SAEModule`` through a Lightning ``Trainer`` (Adam, lr
``2e-4 / sqrt(F / 2^14)``, 5% warm-up, linear decay over the last 20%, batch 1024, AuxK 1/32 with k_aux = 192,
dead after 102,400 tokens = 100 steps, threshold EMA with beta 0.99 from step 50) on at most ``--max_tokens``
vectors (default 409,600: 400 steps, a third of an epoch; the budget a busy 2-core CPU allowed). Then, on the
held-out vectors with the INFERENCE threshold (not batch top-k): FVU, explained variance, L0 (mean non-zero codes
per vector), latents never active; and from training: the dead fraction by the counters (no firing in the last
``dead_after`` training tokens). Writes benchmarks/results/sae_brown.json (results are merged per configuration,
so configurations can run separately: ``--out`` files of separate runs can be merged with ``--merge``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from core.metrics import FVU, PrefixFVU  # noqa: E402
from datamodules.activations import ActivationsDataModule  # noqa: E402
from lightning_modules.sae import SAEModule  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Progress(pl.Callback):
    """Prints the step, training FVU and vectors/s every ``every`` steps (the Trainer runs without a progress bar)."""

    def __init__(self, every: int = 50) -> None:
        self.every, self.start = every, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            rate = trainer.global_step * batch.shape[0] / (time.perf_counter() - self.start)
            print(f"  step {trainer.global_step}: train FVU {float(trainer.callback_metrics['sae/fvu']):.4f}, "
                  f"{rate:.0f} vectors/s", flush=True)


@torch.no_grad()
def evaluate(module: SAEModule, dm: ActivationsDataModule) -> dict:
    """Held-out metrics with the inference threshold, accumulated exactly over all vectors."""
    sae = module.sae.eval()
    fvu = FVU(sae.cfg.d_in)
    prefix = PrefixFVU(sae.cfg.d_in, len(sae.cfg.matryoshka_widths))
    counts = torch.zeros(sae.num_latents, dtype=torch.long)
    n_active, n_rows, sq_norm = 0, 0, 0.0
    for x in dm.val_dataloader():
        out = sae(x)
        fvu.update(x, out.x_hat)
        if out.prefix_mse is not None:  # Matryoshka: each prefix's error, back in input units
            prefix.update(x, out.prefix_mse * x.shape[0] * sae.input_scale**2)
        fired = out.acts > 0  # the eval-mode threshold codes only positives; kept general
        counts += torch.bincount(out.latents[fired], minlength=sae.num_latents)
        n_active += int(fired.sum())
        n_rows += x.shape[0]
        sq_norm += float((x - out.x_hat).pow(2).sum())
    value = float(fvu.compute())
    result = {"val_vectors": n_rows, "fvu": value, "explained_variance": 1 - value, "l0": n_active / n_rows,
              "never_active_fraction": float((counts == 0).float().mean()),
              "mse_per_vector": sq_norm / n_rows}
    if sae.cfg.matryoshka_widths:
        result["prefix_fvu"] = {w: float(v) for (w, _), v in zip(sae.cfg.levels, prefix.compute())}
    return result


def run(expansion: int, k: int, dm: ActivationsDataModule, args, seed: int = 0, **module_kw) -> dict:
    """Train one SAE (``module_kw``: further BatchTopKConfig fields, e.g. Matryoshka widths) and score it held out;
    the trained module is returned under ``"module"``."""
    pl.seed_everything(seed)
    sae = dict(expansion_factor=expansion, k=k, dead_after=args.dead_after, threshold_start=args.threshold_start,
               threshold_beta=args.threshold_beta, **module_kw)
    module = SAEModule(sae=sae, seed=seed, init_samples=65536)
    steps_per_epoch = len(dm.train_rows) // dm.batch_size
    max_steps = steps_per_epoch * args.epochs
    if args.max_tokens:
        max_steps = min(max_steps, args.max_tokens // dm.batch_size)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=max_steps, max_epochs=args.epochs,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=50, callbacks=[Progress()])
    t = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t
    sae = module.sae
    result = {
        "expansion": expansion, "num_latents": sae.num_latents, "k": k, "steps": trainer.global_step,
        "train_tokens": trainer.global_step * dm.batch_size, "epochs": trainer.global_step / steps_per_epoch,
        "train_seconds": train_s, "train_vectors_per_s": trainer.global_step * dm.batch_size / train_s,
        "threshold_input_units": float(sae.threshold * sae.input_scale),
        "dead_fraction_counters": float((sae.tokens_since_fired >= sae.cfg.dead_after).float().mean()),
        "last_train_fvu": float(trainer.callback_metrics.get("sae/fvu", float("nan"))),
        "last_train_aux_loss": float(trainer.callback_metrics.get("sae/aux_loss", float("nan"))),
    }
    result.update({f"val_{k_}": v for k_, v in evaluate(module, dm).items()})
    if args.export_dir:
        from lightning_modules.export import export_sae

        export_sae(module, Path(args.export_dir) / f"minilm_brown_{expansion}x_k{k}")
    return {**result, "module": module}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache_dir", default=None, help="activation caches (default $EMBEDLAB_CACHE)")
    ap.add_argument("--configs", default="8x32,8x64,32x32,32x64", help="expansion x k pairs")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max_tokens", type=int, default=409_600, help="training vectors per config (0: no cap)")
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--dead_after", type=int, default=102_400, help="tokens; 100 steps of 1024")
    ap.add_argument("--threshold_start", type=int, default=50)
    ap.add_argument("--threshold_beta", type=float, default=0.99)
    ap.add_argument("--max_sentences", type=int, default=None, help="only the first N Brown sentences (quick checks)")
    ap.add_argument("--export_dir", default=None, help="also export each SAE (cfg.json + sae.safetensors) here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_brown.json"))
    ap.add_argument("--merge", nargs="+", default=None, help="merge the runs of these result files into --out, exit")
    args = ap.parse_args()
    if args.merge:
        merged: dict = {"runs": {}}
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            merged["data"] = part["data"]
            merged["runs"].update(part["runs"])
        write_json(args.out, merged)
        print(f"merged {len(merged['runs'])} runs into {args.out}")
        return

    dm = ActivationsDataModule(model_name_or_path=MODEL, source="brown", data_root=args.data_root, layer=-1,
                               max_length=256, cache_dir=args.cache_dir, batch_size=args.batch_size,
                               val_fraction=0.02, max_sentences=args.max_sentences)
    t = time.perf_counter()
    dm.prepare_data()
    dm.setup()
    meta = dm.cache.meta
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results["data"] = {
        "model": MODEL, "layer": meta["layer"], "source": "brown", "sentences": meta["n_sentences"],
        "vectors": meta["n_vectors"], "train_vectors": int(len(dm.train_rows)), "val_vectors": int(len(dm.val_rows)),
        "truncated_sentences": meta["truncated_sentences"], "cache_build": meta["build"],
        "cache_ready_seconds": time.perf_counter() - t, "torch_threads": torch.get_num_threads(),
    }
    results.setdefault("runs", {})
    for spec in args.configs.split(","):
        expansion, k = map(int, spec.split("x"))
        r = run(expansion, k, dm, args)
        r.pop("module")
        results["runs"][spec] = r
        write_json(out_path, results)
        print(f"{spec:>6}: F={r['num_latents']:>5} k={k:>2} tokens={r['train_tokens']:>8} ({r['epochs']:.2f} ep, "
              f"{r['train_seconds']:.0f}s) | held-out FVU {r['val_fvu']:.4f} EV {r['val_explained_variance']:.4f} "
              f"L0 {r['val_l0']:.1f} never-active {r['val_never_active_fraction']:.3f} | dead (counters) "
              f"{r['dead_fraction_counters']:.3f} threshold {r['threshold_input_units']:.4f}", flush=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
