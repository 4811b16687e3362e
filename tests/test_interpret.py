"""Interpretability suite: each function against a plain loop written from its formula on tiny random inputs (d = 6,
F = 8, a dozen sentences), the pooling identity, Hungarian matching of a permuted decoder, and the whole report on a
tiny BERT over a handmade Brown corpus."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mini_brown import write_two_genres

from datamodules.activation_cache import META_COLUMNS, POS_TAGS, SPECIAL, ActivationCache
from datamodules.activations import ActivationsDataModule
from evaluation.interpret.codes import SparseCodes, encode_sparse
from evaluation.interpret.pooling import decompose_sentence, pooling_contributions
from evaluation.interpret.pos import TAGS, Context, label_features, purity_summary
from evaluation.interpret.report import context_tokens, interpret_sae
from evaluation.interpret.stability import (
    brown_groups,
    energy_deciles,
    group_share,
    group_share_summary,
    match_decoders,
    stability_by_decile,
)
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE
from lightning_modules.components.sparse_coder import SparseCoder, eval_mode, input_dim

VOCAB = [("The", "DET"), ("the", "DET"), ("dog", "NOUN"), ("Dog", "NOUN"), ("runs", "VERB"), ("fast", "ADV"),
         ("red", "ADJ"), ("in", "ADP"), ("and", "CONJ"), ("it", "PRON"), ("two", "NUM"), (".", ".")]


def random_sae(d: int = 6, n: int = 8, seed: int = 0, scale: float = 1.7, threshold: float = 0.5) -> BatchTopKSAE:
    """Random encoder and biases, unit decoder rows, input scale != 1, threshold set, eval mode."""
    torch.manual_seed(seed)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=d, num_latents=n, k=2, normalize_input=False, b_dec_init="zeros"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d))
        sae.b_enc.copy_(0.1 * torch.randn(n))
        sae.b_dec.copy_(0.3 * torch.randn(d))
        sae.input_scale.fill_(scale)
        sae.threshold.fill_(threshold)
    return sae.eval()


def random_corpus(n_sent: int, seed: int = 0, keep_special: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Metadata rows (META_COLUMNS) of Brown-like sentences: [CLS], words of 1 or 2 pieces, [SEP]."""
    rng = np.random.default_rng(seed)
    rows, sentences = [], []
    for s in range(n_sent):
        picks = rng.integers(0, len(VOCAB), rng.integers(2, 6))
        words, tags = [VOCAB[p][0] for p in picks], [VOCAB[p][1] for p in picks]
        sentences.append({"id": s, "text": " ".join(words), "words": words, "tags": tags,
                          "category": ("news", "fiction", "romance")[s % 3]})
        toks = [(2, -1, SPECIAL, 0)]
        for w, p in enumerate(picks):
            toks += [(10 + 2 * p + piece, w, POS_TAGS.index(tags[w]), int(piece == 0))
                     for piece in range(rng.integers(1, 3))]
        toks.append((3, -1, SPECIAL, 0))
        rows += [(s, pos, tok, w, tag, first) for pos, (tok, w, tag, first) in enumerate(toks)
                 if keep_special or tag != SPECIAL]
    return np.asarray(rows, dtype=np.int32), sentences


