"""Compression heads vs PCA vs truncation: all-MiniLM-L6-v2's 384-d embeddings down to 32-256 dims.

    python benchmarks/compression.py [--data_root ../shared/data] [--dims 32 64 128 256] [--seeds 0 1 2]
                                     [--threads 1]

Teacher: sentence-transformers/all-MiniLM-L6-v2 (offline copy, mean pooling, 384-d). Its embeddings are computed
once per sentence and cached outside the project (``--cache_dir``; derived from licensed data, never committed).
Heads train on the cached embeddings with the :class:`ProjectionHead`, initialisation and :func:`mcr2_loss` /
:func:`matryoshka_mcr2_loss` that :class:`~lightning_modules.MCR2Module` uses in its Trainer path (tests exercise
that path), AdamW with linear decay as in EmbeddingModule, random batches of ``--batch`` sentences.

Training sentences (unlabelled, each once): the wiki head (``wiki/``), the NLI sentences (premise, entailment,
contradiction) of the rows whose premise is NOT held out for the retrieval check, and both sentences of the STS-B
and SICK train pairs without their scores; never a dev or test split. PCA is fitted on the same sentences.

Every head starts from the better of truncation and PCA on STS-B dev (``init: best``), trains for ``--steps``
steps, is scored on STS-B dev every ``--eval_every`` steps from step 0, and the best point is kept (the checkpoint
a recipe keeps): a head never ends below its starting point on dev. Hyper-parameters are chosen on STS-B dev with
seed 0 (listwise temperature per size, MCR2 weight per size, the Matryoshka head's temperature), then every head is
trained with ``--seeds``. The MCR2 term stays in the recommended objective only if it raises the mean STS-B dev
score by more than ``--mcr2_margin``; the goals are judged on the recommended per-size head. Rows:

- ``truncation``: the first k dims of the normalised teacher embedding; ``PCA``: k leading components;
- ``MCR2 kmeans + listwise``: MCR2 (k-means groups of the training sentences) + listwise similarity distillation;
- ``ablation: listwise only``: the same head and batches without the MCR2 term;
- ``Matryoshka``: one 256-d head trained on the sum of the losses of its 32/64/128/256 prefixes (the objective
  the ablation recommends), chosen on the mean of its prefixes' STS-B dev scores, scored at each prefix.

A diagnostic closes the run: the recommended head started from PCA (seed 0), with SICK-R test recorded at each
evaluation (never used to choose anything).

Scores: Spearman x 100 of cosine vs gold on STS-B dev/test and SICK-R test; retrieval: for each held-out NLI
premise, whether its entailment is the nearest (recall@1) or among the 10 nearest (recall@10) of all distinct NLI
sentences but itself, by cosine, x 100. Memory: float32 MB per million vectors. Writes
benchmarks/results/compression.json and prints the table and the verdicts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from core.files import readable_as_umask  # noqa: E402
from core.metrics import sts_spearman  # noqa: E402
from datamodules.groups import kmeans_groups  # noqa: E402
from datamodules.nli import read_rows  # noqa: E402
from datamodules.sentences import read_sentences  # noqa: E402
from datamodules.sts import load_sts  # noqa: E402
from lightning_modules.components.encoder import Encoder  # noqa: E402
from lightning_modules.components.heads import ProjectionHead  # noqa: E402
from lightning_modules.losses.mcr2 import matryoshka_mcr2_loss, mcr2_loss  # noqa: E402

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
EVAL_SETS = (("stsb", "dev"), ("stsb", "test"), ("sickr", "test"))
NLI_FILE = "nli/snli_devtest_for_simcse.csv"
SCORES = ("stsb_dev", "stsb_test", "sickr_test", "nli_recall@1", "nli_recall@10")


# ------------------------------------------------------------------------------------------------ teacher cache
def embed_cached(encoder: Encoder | None, sentences: list[str], cache_dir: Path, name: str) -> torch.Tensor:
    """Teacher embeddings (N, 384) of ``sentences``, from ``cache_dir`` when the same sentences were embedded."""
    key = hashlib.sha256(("\n".join(sentences) + f"|{TEACHER}|256").encode()).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.safetensors"
    if path.exists():
        return load_file(path)["embeddings"]
    if encoder is None:
        encoder = Encoder(TEACHER, pooler="mean", mlp="none", max_length=256).eval().requires_grad_(False)
    start = time.perf_counter()
    out = encoder.encode(sentences, batch_size=128)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": out.contiguous()}, path)
    readable_as_umask(path)  # save_file makes it 0600
    print(f"embedded {len(sentences)} {name} sentences in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return out


def load_data(data_root: Path, cache_dir: Path, held_out_fraction: float = 0.5) -> dict:
    """Teacher embeddings of the training sentences, the evaluation pairs and the NLI retrieval check.

    The NLI premises are split once (seed 0) by premise text: the rows of a held-out premise are the retrieval
    queries and never trained on.
    """
    root = str(data_root)
    encoder = Encoder(TEACHER, pooler="mean", mlp="none", max_length=256).eval().requires_grad_(False)
    text_emb: dict[str, torch.Tensor] = {}

    def embed(name: str, sentences: list[str]) -> list[str]:
        for s, e in zip(sentences, embed_cached(encoder, sentences, cache_dir, name)):
            text_emb.setdefault(s, e)
        return sentences

    rows = read_rows(NLI_FILE, ["sent0", "sent1", "hard_neg"], root)
    embed("nli_pairs", [s for r in rows for s in r[:2]])
    embed("nli_hard_neg", [r[2] for r in rows])
    premises = sorted({r[0] for r in rows})
    random.Random(0).shuffle(premises)
    held_out = set(premises[: int(len(premises) * held_out_fraction)])
    train = embed("wiki", read_sentences("wiki/wiki1m_for_simcse.head.txt", root, skip_empty=True))
    train += [s for r in rows if r[0] not in held_out for s in r]
    for task in ("stsb", "sickr"):
        pairs = load_sts(task, "train", root)
        train += embed(f"{task}_train_1", pairs.sentences1) + embed(f"{task}_train_2", pairs.sentences2)
    train = list(dict.fromkeys(train))  # each sentence once
    data = {"train": torch.stack([text_emb[s] for s in train]), "eval": {}}
    for task, split in EVAL_SETS:
        pairs = load_sts(task, split, root)
        name = f"{task}_{split}"
        data["eval"][name] = (embed_cached(encoder, pairs.sentences1, cache_dir, f"{name}_1"),
                              embed_cached(encoder, pairs.sentences2, cache_dir, f"{name}_2"),
                              pairs.scores)
    corpus = list(dict.fromkeys(s for r in rows for s in r))
    where = {s: i for i, s in enumerate(corpus)}
    relevant: dict[str, set[int]] = {}
    for premise, entailment, _ in rows:
        if premise in held_out and entailment != premise:
            relevant.setdefault(premise, set()).add(where[entailment])
    queries = sorted(relevant)
    data["retrieval"] = {"corpus": torch.stack([text_emb[s] for s in corpus]),
                         "queries": torch.tensor([where[q] for q in queries]),
                         "relevant": [relevant[q] for q in queries]}
    data["sizes"] = {"train_sentences": len(train), "nli_rows": len(rows), "nli_held_out_premises": len(held_out),
                     "retrieval_queries": len(queries), "retrieval_corpus": len(corpus)}
    return data


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sts_score(project, pairs: tuple) -> float:
    """Spearman x 100 of cosine(project(a), project(b)) vs gold."""
    a, b, gold = pairs
    return round(sts_spearman(project(a), project(b), gold), 2)


def recall_at(project, retrieval: dict, ks: tuple[int, ...] = (1, 10), chunk: int = 512) -> dict[str, float]:
    """Recall@k x 100 of each query's entailment among all corpus sentences but the query itself (cosine)."""
    corpus_ND = F.normalize(project(retrieval["corpus"]), dim=-1)
    hits = {k: 0 for k in ks}
    queries = retrieval["queries"]
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sims = corpus_ND[q] @ corpus_ND.T
        sims[torch.arange(len(q)), q] = float("-inf")
        top = sims.topk(max(ks), dim=-1).indices.tolist()
        for row, rel in zip(top, retrieval["relevant"][start:start + chunk]):
            for k in ks:
                hits[k] += bool(rel.intersection(row[:k]))
    return {f"nli_recall@{k}": round(100 * hits[k] / len(queries), 2) for k in ks}


