"""MCR2 projection heads vs PCA vs truncation: compress all-MiniLM-L6-v2's 384-d embeddings to 32-256 dims.

    python benchmarks/compression.py [--data_root ../shared/data] [--dims 32 64 128 256] [--quick]

Teacher: sentence-transformers/all-MiniLM-L6-v2 (offline copy, mean pooling, 384-d). Its embeddings are computed
once per sentence and cached outside the project (``--cache_dir``; derived from licensed data, never committed).
Heads are trained directly on the cached embeddings with the same :class:`ProjectionHead` and
:func:`mcr2_loss` that :class:`~lightning_modules.MCR2Module` uses in its Trainer path (tests exercise that path).

Training sentences (all from ``--data_root``): SNLI dev+test (premise, entailment) pairs (``nli/``), the wiki
head (``wiki/``), and a category-stratified sample of the Brown Corpus for the given-labels grouping.
Groupings: ``pairs`` (each NLI pair is a 2-member group), ``kmeans`` (k-means clusters of the teacher embeddings
of wiki + NLI sentences, computed once), ``labels`` (Brown genre, 15 groups). PCA is fitted on the wiki + NLI
sentences, the same sentences the pairs and kmeans heads train on. Hyper-parameters (distillation weight, steps)
are fixed before looking at test scores; the selection column uses STS-B dev only.

Scores: Spearman x 100 of cosine similarity vs gold on STS-B dev/test and SICK-R test. Memory: float32 bytes of
one million vectors. Writes benchmarks/results/compression.json and prints one table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchmetrics.functional import spearman_corrcoef
from transformers import get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from datamodules.groups import kmeans_groups  # noqa: E402
from datamodules.nli import read_rows  # noqa: E402
from datamodules.sentences import read_sentences  # noqa: E402
from datamodules.sts import load_sts  # noqa: E402
from lightning_modules.components.encoder import Encoder  # noqa: E402
from lightning_modules.components.heads import ProjectionHead  # noqa: E402
from lightning_modules.losses.mcr2 import cosine_distillation, mcr2_loss  # noqa: E402

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
EVAL_SETS = (("stsb", "dev"), ("stsb", "test"), ("sickr", "test"))


# ------------------------------------------------------------------------------------------------ teacher cache
def embed_cached(encoder: Encoder, sentences: list[str], cache_dir: Path, name: str) -> torch.Tensor:
    """Teacher embeddings (N, 384) of ``sentences``, from ``cache_dir`` when the same sentences were embedded."""
    key = hashlib.sha256(("\n".join(sentences) + f"|{TEACHER}|{encoder.max_length}").encode()).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.safetensors"
    if path.exists():
        return load_file(path)["embeddings"]
    start = time.perf_counter()
    out = encoder.encode(sentences, batch_size=128)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": out.contiguous()}, path)
    print(f"embedded {len(sentences)} {name} sentences in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return out


def load_data(data_root: Path, brown_per_category: int, seed: int = 0) -> dict:
    """Sentences for training (pairs, wiki, Brown with labels) and the evaluation pairs."""
    pairs = read_rows("nli/snli_devtest_for_simcse.csv", ["sent0", "sent1"], str(data_root))
    wiki = read_sentences("wiki/wiki1m_for_simcse.head.txt", str(data_root), skip_empty=True)
    data = {"pairs": pairs, "wiki": wiki, "brown": None, "eval": {}}
    try:
        from datamodules.brown import read_brown

        by_cat: dict[str, list[str]] = {}
        for s in read_brown(data_root, tagset="brown"):
            by_cat.setdefault(s.category, []).append(s.text)
        rng = random.Random(seed)
        brown = []
        for cat in sorted(by_cat):
            texts = by_cat[cat]
            brown += [(t, cat) for t in rng.sample(texts, min(brown_per_category, len(texts)))]
        data["brown"] = brown
    except Exception as err:  # the labels grouping is skipped, and the table says so
        print(f"Brown Corpus unavailable ({type(err).__name__}: {err}); skipping the 'labels' grouping")
    for task, split in EVAL_SETS:
        data["eval"][f"{task}_{split}"] = load_sts(task, split, str(data_root))
    return data


def embed_all(data: dict, cache_dir: Path) -> dict:
    encoder = Encoder(TEACHER, pooler="mean", mlp="none", max_length=256)
    encoder.eval().requires_grad_(False)
    emb = {
        "pairs": embed_cached(encoder, [s for row in data["pairs"] for s in row], cache_dir, "nli_pairs"),
        "wiki": embed_cached(encoder, data["wiki"], cache_dir, "wiki"),
    }
    if data["brown"] is not None:
        emb["brown"] = embed_cached(encoder, [t for t, _ in data["brown"]], cache_dir, "brown")
    for name, pairs in data["eval"].items():
        emb[name] = (embed_cached(encoder, pairs.sentences1, cache_dir, f"{name}_1"),
                     embed_cached(encoder, pairs.sentences2, cache_dir, f"{name}_2"))
    return emb


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(project, data: dict, emb: dict) -> dict[str, float]:
    """Spearman x 100 of cosine(project(a), project(b)) vs gold, per evaluation set."""
    out = {}
    with torch.no_grad():
        for name, pairs in data["eval"].items():
            a, b = emb[name]
            cos = F.cosine_similarity(project(a), project(b), dim=-1)
            out[name] = round(float(spearman_corrcoef(cos, torch.tensor(pairs.scores)) * 100), 2)
    return out


# --------------------------------------------------------------------------------------------------- training
class Sampler:
    """Random batches of whole groups: rows of ``x_NVD`` (V sentences per row) and each sentence's group id."""

    def __init__(self, x_ND: torch.Tensor, groups: torch.Tensor | int, rows_per_batch: int, seed: int) -> None:
        self.x_ND, self.groups, self.rows = x_ND, groups, rows_per_batch
        self.V = groups if isinstance(groups, int) else 1
        self.n_rows = x_ND.shape[0] // self.V
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | int]:
        rows = torch.randint(self.n_rows, (self.rows,), generator=self.gen)
        flat = (rows[:, None] * self.V + torch.arange(self.V)).reshape(-1)
        return self.x_ND[flat], self.groups if isinstance(self.groups, int) else self.groups[flat]