def write_cache(folder: Path, vectors: np.ndarray, meta: np.ndarray, sentences: list[dict],
                special_tokens: str = "keep", cuts: tuple[int, ...] = ()) -> ActivationCache:
    """An ActivationCache folder in the real layout, shards split at rows ``cuts``."""
    folder.mkdir(parents=True)
    bounds = [0, *cuts, len(vectors)]
    shards = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(folder / f"shard_{i:05d}.vectors.npy", vectors[lo:hi].astype(np.float16))
        np.save(folder / f"shard_{i:05d}.meta.npy", meta[lo:hi])
        shards.append({"name": f"shard_{i:05d}", "n_vectors": hi - lo})
    (folder / "texts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sentences))
    info = {"level": "token", "special_tokens": special_tokens, "text_prefix": "", "dim": vectors.shape[1],
            "n_vectors": len(vectors), "shards": shards, "columns": list(META_COLUMNS)}
    (folder / "meta.json").write_text(json.dumps(info))
    return ActivationCache(folder)


def codes_of(dense: np.ndarray, meta: np.ndarray | None = None) -> SparseCodes:
    """SparseCodes of a dense matrix (statistics unused by the tests that build them this way)."""
    rows, feats = np.nonzero(dense)
    n, f = dense.shape
    return SparseCodes(rows.astype(np.int64), feats.astype(np.int32), dense[rows, feats].astype(np.float32), n, f,
                       (dense > 0).sum(0), dense.mean(0), np.ones(2, np.float32), np.zeros((f, 1), np.int64), 0, meta)


# ------------------------------------------------------------------------------------------------- codes
def test_streamed_codes_equal_a_dense_encode_and_stats_equal_loops(tmp_path):
    sae = random_sae()
    x = (2 * torch.randn(37, 6, generator=torch.Generator().manual_seed(1))).half().float()  # exact in float16
    meta, _ = random_corpus(1)
    meta = np.repeat(meta[:1], 37, axis=0)
    dense = sae.encode(x).numpy()
    assert 0.1 < (dense > 0).mean() < 0.9  # the threshold keeps some codes, drops others
    vals = np.sort(encode_sparse(sae, x.numpy(), chunk_rows=7).values)  # streamed values: edges hit exactly
    edges = vals[[1, len(vals) // 4, len(vals) // 2, 3 * len(vals) // 4, -2]]  # codes on the edges; 2 outside
    cache = write_cache(tmp_path / "c", x.numpy(), meta, [{"id": 0, "text": ""}], cuts=(10, 11))
    sources = {"array": x.numpy(), "cache": cache, "chunks": [(x[:20], meta[:20]), (x[20:].numpy(), meta[20:])]}
    for name, source in sources.items():
        codes = encode_sparse(sae, source, chunk_rows=7, edges=edges)
        np.testing.assert_allclose(codes.dense(), dense, rtol=1e-6, atol=1e-6, err_msg=name)
        got = codes.dense()  # the statistics against loops over the streamed values (equal to dense up to BLAS ulps)
        assert (np.diff(codes.rows) >= 0).all() and codes.n_rows == 37 and codes.features.dtype == np.int32
        assert (codes.meta is None) == (name == "array")
        np.testing.assert_array_equal(codes.fires, [sum(got[r, f] > 0 for r in range(37)) for f in range(8)])
        np.testing.assert_allclose(codes.energy, [sum(got[r, f] for r in range(37)) / 37 for f in range(8)],
                                   rtol=1e-5)
        want = np.zeros((8, 4), dtype=np.int64)
        for r in range(37):
            for f in range(8):
                if got[r, f] > 0:  # bin j: edges[j] <= v < edges[j + 1], outside values in the end bins
                    want[f, min(max(sum(got[r, f] >= e for e in edges[1:-1]), 0), 3)] += 1
        np.testing.assert_array_equal(codes.hist_counts, want, err_msg=name)
        assert codes.n_clipped == int(((got > edges[-1]) | ((got > 0) & (got < edges[0]))).sum()) >= 2
    auto = encode_sparse(sae, x.numpy(), chunk_rows=64, n_bins=5)
    assert auto.hist_edges[0] == pytest.approx(0.5 * 1.7) and len(auto.hist_edges) == 6 and auto.n_clipped == 0
    np.testing.assert_array_equal(auto.hist_counts.sum(1), auto.fires)


def test_codes_need_an_inference_threshold():
    sae = random_sae(threshold=-1.0)
    with pytest.raises(ValueError, match="no inference threshold"):
        encode_sparse(sae, np.zeros((3, 6), np.float32))


# --------------------------------------------------------------------------------------------------- POS
class AxesCoder(torch.nn.Module):
    """A :class:`SparseCoder` written by hand, no BatchTopK in it: the dictionary is the two axes of the plane and
    their diagonal, the pre-activations ``relu((x / s - b_dec) W_dec^T)`` (normalised units), threshold 0.5."""

    def __init__(self, input_scale: float = 1.0, b_dec: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        r = 0.5**0.5
        self.W_dec = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r]]), requires_grad=False)
        self.register_buffer("b_dec", torch.tensor(b_dec))
        self.register_buffer("input_scale", torch.tensor(input_scale))
        self.register_buffer("threshold", torch.tensor(0.5))

    @property
    def num_latents(self) -> int:
        return self.W_dec.shape[0]

    def pre_acts(self, x_BD):
        return torch.relu((x_BD.to(self.W_dec) / self.input_scale - self.b_dec) @ self.W_dec.t())

    def encode(self, x_BD):
        pre_BF = self.pre_acts(x_BD)
        return pre_BF * (pre_BF > self.threshold) * self.input_scale

    def decode(self, codes_BF):
        return codes_BF @ self.W_dec + self.b_dec * self.input_scale


