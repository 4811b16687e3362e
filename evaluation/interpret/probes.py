"""Supervised probes: is the universal POS tag of a token decodable from its vector, linearly or not, and from the
SAE's sparse codes? (Tehenan et al., arXiv 2506.04373, section 3; docs/methods.md 5e)

Data: the word tokens of a token-level cache that carry a universal tag (special tokens and untagged text are left
out), by default only each word's first wordpiece, so that a word counts once and its label is its own tag. Rows are
split into train and test BY SENTENCE (:func:`split_by_sentence`): no sentence has tokens on both sides, since the
tokens of one sentence share context and would leak.

Probes (both see standardised inputs: train mean and standard deviation per dimension, 1 for constant dimensions):

- ``linear``: one-vs-rest least squares with a ridge, in closed form. With Z the standardised train inputs, Y the
  one-hot labels and ybar their mean, ``W = (Z_c^T Z_c + ridge * N I)^-1 Z_c^T (Y - ybar)``; the prediction is the
  argmax of ``Z W + ybar``. Only the (D, D) Gram matrix and the (D, C) cross products are formed, accumulated in
  float64 over row chunks, so a sparse (N, F) code matrix (scipy CSR) is never made dense.
- ``mlp``: one hidden ReLU layer, softmax cross-entropy, Adam, a few epochs of shuffled mini-batches (seeded);
  a sparse input is made dense one mini-batch at a time.

Metrics on the test rows: accuracy, macro-F1 (the mean over classes present in the gold labels or the predictions
of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, as scikit-learn's ``f1_score(average='macro')``), per-class F1, and
the majority-class accuracy (the train set's most frequent tag) as the floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import sparse
from torch import nn

from datamodules.activation_cache import (
    META_FIRST_PIECE,
    META_POSITION,
    META_SENTENCE,
    META_TAG,
    SPECIAL,
    ActivationCache,
)
from datamodules.brown import UNIVERSAL_TAGS
from evaluation.interpret.codes import encode_sparse
from lightning_modules.components.sparse_coder import SparseCoder

#: Probe classes: the universal tags (tag ids of the cache's metadata).
CLASSES = UNIVERSAL_TAGS
PROBE_KINDS = ("linear", "mlp")

Inputs = np.ndarray | sparse.csr_matrix


# ------------------------------------------------------------------------------------------------ data
def probe_rows(meta: np.ndarray, pieces: str = "first") -> np.ndarray:
    """(N,) bool: rows with a universal tag (not SPECIAL, not untagged); ``pieces='first'`` keeps only each word's
    first wordpiece, ``'all'`` every piece."""
    if pieces not in ("first", "all"):
        raise ValueError(f"pieces must be 'first' or 'all', got {pieces!r}")
    tag = meta[:, META_TAG]
    keep = (tag >= 0) & (tag != SPECIAL) & (tag < len(CLASSES))
    return keep & (meta[:, META_FIRST_PIECE] == 1) if pieces == "first" else keep


def split_by_sentence(sentence_ids: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """(N,) bool test membership: a seeded random ``test_fraction`` of the distinct sentences (at least one, and at
    least one left for training) goes to test with all its rows."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = np.unique(sentence_ids)
    if len(ids) < 2:
        raise ValueError(f"a split by sentence needs at least 2 sentences, got {len(ids)}")
    n_test = min(max(int(round(test_fraction * len(ids))), 1), len(ids) - 1)
    test_ids = np.random.default_rng(seed).permutation(ids)[:n_test]
    return np.isin(sentence_ids, test_ids)


def sample_sentences(sentence_ids: np.ndarray, max_rows: int | None, seed: int = 0) -> np.ndarray:
    """(N,) bool: whole sentences in a seeded random order, each kept while it fits in ``max_rows`` rows (all rows
    when ``max_rows`` is None or not smaller than N)."""
    if max_rows is None or max_rows >= len(sentence_ids):
        return np.ones(len(sentence_ids), dtype=bool)
    ids, counts = np.unique(sentence_ids, return_counts=True)
    room, chosen = max_rows, []
    for i in np.random.default_rng(seed).permutation(len(ids)).tolist():
        if counts[i] <= room:
            chosen.append(ids[i])
            room -= int(counts[i])
    return np.isin(sentence_ids, chosen)