def evaluate(project, data: dict) -> dict[str, float]:
    """STS-B dev/test and SICK-R test Spearman x 100, and the NLI retrieval recalls, of ``project``."""
    with torch.no_grad():
        out = {name: sts_score(project, pairs) for name, pairs in data["eval"].items()}
        out.update(recall_at(project, data["retrieval"]))
    return out


def prefix(head: ProjectionHead, k: int):
    return lambda x: head(x)[:, :k]


# --------------------------------------------------------------------------------------------------- training
def initial_head(x_ND: torch.Tensor, out_dim: int, dims: list[int], dev: tuple) -> tuple[ProjectionHead, dict]:
    """MCR2Module's ``init: best``: truncation or PCA, whichever scores higher on STS-B dev (mean over ``dims``)."""
    candidates = {}
    for name in ("truncation", "pca"):
        head = ProjectionHead(x_ND.shape[1], out_dim)
        if name == "truncation":
            head.init_truncation()
        else:
            head.init_pca(x_ND)
        candidates[name] = head.eval()
    scores = {name: statistics.mean(sts_score(prefix(h, k), dev) for k in dims) for name, h in candidates.items()}
    choice = max(scores, key=scores.get)
    return candidates[choice], {"init": choice, "init_dev_scores": scores}


def train_head(init: ProjectionHead, x_ND: torch.Tensor, clusters_N: torch.Tensor, dev: tuple, *, steps: int,
               batch: int, lr: float, temperature: float, mcr2_weight: float, seed: int, eval_every: int,
               dims: list[int] | None = None, eps2: float = 0.5,
               record: dict[str, tuple] | None = None) -> tuple[ProjectionHead, dict]:
    """A copy of ``init`` trained like MCR2Module.training_step; the best point on STS-B dev, evaluated every
    ``eval_every`` steps from step 0, is returned: the checkpoint the recipes keep (their STSEvaluator scores a
    Matryoshka head by the mean over its ``dims`` prefixes). ``record``: more pairs scored at each evaluation, kept
    in ``info["curve"]`` with the dev score (a diagnostic: never used to choose)."""
    head = copy.deepcopy(init).train()
    sizes = dims or [head.out_dim]

    def dev_score(h: ProjectionHead) -> float:
        return round(statistics.mean(sts_score(prefix(h, k), dev) for k in sizes), 3)

    def point(step: int, rho: float) -> dict:
        return {"step": step, "stsb_dev": rho, **{n: sts_score(head, pairs) for n, pairs in (record or {}).items()}}

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    gen = torch.Generator().manual_seed(seed)
    terms = dict(eps2=eps2, gamma=1.0, listwise_weight=1.0, temperature=temperature, mcr2_weight=mcr2_weight)
    with torch.no_grad():
        best = (dev_score(head), 0, copy.deepcopy(head.state_dict()))
    curve = [point(0, best[0])] if record else []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randint(x_ND.shape[0], (batch,), generator=gen)
        x_BD = x_ND[rows]
        groups = clusters_N[rows] if mcr2_weight else 1
        z_BK = head(x_BD)
        if dims:
            loss = matryoshka_mcr2_loss(z_BK, groups, dims, teacher_MD=x_BD, **terms).loss
        else:
            loss = mcr2_loss(z_BK, groups, teacher_MD=x_BD, **terms).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step} training a {head.out_dim}-d head")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0:
            with torch.no_grad():
                head.eval()
                rho = dev_score(head)
                if record:
                    curve.append(point(step, rho))
                head.train()
            if rho > best[0]:
                best = (rho, step, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    info = {"best_step": best[1], "train_seconds": round(time.perf_counter() - start, 1)}
    return head.eval(), {**info, "curve": curve} if record else info


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation of each score over seeds, with the per-seed values."""
    out = {}
    for key in SCORES:
        values = [r[key] for r in runs]
        out[key] = round(statistics.mean(values), 2)
        out[f"{key}_sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    out["seeds"] = runs
    return out


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "embedlab" / "compression"))
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1000, help="sentences per batch (m)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--num_clusters", type=int, default=32)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.05, 0.1],
                    help="listwise temperatures tried per size (seed 0); the best on STS-B dev is used")
    ap.add_argument("--mcr2_weights", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                    help="MCR2 weights tried per size (seed 0, listwise weight 1); the best on STS-B dev is used")
    ap.add_argument("--mcr2_margin", type=float, default=0.1,
                    help="the MCR2 term is kept in the recommended objective (the Matryoshka head's) only if it "
                         "raises the mean STS-B dev score over sizes and seeds by more than this")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: faster on a shared CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.json"))
    ap.add_argument("--embed_only", action="store_true", help="fill the teacher cache and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    data = load_data(Path(args.data_root), Path(args.cache_dir))
    if args.embed_only:
        return
    x_ND, dev = data["train"], data["eval"]["stsb_dev"]
    print(f"{data['sizes']}", flush=True)
    clusters_N = kmeans_groups(x_ND, args.num_clusters, seed=0)
    common = dict(steps=args.steps, batch=args.batch, lr=args.lr, eval_every=args.eval_every)

    def train(init, temperature, mcr2_weight, seed, dims=None):
        return train_head(init, x_ND, clusters_N, dev, temperature=temperature, mcr2_weight=mcr2_weight, seed=seed,
                          dims=dims, **common)

    rows: list[dict] = []

    def add(dim: int, method: str, scores: dict, **extra) -> None:
        rows.append({"dim": dim, "method": method, **scores, **extra})
        shown = {k: scores[k] for k in SCORES}
        print(f"{dim:4d} {method:34s} {shown}", flush=True)

    teacher = evaluate(lambda x: x, data)
    add(x_ND.shape[1], "teacher (384-d)", teacher)
    inits, selection = {}, {}
    for dim in args.dims:
        add(dim, "truncation (first k dims)", evaluate(lambda x, k=dim: F.normalize(x, dim=-1)[:, :k], data))
        pca = ProjectionHead(x_ND.shape[1], dim)
        explained = float(pca.init_pca(x_ND))
        add(dim, "PCA", evaluate(pca.eval(), data), explained_variance=round(explained, 4))
        inits[dim], chosen = initial_head(x_ND, dim, [dim], dev)
        # hyper-parameters on STS-B dev, seed 0: the temperature on the listwise-only head, then the MCR2 weight
        grid_t = {t: sts_score(train(inits[dim], t, 0.0, 0)[0], dev) for t in args.temperatures}
        temperature = max(grid_t, key=grid_t.get)
        grid_w = {w: sts_score(train(inits[dim], temperature, w, 0)[0], dev) for w in args.mcr2_weights}
        selection[dim] = {**chosen, "temperature_grid": grid_t, "temperature": temperature,
                          "mcr2_weight_grid": grid_w, "mcr2_weight": max(grid_w, key=grid_w.get)}
        print(f"{dim}-d selection on STS-B dev: {selection[dim]}", flush=True)
        for method, weight in (("MCR2 kmeans + listwise", selection[dim]["mcr2_weight"]),
                               ("ablation: listwise only", 0.0)):
            runs = []
            for seed in args.seeds:
                head, info = train(inits[dim], temperature, weight, seed)
                runs.append({"seed": seed, **evaluate(head, data), **info})
            add(dim, method, summarise(runs), mcr2_weight=weight, temperature=temperature, init=chosen["init"])

    # the recommended objective: the MCR2 term only if it helped on dev
    gains = []
    for dim in args.dims:
        at = {r["method"]: r for r in rows if r["dim"] == dim}
        gains.append(at["MCR2 kmeans + listwise"]["stsb_dev"] - at["ablation: listwise only"]["stsb_dev"])
    mcr2_gain = round(statistics.mean(gains), 3)
    keep_mcr2 = mcr2_gain > args.mcr2_margin
    recommended = "MCR2 kmeans + listwise" if keep_mcr2 else "ablation: listwise only"
    matryoshka = {"dims": sorted(args.dims), "mcr2_dev_gain": mcr2_gain, "mcr2_kept": keep_mcr2,
                  "recommended_per_size_head": recommended}
    dims = sorted(args.dims)
    weight = statistics.median(selection[d]["mcr2_weight"] for d in dims) if keep_mcr2 else 0.0
    init, chosen = initial_head(x_ND, dims[-1], dims, dev)
    grid_t = {}
    for t in args.temperatures:  # chosen like the per-size heads, on the mean of the prefixes' STS-B dev
        head = train(init, t, weight, 0, dims)[0]
        grid_t[t] = round(statistics.mean(sts_score(prefix(head, k), dev) for k in dims), 3)
    temperature = max(grid_t, key=grid_t.get)
    matryoshka.update(chosen, temperature_grid=grid_t, temperature=temperature, mcr2_weight=weight)
    print(f"Matryoshka: {matryoshka}", flush=True)
    runs: dict[int, list[dict]] = {k: [] for k in dims}
    for seed in args.seeds:
        head, info = train(init, temperature, weight, seed, dims)
        for k in dims:
            runs[k].append({"seed": seed, **evaluate(prefix(head, k), data), **info})
    for k in dims:
        add(k, f"Matryoshka {dims[-1]}-d head, first {k}", summarise(runs[k]), mcr2_weight=weight,
            temperature=temperature, init=chosen["init"])

    # diagnostic for SICK-R: the recommended head started from PCA instead (seed 0), SICK-R test recorded along the
    # way (never used to choose anything)
    diagnostic = {}
    for dim in args.dims:
        pca = ProjectionHead(x_ND.shape[1], dim)
        pca.init_pca(x_ND)
        sel = selection[dim]
        head, info = train_head(pca.eval(), x_ND, clusters_N, dev, temperature=sel["temperature"],
                                mcr2_weight=sel["mcr2_weight"] if keep_mcr2 else 0.0, seed=0,
                                record={"sickr_test": data["eval"]["sickr_test"]}, **common)
        diagnostic[dim] = {"selected": evaluate(head, data), **info}
        print(f"{dim}-d from PCA (diagnostic): {diagnostic[dim]['selected']}", flush=True)

    for row in rows:
        row["memory_MB_per_1M_float32"] = row["dim"] * 4
        row["stsb_test_pct_of_teacher"] = round(100 * row["stsb_test"] / teacher["stsb_test"], 1)
    report(rows, teacher, args, data["sizes"], selection, matryoshka, diagnostic, round(time.perf_counter() - began))


def fmt(row: dict, key: str) -> str:
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.2f}" + (f" ±{sd:.2f}" if sd is not None else "")


def verdicts(rows: list[dict], teacher: dict, dims: list[int], matryoshka: dict) -> list[str]:
    """Each goal of the issue, met or not, with the numbers."""
    out = []
    for dim in dims:
        at = {r["method"]: r for r in rows if r["dim"] == dim}
        best = at[matryoshka["recommended_per_size_head"]]  # the objective the ablation chose on dev
        base = [at["truncation (first k dims)"], at["PCA"]]
        parts = []
        for key, name in (("stsb_test", "STS-B test"), ("sickr_test", "SICK-R test")):
            bar = max(b[key] for b in base)
            ok = best[key] >= bar
            parts.append(f"{name} {best[key]:.2f} vs max(truncation, PCA) {bar:.2f} ({best[key] - bar:+.2f}): "
                         f"{'met' if ok else 'NOT met'}")
        out.append(f"{dim}-d: recommended head ({best['method']}): " + "; ".join(parts))
        if dim == 128:
            pct = 100 * best["stsb_test"] / teacher["stsb_test"]
            out.append(f"128-d: {pct:.2f}% of the teacher's STS-B test (goal >= 99%): "
                       f"{'met' if pct >= 99 else 'NOT met'}")
        mat = next((r for m, r in at.items() if m.startswith("Matryoshka")), None)
        if mat is not None:
            gaps = {key: mat[key] - best[key] for key in ("stsb_test", "sickr_test")}
            ok = all(g >= -0.5 for g in gaps.values())
            out.append(f"{dim}-d: Matryoshka prefix - per-size head: STS-B test {gaps['stsb_test']:+.2f}, SICK-R test "
                       f"{gaps['sickr_test']:+.2f} (goal: within 0.5): {'met' if ok else 'NOT met'}")
    out.append(f"MCR2 term: mean STS-B dev gain over the listwise-only ablation {matryoshka['mcr2_dev_gain']:+.3f} "
               f"-> {'kept' if matryoshka['mcr2_kept'] else 'dropped'} in the recommended objective")
    return out


def report(rows: list[dict], teacher: dict, args, sizes: dict, selection: dict, matryoshka: dict,
           diagnostic: dict, seconds: int) -> None:
    header = (f"{'dim':>4} {'method':34s} {'STS-B dev':>12} {'STS-B test':>12} {'SICK-R test':>12} "
              f"{'NLI R@1':>12} {'NLI R@10':>12} {'% teacher':>9} {'MB/1M':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = " ".join(f"{fmt(r, k):>12}" for k in SCORES)
        lines.append(f"{r['dim']:>4} {r['method']:34s} {cells} {r['stsb_test_pct_of_teacher']:>9.1f} "
                     f"{r['memory_MB_per_1M_float32']:>6d}")
    verdict = verdicts(rows, teacher, args.dims, matryoshka)
    for dim, d in diagnostic.items():
        start, sel = d["curve"][0], d["selected"]
        verdict.append(f"{dim}-d diagnostic, the same head from PCA (seed 0): STS-B dev {start['stsb_dev']:.2f} -> "
                       f"{sel['stsb_dev']:.2f} (step {d['best_step']}), SICK-R test {start['sickr_test']:.2f} -> "
                       f"{sel['sickr_test']:.2f}; the teacher's SICK-R test is {teacher['sickr_test']:.2f}")
    print("\n".join(lines + [""] + verdict))
    result = {
        "benchmark": "compression",
        "teacher": TEACHER,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "embed_only", "data_root")},
        "data": {**sizes, "training_sentences": "wiki head + NLI rows of non-held-out premises (3 sentences each) + "
                                                "STS-B train + SICK train sentences (no scores), each once"},
        "selection_stsb_dev_seed0": selection,
        "matryoshka": matryoshka,
        "rows": rows,
        "diagnostic_pca_init_seed0": diagnostic,
        "verdicts": verdict,
        "seconds": seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(args.out, result)
    print(f"wrote {args.out} ({seconds} s)")


if __name__ == "__main__":
    main()
