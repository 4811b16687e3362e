"""Several layers' activation caches from one encoder pass against one build per layer (all-MiniLM-L6-v2, Brown).

    python benchmarks/cache_layers.py [--data_root ../shared/data] [--layers 3 4 5 6] [--max_sentences N]
                                      [--threads 2] [--out benchmarks/results/cache_layers.json]

Both sides build the token caches of ``--layers`` (the settings of configs/sae_minilm_brown_tokens.yaml: special
tokens kept, max_length 256, float16) into fresh folders, in this process, one after the other: ``separate`` with
one ``ActivationsDataModule.prepare_data`` per layer (the encoder runs once per layer), ``one_pass`` with
``datamodules.activations.prepare_layers`` (the encoder runs once for all). Every shard of the two is then checked
equal (vectors and metadata). Prints a table and writes the JSON (seconds, ratio, vectors).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_threads, parse, write_json  # noqa: E402

from datamodules.activations import ActivationsDataModule, prepare_layers  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def datamodule(layer: int, cache_dir: Path, args: argparse.Namespace) -> ActivationsDataModule:
    return ActivationsDataModule(model_name_or_path=MODEL, source="brown", data_root=args.data_root, level="token",
                                 layer=layer, special_tokens="keep", max_length=256, max_sentences=args.max_sentences,
                                 cache_dir=str(cache_dir), encode_device=args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--max_sentences", type=int, default=None, help="the first N Brown sentences (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache_layers.json"))
    add_threads(ap)
    args = parse(ap)
    with tempfile.TemporaryDirectory(prefix="cache_layers_") as tmp:
        datamodule(args.layers[0], Path(tmp) / "warm", args).corpus()  # read Brown once: the OS cache, both sides
        seconds = {}
        t = time.perf_counter()
        separate = []
        for layer in args.layers:
            dm = datamodule(layer, Path(tmp) / "separate", args)
            dm.prepare_data()
            separate.append(dm.cache_folder())
        seconds["separate"] = time.perf_counter() - t
        t = time.perf_counter()
        together = [dm.cache_folder() for dm in prepare_layers(
            [datamodule(layer, Path(tmp) / "one_pass", args) for layer in args.layers])]
        seconds["one_pass"] = time.perf_counter() - t
        equal = all(np.array_equal(np.load(f), np.load(b / f.name))
                    for a, b in zip(together, separate) for f in sorted(a.glob("shard_*.npy")))
        n_vectors = sum(len(np.load(f, mmap_mode="r")) for f in together[0].glob("shard_*.meta.npy"))
        n_sentences = sum(1 for _ in open(together[0] / "texts.jsonl"))
    result = {"model": MODEL, "layers": args.layers, "sentences": n_sentences, "vectors_per_layer": n_vectors,
              "seconds": seconds, "speedup": seconds["separate"] / seconds["one_pass"], "equal": equal,
              "threads": args.threads, "device": args.device}
    print(f"{len(args.layers)} layers x {n_vectors:,} vectors ({n_sentences:,} Brown sentences)")
    print(f"{'build':<34}{'seconds':>10}")
    print(f"{'one build per layer':<34}{seconds['separate']:>10.1f}")
    print(f"{'one pass for all layers':<34}{seconds['one_pass']:>10.1f}")
    print(f"speed-up {result['speedup']:.2f}x; caches equal vector for vector: {equal}")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