# --------------------------------------------------------------------------------------------- metrics
def macro_f1(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, np.ndarray]:
    """Macro-F1 over the classes present in ``gold`` or ``pred``, and the (n_classes,) per-class F1 (NaN for absent
    classes); see the module docstring."""
    conf = np.bincount(gold * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    present = (conf.sum(0) + conf.sum(1)) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)
    return (float(np.nanmean(f1)) if present.any() else 0.0), f1


@dataclass
class ProbeResult:
    """A probe's test scores (and its training set size)."""

    kind: str
    accuracy: float
    macro_f1: float
    majority_accuracy: float
    """Accuracy of always predicting the train set's most frequent tag."""
    n_train: int
    n_test: int
    n_inputs: int
    """Input dimension (D for vectors, F for SAE codes)."""
    f1_per_class: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def score(kind: str, gold: np.ndarray, pred: np.ndarray, train_labels: np.ndarray, n_inputs: int) -> ProbeResult:
    f1, per_class = macro_f1(gold, pred, len(CLASSES))
    majority = int(np.bincount(train_labels, minlength=len(CLASSES)).argmax())
    return ProbeResult(kind, float((gold == pred).mean()), f1, float((gold == majority).mean()), len(train_labels),
                       len(gold), n_inputs, {CLASSES[c]: float(v) for c, v in enumerate(per_class) if np.isfinite(v)})


# ---------------------------------------------------------------------------------------------- probes
def _chunks(X: Inputs, chunk_rows: int):
    for lo in range(0, X.shape[0], chunk_rows):
        block = X[lo : lo + chunk_rows]
        yield np.asarray(block.toarray() if sparse.issparse(block) else block, dtype=np.float64)


