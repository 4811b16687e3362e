"""Matryoshka BatchTopK vs plain BatchTopK on the same Brown layer-6 cache: reconstruction, step cost, features.

    python benchmarks/sae_matryoshka.py [--data_root ../shared/data] [--widths 0.03125 0.125 0.5 1.0]
                                        [--max_tokens 409600] [--suite_tokens 100000] [--seeds 0 1]

Data: configs/sae_minilm_brown_tokens.yaml's cache (all-MiniLM-L6-v2, hidden_states[6], [CLS]/[SEP] kept, max
length 256, 2% of the sentences held out), built on first use under $EMBEDLAB_CACHE. Both variants train with
benchmarks/sae_brown.py's ``run`` (same dictionary 8x = 3072, k 32, batch 1024, steps, learning rate, AuxK,
threshold, seeds); the Matryoshka one adds nested prefixes (``--widths``: fractions of the dictionary, equal
weights). Reported for each variant:
- held out, with the inference threshold: FVU, L0, never-active latents; Matryoshka: each prefix's FVU;
- dead fraction by the training counters;
- step cost: a training step (forward, AuxK, backward, Adam) of each variant on the same batches, alternated, after
  training (median ratio Matryoshka / plain);
- the interpretability suite (``run_suite``, as ``train.py interpret`` runs it) on ``--suite_tokens`` tokens of
  whole sentences: POS purity, pooling survival, seed stability (seed 0 vs seed 1), PS-Eval on the WiC dev split.
Writes benchmarks/results/sae_matryoshka.json and prints a side-by-side table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_json  # noqa: E402
from sae_brown import MODEL, run  # noqa: E402

from datamodules.activations import ActivationsDataModule  # noqa: E402

SUITE_KEYS = ["pos_purity_mean", "pos_purity_ge_0.8", "pooling_survival_mean", "pooling_feature_share",
              "stability_mean_cos", "pseval/specificity", "pseval/f1", "pseval/accuracy", "alive_share", "l0"]


def step_ratio(plain, nested, dm: ActivationsDataModule, rounds: int = 20) -> dict:
    """Median over alternated rounds of (Matryoshka step time / plain step time) on the same batches."""
    batches = [x for _, x in zip(range(rounds), dm.train_dataloader())]
    times: dict[str, list[float]] = {"plain": [], "matryoshka": []}
    for r, x in enumerate(batches):
        order = [("plain", plain), ("matryoshka", nested)][:: 1 if r % 2 == 0 else -1]
        for name, sae in order:
            sae.train()
            opt = torch.optim.Adam(sae.parameters(), lr=0.0)  # lr 0: the cost of a step, the weights unchanged
            t = time.perf_counter()
            out = sae(x)
            out.loss.backward()
            sae.project_decoder_grad()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
    ratios = [m / p for m, p in zip(times["matryoshka"][2:], times["plain"][2:])]  # two warm-up rounds
    return {"median_ms": {k: 1000 * statistics.median(v[2:]) for k, v in times.items()},
            "ratio_median": statistics.median(ratios)}


def suite(sae_a, sae_b, cache, wic, out_dir: Path, tokens: int) -> dict:
    from evaluation.interpret.suite import run_suite

    res = run_suite(sae_a, cache, out_dir, sae_b=sae_b, wic_pairs=wic, max_tokens=tokens, title="SAE features")
    summary = {k.removeprefix("interpret/"): v for k, v in res.summary.items() if isinstance(v, (int, float))}
    for key, value in list(summary.items()):  # PS-Eval of the cache's own layer: pseval/<layer>/<metric>
        if key.startswith("pseval/") and key.count("/") == 2:
            summary.setdefault(f"pseval/{key.rsplit('/', 1)[1]}", value)
    return {k: summary.get(k) for k in SUITE_KEYS} | {"all": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--widths", type=float, nargs="+", default=[1 / 32, 1 / 8, 1 / 2, 1.0])
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max_tokens", type=int, default=409_600, help="training vectors per SAE")
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--dead_after", type=int, default=102_400)
    ap.add_argument("--threshold_start", type=int, default=50)
    ap.add_argument("--threshold_beta", type=float, default=0.99)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--suite_tokens", type=int, default=100_000)
    ap.add_argument("--max_sentences", type=int, default=None, help="only the first N Brown sentences (quick checks)")
    ap.add_argument("--export_dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_matryoshka.json"))
    args = ap.parse_args()

    from datamodules.wic import load_wic

    dm = ActivationsDataModule(model_name_or_path=MODEL, source="brown", data_root=args.data_root, layer=-1,
                               special_tokens="keep", max_length=256, cache_dir=args.cache_dir,
                               batch_size=args.batch_size, val_fraction=0.02, max_sentences=args.max_sentences)
    dm.prepare_data()
    dm.setup()
    wic = load_wic("dev", args.data_root)
    variants = {"plain": {}, "matryoshka": {"matryoshka_widths": list(args.widths)}}
    results: dict = {"data": {"model": MODEL, "layer": dm.cache.meta["layer"], "vectors": dm.cache.meta["n_vectors"],
                              "train_vectors": int(len(dm.train_rows)), "val_vectors": int(len(dm.val_rows))},
                     "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "variants": {}}
    modules: dict = {}
    for name, kw in variants.items():
        runs = []
        for seed in args.seeds:
            print(f"== {name}, seed {seed}", flush=True)
            r = run(args.expansion, args.k, dm, args, seed=seed, **kw)
            modules[(name, seed)] = r.pop("module")
            runs.append(r)
            if args.export_dir:
                from lightning_modules.export import export_sae

                export_sae(modules[(name, seed)], Path(args.export_dir) / f"{name}_seed{seed}", overwrite=True)
        results["variants"][name] = {"runs": runs}
        write_json(args.out, results)
    s0, s1 = args.seeds
    results["step_cost"] = step_ratio(modules[("plain", s0)].sae, modules[("matryoshka", s0)].sae, dm)
    write_json(args.out, results)
    for name in variants:
        print(f"== suite: {name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results["variants"][name]["suite"] = suite(modules[(name, s0)].sae.eval(), modules[(name, s1)].sae.eval(),
                                                       dm.cache, wic, Path(tmp), args.suite_tokens)
        write_json(args.out, results)

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results["variants"][name]["runs"])

    print("\n| measure | plain | matryoshka |\n|---|---|---|")
    for key in ("val_fvu", "val_l0", "val_never_active_fraction", "dead_fraction_counters"):
        print(f"| {key} (mean of seeds) | {mean('plain', key):.4f} | {mean('matryoshka', key):.4f} |")
    prefix = results["variants"]["matryoshka"]["runs"][0].get("val_prefix_fvu", {})
    print(f"| prefix FVU (seed {s0}) | - | {', '.join(f'{w}: {v:.3f}' for w, v in prefix.items())} |")
    print(f"| step time ms (median) | {results['step_cost']['median_ms']['plain']:.1f} | "
          f"{results['step_cost']['median_ms']['matryoshka']:.1f} (x{results['step_cost']['ratio_median']:.3f}) |")
    for key in SUITE_KEYS:
        a, b = (results["variants"][n]["suite"].get(key) for n in variants)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"| suite {key} | {fmt(a)} | {fmt(b)} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