def train_head(sampler: Sampler, pca_head: ProjectionHead, distill_weight: float, steps: int, lr: float,
               eps2: float, mcr2: bool = True) -> ProjectionHead:
    """A copy of the PCA head (MCR2Module's ``init: pca``) trained like MCR2Module.training_step (same head
    class, same loss, AdamW with linear decay as in EmbeddingModule). ``mcr2=False``: distillation only."""
    head = copy.deepcopy(pca_head).train()
    out_dim = head.out_dim
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    for _ in range(steps):
        x_ND, groups = sampler()
        z_NK = head(x_ND)
        if mcr2:
            loss = mcr2_loss(z_NK, groups, eps2, 1.0, x_ND, distill_weight).loss
        else:
            loss = cosine_distillation(z_NK, x_ND)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss training a {out_dim}-d head")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "embedlab" / "compression"))
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--groupings", nargs="+", default=["pairs", "kmeans", "labels"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1000, help="sentences per batch (m)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps2", type=float, default=0.5)
    ap.add_argument("--num_clusters", type=int, default=32)
    ap.add_argument("--distill_grid", type=float, nargs="+", default=[1e4, 1e5],
                    help="distillation weights tried at --select_dim per grouping; the best on STS-B dev is used")
    ap.add_argument("--select_dim", type=int, default=128)
    ap.add_argument("--brown_per_category", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: faster on a shared CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.json"))
    ap.add_argument("--embed_only", action="store_true", help="fill the teacher cache and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(Path(args.data_root), args.brown_per_category)
    emb = embed_all(data, Path(args.cache_dir))
    if args.embed_only:
        return
    pca_sentences = torch.cat([emb["pairs"], emb["wiki"]])  # the sentences the pairs / kmeans heads train on
    samplers = {}
    if "pairs" in args.groupings:
        samplers["pairs"] = Sampler(emb["pairs"], 2, args.batch // 2, seed=0)
    if "kmeans" in args.groupings:
        clusters = kmeans_groups(pca_sentences, args.num_clusters, seed=0)
        samplers["kmeans"] = Sampler(pca_sentences, clusters, args.batch, seed=0)
    if "labels" in args.groupings and data["brown"] is not None:
        names = sorted({c for _, c in data["brown"]})
        labels = torch.tensor([names.index(c) for _, c in data["brown"]])
        samplers["labels"] = Sampler(emb["brown"], labels, args.batch, seed=0)

    rows = []
    teacher = evaluate(lambda x: x, data, emb)
    teacher_dim = emb["wiki"].shape[1]
    rows.append({"dim": teacher_dim, "method": "teacher (384-d)", **teacher})

    def add(dim, method, project, **extra):
        scores = evaluate(project, data, emb)
        rows.append({"dim": dim, "method": method, **scores, **extra})
        print(f"{dim:4d} {method:38s} {scores}  {extra}", flush=True)
        return scores

    pca_heads: dict[int, ProjectionHead] = {}
    explained: dict[int, float] = {}
    for dim in sorted(set(args.dims) | {args.select_dim}):
        pca_heads[dim] = ProjectionHead(teacher_dim, dim)
        explained[dim] = round(float(pca_heads[dim].init_pca(pca_sentences)), 4)
        pca_heads[dim].eval()

    def trained(dim, grouping, weight, mcr2=True):
        start = time.perf_counter()
        head = train_head(samplers[grouping], pca_heads[dim], weight, args.steps, args.lr, args.eps2, mcr2)
        return head, round(time.perf_counter() - start, 1)

    chosen: dict[str, float] = {}
    grid_scores: dict[str, dict[str, float]] = {}
    for grouping in samplers:  # distillation weight chosen on STS-B dev, at one dimension, per grouping
        grid_scores[grouping] = {}
        for weight in args.distill_grid:
            head, secs = trained(args.select_dim, grouping, weight)
            grid_scores[grouping][f"{weight:g}"] = evaluate(head, data, emb)["stsb_dev"]
            print(f"select {grouping} distill {weight:g}: STS-B dev {grid_scores[grouping][f'{weight:g}']}",
                  flush=True)
        chosen[grouping] = float(max(grid_scores[grouping], key=grid_scores[grouping].get))

    for dim in args.dims:
        add(dim, "truncation (first k dims)", lambda x, k=dim: F.normalize(x, dim=-1)[:, :k])
        add(dim, "PCA", pca_heads[dim], explained_variance=explained[dim])
        for grouping in samplers:
            for weight in (0.0, chosen[grouping]):
                head, secs = trained(dim, grouping, weight)
                label = f"MCR2 {grouping}" + (f" + distill {weight:g}" if weight else "")
                add(dim, label, head, train_seconds=secs)
        for grouping in samplers:  # the same batches without MCR2: what the rate terms add
            head, secs = trained(dim, grouping, 0.0, mcr2=False)
            add(dim, f"ablation: distill only, {grouping} batches", head, train_seconds=secs)

    for row in rows:
        row["memory_MB_per_1M_float32"] = row["dim"] * 4
        row["stsb_test_pct_of_teacher"] = round(100 * row["stsb_test"] / teacher["stsb_test"], 1)
    report(rows, teacher, args, chosen, grid_scores)


def report(rows: list[dict], teacher: dict, args, chosen: dict, grid: dict) -> None:
    header = (f"{'dim':>4} {'method':40s} {'STS-B dev':>9} {'STS-B test':>10} {'SICK-R test':>11} "
              f"{'% teacher':>9} {'MB/1M':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['dim']:>4} {r['method']:40s} {r['stsb_dev']:>9.2f} {r['stsb_test']:>10.2f} "
                     f"{r['sickr_test']:>11.2f} {r['stsb_test_pct_of_teacher']:>9.1f} "
                     f"{r['memory_MB_per_1M_float32']:>6d}")
    verdicts = []
    for dim in args.dims:
        at = [r for r in rows if r["dim"] == dim]
        pca = next(r for r in at if r["method"] == "PCA")
        trunc = next(r for r in at if r["method"].startswith("truncation"))
        mcr2 = [r for r in at if r["method"].startswith("MCR2")]
        best = max(mcr2, key=lambda r: r["stsb_dev"])  # selected on dev, reported on test
        verdicts.append(
            f"{dim}-d: best MCR2 head on STS-B dev = {best['method']!r}: STS-B test {best['stsb_test']:.2f} vs PCA "
            f"{pca['stsb_test']:.2f} ({best['stsb_test'] - pca['stsb_test']:+.2f}), vs truncation "
            f"{trunc['stsb_test']:.2f} ({best['stsb_test'] - trunc['stsb_test']:+.2f}); SICK-R "
            f"{best['sickr_test'] - pca['sickr_test']:+.2f} vs PCA; {best['stsb_test_pct_of_teacher']:.1f}% of the "
            f"teacher's STS-B test"
        )
    text = "\n".join(lines + [""] + verdicts)
    print(text)
    result = {
        "benchmark": "compression",
        "teacher": TEACHER,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "embed_only")},
        "distill_weight_grid_stsb_dev": grid,
        "distill_weight_chosen": chosen,
        "rows": rows,
        "verdicts": verdicts,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