def standardizer(X: Inputs, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(D,) mean and (D,) standard deviation of the columns (float64; 1 where a column is constant)."""
    n, s1, s2 = X.shape[0], np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for block in _chunks(X, chunk_rows):
        s1 += block.sum(0)
        s2 += (block * block).sum(0)
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    sd = np.sqrt(var)
    return mean, np.where(sd > 1e-12 * np.maximum(np.abs(mean), 1.0), sd, 1.0)


@dataclass
class LinearProbe:
    """Ridge least squares one-vs-rest, folded into the raw inputs: ``scores = X W + b``."""

    W: np.ndarray
    """(D, C) float64."""
    b: np.ndarray
    """(C,) float64."""

    def predict(self, X: Inputs) -> np.ndarray:
        return np.asarray(X @ self.W + self.b).argmax(1)


def fit_linear(X: Inputs, y: np.ndarray, n_classes: int = len(CLASSES), ridge: float = 1e-3,
               chunk_rows: int = 16384) -> LinearProbe:
    """Closed-form ridge probe on ``X`` (an (N, D) array or a CSR matrix) and labels ``y`` (see the docstring)."""
    n, d = X.shape
    mean, sd = standardizer(X, chunk_rows)
    onehot = sparse.csr_matrix((np.ones(n), (np.arange(n), y)), shape=(n, n_classes))
    if sparse.issparse(X):
        X = X.astype(np.float64)  # scipy keeps float32 products in float32
        gram = (X.T @ X).toarray()
    else:
        gram = np.zeros((d, d))
        for block in _chunks(X, chunk_rows):
            gram += block.T @ block
    cross = onehot.T @ X  # (C, D): the sum of x over each class's rows
    cross = np.asarray(cross.toarray() if sparse.issparse(cross) else cross, dtype=np.float64).T
    ybar = np.asarray(onehot.sum(0)).ravel() / n
    gram_c = (gram - n * np.outer(mean, mean)) / np.outer(sd, sd)  # Z_c^T Z_c
    cross_c = (cross - n * np.outer(mean, ybar)) / sd[:, None]  # Z_c^T (Y - ybar)
    W_std = np.linalg.solve(gram_c + ridge * n * np.eye(d), cross_c)
    W = W_std / sd[:, None]
    return LinearProbe(W, ybar - mean @ W)


class MLPProbe(nn.Module):
    """Standardise, one hidden ReLU layer, class logits."""

    def __init__(self, mean: np.ndarray, sd: np.ndarray, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("sd", torch.as_tensor(sd, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.net((x_BD - self.mean) / self.sd)

    @torch.no_grad()
    def predict(self, X: Inputs, batch_size: int = 8192) -> np.ndarray:
        self.eval()
        return np.concatenate([self(torch.as_tensor(b, dtype=torch.float32)).argmax(1).numpy()
                               for b in _chunks(X, batch_size)]) if X.shape[0] else np.zeros(0, np.int64)


def fit_mlp(X: Inputs, y: np.ndarray, n_classes: int = len(CLASSES), hidden: int = 256, epochs: int = 5,
            batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> MLPProbe:
    """Train :class:`MLPProbe` with Adam on shuffled mini-batches (seeded: the same inputs give the same probe)."""
    mean, sd = standardizer(X)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPProbe(mean, sd, n_classes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    y_t = torch.as_tensor(y, dtype=torch.long)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen).numpy()
        for lo in range(0, len(order), batch_size):
            idx = np.sort(order[lo : lo + batch_size])  # sorted: CSR row slicing is faster; the batch is a set
            block = X[idx]
            x_BD = torch.as_tensor(block.toarray() if sparse.issparse(block) else block, dtype=torch.float32)
            loss = nn.functional.cross_entropy(model(x_BD), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def run_probes(X: Inputs, y: np.ndarray, is_test: np.ndarray, kinds: Sequence[str] = PROBE_KINDS,
               ridge: float = 1e-3, mlp: Mapping | None = None) -> dict[str, ProbeResult]:
    """Fit each probe kind on the rows where ``is_test`` is False and score it on the others."""
    unknown = [k for k in kinds if k not in PROBE_KINDS]
    if unknown:
        raise ValueError(f"unknown probe kind(s) {unknown}: choose from {list(PROBE_KINDS)}")
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    X_tr, X_te = X[train], X[test]
    out = {}
    for kind in kinds:
        probe = fit_linear(X_tr, y[train], ridge=ridge) if kind == "linear" else fit_mlp(X_tr, y[train],
                                                                                         **dict(mlp or {}))
        out[kind] = score(kind, y[test], probe.predict(X_te), y[train], X.shape[1])
    return out


def codes_matrix(sae: SparseCoder, x_ND: np.ndarray, chunk_rows: int = 4096) -> sparse.csr_matrix:
    """(N, F) CSR matrix of the SAE's inference codes of ``x_ND`` (input units)."""
    codes = encode_sparse(sae, x_ND, chunk_rows=chunk_rows)
    return sparse.csr_matrix((codes.values, (codes.rows, codes.features)), shape=(codes.n_rows, codes.n_features))


# ------------------------------------------------------------------------------------- over caches
@dataclass
class ProbeStudy:
    """Probe scores per input (a cache's name, e.g. ``layer3``, or ``sae``) and kind, on one split."""

    results: dict[str, dict[str, ProbeResult]]
    n_sentences: int
    n_train: int
    n_test: int
    settings: dict

    def to_dict(self) -> dict:
        return {"n_sentences": self.n_sentences, "n_train": self.n_train, "n_test": self.n_test,
                "settings": self.settings,
                "results": {name: {k: r.to_dict() for k, r in by_kind.items()} for name, by_kind in
                            self.results.items()}}


def probe_caches(caches: Mapping[str, ActivationCache], sae: SparseCoder | None = None, sae_input: str | None = None,
                 kinds: Sequence[str] = PROBE_KINDS, max_tokens: int | None = 100_000, test_fraction: float = 0.2,
                 seed: int = 0, pieces: str = "first", ridge: float = 1e-3, mlp: Mapping | None = None,
                 ) -> ProbeStudy:
    """Probe the POS tag from the vectors of each cache (e.g. one per layer of an encoder) on the same tokens and the
    same split, and from ``sae``'s codes of the vectors of ``caches[sae_input]``.

    The tokens are those of the sentences all the caches hold (caches of one model over one corpus, which may have
    been built over different numbers of sentences), then whole sentences drawn at random (``seed``) up to
    ``max_tokens`` probe tokens; the caches must give those sentences the same tokens (same tokenizer), else an
    error. ``mlp``: keyword arguments of :func:`fit_mlp`.
    """
    if not caches:
        raise ValueError("probe_caches needs at least one cache")
    if sae is not None and sae_input not in caches:
        raise ValueError(f"sae_input={sae_input!r} must name the cache the SAE reads, one of {list(caches)}")
    sources = {name: (c.meta.get("source") or {}).get("fingerprint") for name, c in caches.items()}
    if len(set(sources.values())) > 1:
        raise ValueError(f"the caches hold different corpora (source fingerprints {sources}); probes compare layers "
                         "over the same sentences")
    metas = {}
    for name, cache in caches.items():
        if cache.meta.get("level") != "token":
            raise ValueError(f"{cache.folder} holds {cache.meta.get('level')}-level vectors; probes need tokens")
        metas[name] = cache.metadata()
    common = None
    for meta in metas.values():
        ids = np.unique(meta[:, META_SENTENCE])
        common = ids if common is None else np.intersect1d(common, ids)
    rows, first = {}, next(iter(caches))
    for name, meta in metas.items():
        rows[name] = np.flatnonzero(probe_rows(meta, pieces) & np.isin(meta[:, META_SENTENCE], common))
    ref = metas[first][rows[first]]
    for name, meta in metas.items():
        got = meta[rows[name]]
        if len(got) != len(ref) or not np.array_equal(got[:, [META_SENTENCE, META_POSITION, META_TAG]],
                                                      ref[:, [META_SENTENCE, META_POSITION, META_TAG]]):
            raise ValueError(f"{caches[name].folder} and {caches[first].folder} tokenise the same sentences "
                             "differently: probe caches of one model (its layers)")
    if not len(ref):
        raise ValueError("no tagged word tokens to probe (a corpus with universal POS tags, e.g. Brown, is needed)")
    keep = sample_sentences(ref[:, META_SENTENCE], max_tokens, seed)
    ref = ref[keep]
    y = ref[:, META_TAG].astype(np.int64)
    is_test = split_by_sentence(ref[:, META_SENTENCE], test_fraction, seed)
    results: dict[str, dict[str, ProbeResult]] = {}
    for name, cache in caches.items():
        x_ND = cache.gather(rows[name][keep]).numpy()
        results[name] = run_probes(x_ND, y, is_test, kinds, ridge, mlp)
        if sae is not None and name == sae_input:
            results["sae"] = run_probes(codes_matrix(sae, x_ND), y, is_test, kinds, ridge, mlp)
        del x_ND
    settings = {"pieces": pieces, "max_tokens": max_tokens, "test_fraction": test_fraction, "seed": seed,
                "ridge": ridge, "mlp": dict(mlp or {}), "sae_input": sae_input}
    return ProbeStudy(results, int(len(np.unique(ref[:, META_SENTENCE]))), int((~is_test).sum()),
                      int(is_test.sum()), settings)


__all__ = ["CLASSES", "PROBE_KINDS", "LinearProbe", "MLPProbe", "ProbeResult", "ProbeStudy", "codes_matrix",
           "fit_linear", "fit_mlp", "macro_f1", "probe_caches", "probe_rows", "run_probes", "sample_sentences",
           "split_by_sentence", "standardizer"]