R2 = 2**0.5


@pytest.mark.parametrize("scale, bias, x, codes, contribution, error", [
    # pre-activations (2, 0, r2); (0, 0.3, 0.21): all under 0.5; (1, 1, r2). Tokens (2, 0) and (1, 1): mean code
    # (1.5, 0.5, r2), pooled v = (1.5, 0.5), c_i = zbar_i (d_i . v); each token decodes to itself plus (1, 1)
    (1.0, (0.0, 0.0), [[2.0, 0.0], [0.0, 0.3], [1.0, 1.0]], [[2, 0, R2], [0, 0, 0], [1, 1, R2]], [2.25, 0.25, 2.0],
     [-1.0, -1.0]),
    # the same normalised pre-activations from x = s (x_norm + b_dec): codes in input units are s times them, and
    # the decoder bias s b_dec = (0.5, 0) is added to each reconstruction; tokens (4.5, 0), (2.5, 2): v = (3.5, 1),
    # mean code (3, 1, 2 r2), c = (3 * 3.5, 1 * 1, 2 r2 * 4.5 / r2), errors (4.5, 0) - (6.5, 2), (2.5, 2) - (4.5, 4)
    (2.0, (0.25, 0.0), [[4.5, 0.0], [0.5, 0.6], [2.5, 2.0]], [[4, 0, 2 * R2], [0, 0, 0], [2, 2, 2 * R2]],
     [10.5, 1.0, 9.0], [-2.0, -2.0]),
])
def test_the_analyses_read_any_sparse_coder(scale, bias, x, codes, contribution, error):
    """BatchTopKSAE is a SparseCoder without naming it; a hand-written coder goes through the codes and the pooling
    decomposition with the values its dictionary, input scale and decoder bias give by hand."""
    assert isinstance(random_sae(), SparseCoder) and input_dim(random_sae(d=6)) == 6
    assert not isinstance(torch.nn.Linear(2, 3), SparseCoder)
    coder = AxesCoder(scale, bias)
    assert isinstance(coder, SparseCoder) and input_dim(coder) == 2
    got = encode_sparse(coder, np.array(x))
    np.testing.assert_allclose(got.dense(), codes, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.dense(), coder.encode(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-6)
    assert got.fires.tolist() == [2, 1, 2]
    dec = decompose_sentence(coder, torch.tensor([x[0], x[2]]))
    torch.testing.assert_close(dec.contribution, torch.tensor(contribution))
    torch.testing.assert_close(dec.error, torch.tensor(error))


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_switches_to_the_threshold_and_restores_the_callers_mode(training):
    coder = AxesCoder().train(training)
    with eval_mode(coder):
        assert not coder.training
    assert coder.training is training


def pos_reference(dense, meta, sentences, top_k, n_unique, n_ctx):
    """Per feature: (label, purity, {tag: share}, [(sentence, position, value)]) by the textbook procedure."""
    out = []
    for f in range(dense.shape[1]):
        entries = sorted((-float(dense[r, f]), r) for r in range(len(dense)) if dense[r, f] > 0)[:top_k]
        if not entries:
            out.append(("dead", 0.0, {}, []))
            continue
        word_tag = {}
        for _, r in entries:
            sid, wi, tok, tag = meta[r, 0], meta[r, 3], meta[r, 2], meta[r, 4]
            key = sentences[sid]["words"][wi].lower() if wi >= 0 else ("token", tok)
            if key not in word_tag and len(word_tag) < n_unique:
                word_tag[key] = POS_TAGS[tag] if tag >= 0 else "UNTAGGED"
        counts = Counter(word_tag.values())
        best = max(TAGS, key=lambda t: (counts[t], -TAGS.index(t)))
        contexts, seen = [], set()
        for v, r in entries:
            if meta[r, 0] not in seen and len(contexts) < n_ctx:
                seen.add(meta[r, 0])
                contexts.append((int(meta[r, 0]), int(meta[r, 1]), -v))
        out.append((best, counts[best] / len(word_tag), {t: c / len(word_tag) for t, c in counts.items()}, contexts))
    return out


@pytest.mark.parametrize("top_k,n_unique", [(500, 100), (6, 3)])
def test_pos_labels_purity_and_contexts_equal_a_loop(top_k, n_unique):
    meta, sentences = random_corpus(12, seed=2)
    rng = np.random.default_rng(3)
    dense = np.round(rng.uniform(0, 1, (len(meta), 8)) * (rng.uniform(size=(len(meta), 8)) < 0.3), 1)  # ties
    dense[:, 7] = 0  # a dead feature
    dense[meta[:, 4] == SPECIAL, 6] = 5.0  # a feature firing on [CLS]/[SEP] most
    labels = label_features(codes_of(dense.astype(np.float32), meta), sentences, top_k, n_unique, n_contexts=4)
    want = pos_reference(dense.astype(np.float32), meta, sentences, top_k, n_unique, 4)
    for f, (label, purity, dist, contexts) in enumerate(want):
        assert labels.label(f) == label and labels.purity[f] == pytest.approx(purity)
        assert {TAGS[t]: s for t, s in enumerate(labels.dist[f]) if s > 0} == pytest.approx(dist)
        assert [(c.sentence_id, c.position, c.value) for c in labels.contexts[f]] == pytest.approx(contexts)
    assert labels.label(7) == "dead" and labels.label(6) == "SPECIAL"
    alive = [w for w in want if w[0] != "dead"]
    summary = purity_summary(labels)
    assert summary["interpret/pos_purity_ge_0.8"] == pytest.approx(np.mean([w[1] >= 0.8 for w in alive]))
    for tag in {w[0] for w in alive}:
        mine = [w[1] >= 0.8 for w in alive if w[0] == tag]
        assert summary[f"interpret/pos_purity_ge_0.8/{tag}"] == pytest.approx(np.mean(mine))
        assert summary[f"interpret/pos_dominant_share/{tag}"] == pytest.approx(len(mine) / len(alive))


# ----------------------------------------------------------------------------------------------- pooling
def test_pooled_vector_is_the_sum_of_feature_vectors_bias_and_error():
    sae = random_sae(scale=2.3)
    x = 2 * torch.randn(9, 6, generator=torch.Generator().manual_seed(4))
    dec = decompose_sentence(sae, x)
    v = x.mean(0)
    error_ref = (x - sae.decode(sae.encode(x))).mean(0).detach()  # the SAE's own reconstruction, independently
    torch.testing.assert_close(dec.code, sae.encode(x).mean(0))
    torch.testing.assert_close(dec.code @ sae.W_dec.detach() + sae.b_dec.detach() * 2.3 + error_ref, v, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(dec.error, error_ref, atol=1e-5, rtol=0)
    c = torch.stack([dec.code[i] * (sae.W_dec[i].detach() @ v) for i in range(8)])
    torch.testing.assert_close(dec.contribution, c)
    # contributions, bias and error split the squared norm; shares are normalised by sum |c_i|
    assert float(c.sum() + dec.bias @ v + error_ref @ v) == pytest.approx(float(v @ v), abs=1e-4)
    torch.testing.assert_close(dec.share, c / c.abs().sum())
    assert (dec.code > 0).sum() >= 2 and dec.bias.abs().sum() > 0


@pytest.mark.parametrize("include_special", [True, False])
def test_corpus_pooling_equals_a_loop_over_sentences(tmp_path, include_special):
    sae = random_sae(seed=5)
    meta, sentences = random_corpus(12, seed=6)
    x = (2 * np.random.default_rng(7).standard_normal((len(meta), 6))).astype(np.float16).astype(np.float32)
    cache = write_cache(tmp_path / "c", x, meta, sentences, cuts=(len(meta) // 2,))
    codes = encode_sparse(sae, cache, chunk_rows=8)
    stats = pooling_contributions(sae, codes, cache, include_special=include_special, sentence_chunk=5)
    active, survive, share = np.zeros(8), np.zeros(8), np.zeros(8)
    f_share, b_share, e_share, cancel = [], [], [], []
    for s in range(12):
        rows = [r for r in range(len(meta)) if meta[r, 0] == s and (include_special or meta[r, 4] != SPECIAL)]
        xs = torch.as_tensor(x[rows])
        dec = decompose_sentence(sae, xs)
        on = (dec.code > 0).numpy()
        c = dec.contribution.numpy()
        active += on
        survive += on & (c > 0)
        share += dec.share.numpy()
        v = xs.mean(0)
        e = (xs - sae.decode(sae.encode(xs))).mean(0).detach()
        f_share.append(c.sum() / float(v @ v))
        b_share.append(float(dec.bias @ v) / float(v @ v))
        e_share.append(float(e @ v) / float(v @ v))
        cancel.append(np.abs(c[c < 0]).sum() / np.abs(c).sum())
    np.testing.assert_array_equal(stats.active, active)
    seen = active > 0
    assert seen.sum() >= 4
    np.testing.assert_allclose(stats.survival[seen], (survive / np.maximum(active, 1))[seen])
    np.testing.assert_allclose(stats.contribution[seen], (share / np.maximum(active, 1))[seen], rtol=1e-5)
    assert np.isnan(stats.contribution[~seen]).all()
    np.testing.assert_allclose(stats.total, share, rtol=1e-5, atol=1e-7)
    for got, want in ((stats.feature_share, f_share), (stats.bias_share, b_share), (stats.error_share, e_share),
                      (stats.cancel_share, cancel)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert 0 < survive.sum() < active.sum()  # some features survive and some cancel


def test_model_pooling_needs_the_special_tokens(tmp_path):
    sae = random_sae()
    meta, sentences = random_corpus(3, keep_special=False)
    cache = write_cache(tmp_path / "c", np.ones((len(meta), 6), np.float32), meta, sentences, special_tokens="drop")
    codes = encode_sparse(sae, cache)
    with pytest.raises(ValueError, match="special_tokens='drop'.*special_tokens=keep"):
        pooling_contributions(sae, codes, cache, include_special=True)
    assert len(pooling_contributions(sae, codes, cache, include_special=False).sentence_ids) == 3


# --------------------------------------------------------------------------------------------- stability
@pytest.mark.parametrize("method", ["hungarian", "top_m"])
def test_matching_recovers_a_permuted_noisy_decoder(method):
    g = torch.Generator().manual_seed(8)
    W_a = torch.randn(40, 16, generator=g)
    perm = torch.randperm(40, generator=g)
    W_b = 3 * W_a[perm] + 0.02 * torch.randn(40, 16, generator=g)  # b's row j is a's row perm[j], rescaled
    m = match_decoders(W_a, W_b, method=method, top_m=2)
    np.testing.assert_array_equal(m.match[perm.numpy()], np.arange(40))
    assert (m.cos > 0.99).all() and m.mean_cos == pytest.approx(1, abs=1e-3)
    assert m.method == ("hungarian" if method == "hungarian" else "top2")
    # signs are kept (codes are >= 0, so -d is another feature): a negated decoder does not match with cosine 1
    assert match_decoders(W_a, -W_b, method=method).mean_cos < 0.5
    fewer = match_decoders(W_a[:30], W_b, method=method)  # F_a < F_b: every row of a matched, one-to-one
    assert (fewer.match >= 0).all() and len(set(fewer.match.tolist())) == 30
    more = match_decoders(W_a, W_b[:30], method=method)  # F_a > F_b: 10 rows of a unmatched, NaN cosine
    assert (more.match == -1).sum() == 10 and np.isnan(more.cos[more.match == -1]).all()


def test_stability_by_energy_decile_equals_a_loop():
    rng = np.random.default_rng(9)
    energy = np.where(rng.uniform(size=50) < 0.3, 0.0, rng.uniform(size=50))  # many ties at 0
    cos = rng.uniform(-1, 1, 50)
    from evaluation.interpret.stability import Matching

    bins = energy_deciles(energy)
    assert np.bincount(bins).tolist() == [5] * 10
    order = sorted(range(50), key=lambda i: (energy[i], i))
    want = [np.mean([cos[i] for i in order[5 * k : 5 * k + 5]]) for k in range(10)]
    np.testing.assert_allclose(stability_by_decile(Matching(np.arange(50), cos, "hungarian"), energy), want)


def test_group_share_equals_its_formula():
    meta, sentences = random_corpus(12, seed=10)
    rng = np.random.default_rng(11)
    dense = (rng.uniform(0, 2, (len(meta), 8)) * (rng.uniform(size=(len(meta), 8)) < 0.3)).astype(np.float32)
    dense[:, 5] = 0
    group = brown_groups(meta, sentences)  # news -> a, fiction and romance -> b
    cat = [sentences[s]["category"] for s in meta[:, 0]]
    assert group.tolist() == [0 if c == "news" else 1 for c in cat]
    dense[group == 1, 6] = 0  # only in group a
    score = group_share(codes_of(dense, meta), group)
    a, b = [r for r in range(len(meta)) if cat[r] == "news"], [r for r in range(len(meta)) if cat[r] != "news"]
    for f in range(8):
        ea, eb = sum(dense[r, f] for r in a) / len(a), sum(dense[r, f] for r in b) / len(b)
        assert (np.isnan(score[f]) if ea + eb == 0 else score[f] == pytest.approx(ea / (ea + eb)))
    assert score[6] == 1.0 and np.isnan(score[5])
    summary = group_share_summary(score)
    finite = score[np.isfinite(score)]
    assert summary["interpret/group_share_specific_a"] == sum(s > 0.9 for s in finite) >= 1
    assert summary["interpret/group_share_specific_b"] == sum(s < 0.1 for s in finite)
    assert sum(summary[f"interpret/group_share_hist/{k}"] for k in range(10)) == 7


# ------------------------------------------------------------------------------------------ whole report
REC_KEYS = {"id", "label", "purity", "energy", "fires", "pos_dist", "hist", "contexts", "contribution", "survival",
            "stability_cos"}


class FakeTokenizer:
    def convert_ids_to_tokens(self, ids):
        return {2: "<s>", 3: "</s>"}.get(ids, f"t{ids}") if isinstance(ids, int) else [f"t{i}" for i in ids]


def test_context_tokens_highlight_the_activating_word():
    meta, sentences = random_corpus(2, seed=12)
    words = sentences[1]["words"]
    rows = np.flatnonzero(meta[:, 0] == 1)
    piece = rows[-2]  # a piece of the last word
    ctx = Context(int(piece), 1, int(meta[piece, 1]), int(meta[piece, 3]), 1.0)
    assert context_tokens(ctx, sentences[1], meta) == (words, len(words) - 1)
    cls, sep = Context(int(rows[0]), 1, 0, -1, 1.0), Context(int(rows[-1]), 1, int(meta[rows[-1], 1]), -1, 1.0)
    assert context_tokens(cls, sentences[1], meta) == (["[CLS]", *words], 0)
    assert context_tokens(sep, sentences[1], meta) == ([*words, "[SEP]"], len(words))
    assert context_tokens(sep, sentences[1], meta, FakeTokenizer()) == ([*words, "</s>"], len(words))
    plain = {"id": 1, "text": "plain text"}  # no Brown words: the cached wordpieces, or the whole text
    assert context_tokens(ctx, plain, meta) == (["plain text"], -1)
    tokens, index = context_tokens(ctx, plain, meta, FakeTokenizer())
    assert tokens == [f"t{t}" for t in meta[rows, 2]] and index == len(rows) - 2


def test_report_on_a_tiny_bert_brown_cache(tiny_model_no_dropout, tmp_path):
    write_two_genres(tmp_path)
    dm = ActivationsDataModule(tiny_model_no_dropout, source="brown", data_root=str(tmp_path), special_tokens="keep",
                               cache_dir=str(tmp_path / "cache"), max_length=32, cache_dtype="float32")
    dm.setup()
    sae, sae_b = random_sae(d=32, n=16, seed=0, scale=1.0, threshold=1.0), random_sae(d=32, n=16, seed=1)
    rep = interpret_sae(sae, dm.cache, sae_b, top_k=20, n_unique=5, n_contexts=3)
    json.dumps(rep)  # JSON-able as a whole
    s = rep.summary
    assert s["interpret/pooling_tokens"] == "all" and s["interpret/stability_method"] == "hungarian"
    assert s["interpret/n_tokens"] == len(dm.cache) and 0 < s["interpret/alive_share"] <= 1
    assert -1 <= s["interpret/stability_mean_cos"] <= 1 and "interpret/group_share_mean" in s
    assert "interpret/pos_purity_ge_0.8" in s and "interpret/pooling_survival_mean" in s
    assert len(rep.features) == 16 and all(set(r) == REC_KEYS for r in rep.features)
    meta, sents = dm.cache.metadata(), dm.cache.sentences()
    alive = [r for r in rep.features if r["fires"] > 0]
    assert alive and all(r["label"] in TAGS and sum(r["pos_dist"].values()) == pytest.approx(1) for r in alive)
    for r in rep.features:
        assert sum(r["hist"]["counts"]) == r["fires"] and len(r["hist"]["edges"]) == len(r["hist"]["counts"]) + 1
        assert (r["contribution"] is None) == (r["fires"] == 0) and isinstance(r["stability_cos"], float)
        for c in r["contexts"]:
            item = c["tokens"][c["index"]]
            assert item in ("[CLS]", "[SEP]") or any(item in s["words"] for s in sents)
    # the top context of an alive feature highlights the Brown word of its strongest token
    r = alive[0]
    codes = encode_sparse(sae, dm.cache)
    best = codes.rows[codes.features == r["id"]][np.argmax(codes.values[codes.features == r["id"]])]
    words, wi, pos = sents[meta[best, 0]]["words"], meta[best, 3], meta[best, 1]
    ctx = r["contexts"][0]
    assert ctx["value"] == pytest.approx(float(codes.values[codes.features == r["id"]].max()))
    if wi >= 0:
        assert ctx["tokens"] == words and ctx["index"] == wi
    elif pos == 0:
        assert ctx["tokens"] == ["[CLS]", *words] and ctx["index"] == 0
    else:
        assert ctx["tokens"] == [*words, "[SEP]"] and ctx["index"] == len(words)
