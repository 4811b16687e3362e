"""POS probes: the closed-form ridge probe against its normal equations, exact on separable data, the same on a
sparse input; the sentence split; macro-F1 against a loop; the MLP where a linear probe cannot work; probes over
caches of several layers and over SAE codes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from test_interpret import random_corpus, random_sae, write_cache

from datamodules.activation_cache import META_FIRST_PIECE, META_SENTENCE, META_TAG, SPECIAL
from evaluation.interpret.probes import (
    CLASSES,
    fit_linear,
    fit_mlp,
    macro_f1,
    probe_caches,
    probe_rows,
    run_probes,
    sample_sentences,
    split_by_sentence,
)


def clusters(n: int, n_classes: int, d: int, seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = 3.0 * np.eye(d)[y] + noise * rng.normal(size=(n, d)) + 5.0  # an offset: the probe must centre
    return x.astype(np.float32), y


def test_linear_probe_is_the_ridge_solution_and_exact_on_separable_data():
    x, y = clusters(300, 4, 6)
    ridge = 1e-2
    probe = fit_linear(x, y, n_classes=4, ridge=ridge)
    # the normal equations written out: standardised, centred inputs, one-hot targets, ridge * N on the diagonal
    n = len(x)
    xd = x.astype(np.float64)
    mean, sd = xd.mean(0), xd.std(0)
    z = (xd - mean) / sd
    onehot = np.eye(4)[y]
    ybar = onehot.mean(0)
    aug_x = np.vstack([z, np.sqrt(ridge * n) * np.eye(6)])
    aug_y = np.vstack([onehot - ybar, np.zeros((6, 4))])
    w_std = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    np.testing.assert_allclose(xd @ probe.W + probe.b, z @ w_std + ybar, atol=1e-8)
    assert (probe.predict(x) == y).all()  # separable: exact
    x_test, y_test = clusters(100, 4, 6, seed=1)
    assert (probe.predict(x_test) == y_test).all()
    # a sparse input (with a constant, all-zero column) gives the same probe
    xs = np.hstack([x, np.zeros((n, 1), np.float32)])
    sp = fit_linear(sparse.csr_matrix(xs), y, n_classes=4, ridge=ridge)
    dense = fit_linear(xs, y, n_classes=4, ridge=ridge)
    np.testing.assert_allclose(sp.W, dense.W, atol=1e-9)
    np.testing.assert_allclose(sp.b, dense.b, atol=1e-9)
    np.testing.assert_allclose(sp.W[:6], probe.W, atol=1e-9)
    assert not sp.W[6].any()


def test_split_by_sentence_keeps_each_sentence_on_one_side():
    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(50), rng.integers(1, 8, 50))
    test = split_by_sentence(sid, 0.2, seed=3)
    assert not set(sid[test]) & set(sid[~test])  # no sentence on both sides
    assert len(np.unique(sid[test])) == 10 and len(np.unique(sid[~test])) == 40
    for s in np.unique(sid):  # all of a sentence's rows together
        assert len(set(test[sid == s])) == 1
    np.testing.assert_array_equal(test, split_by_sentence(sid, 0.2, seed=3))
    assert not np.array_equal(test, split_by_sentence(sid, 0.2, seed=4))
    assert split_by_sentence(np.array([7, 7, 9]), 0.01).sum() in (1, 2)  # one sentence each side at least
    with pytest.raises(ValueError, match="at least 2 sentences"):
        split_by_sentence(np.array([1, 1]), 0.5)
    kept = sample_sentences(sid, 60, seed=0)
    assert kept.sum() <= 60 and all(kept[sid == s].all() or not kept[sid == s].any() for s in np.unique(sid))
    assert kept.sum() > 60 - 7  # filled up to the budget, short of it by less than the longest sentence
    assert not np.array_equal(kept, sample_sentences(sid, 60, seed=1))  # the seed draws other sentences


def test_macro_f1_equals_a_loop_over_the_formula():
    rng = np.random.default_rng(1)
    gold = rng.choice([0, 1, 2, 5], 200)
    pred = np.where(rng.random(200) < 0.6, gold, rng.choice([0, 1, 3], 200))  # 3: predicted, never gold
    got, per_class = macro_f1(gold, pred, 8)
    f1s = []
    for c in range(8):
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
            assert per_class[c] == pytest.approx(f1s[-1])
        else:
            assert np.isnan(per_class[c])
    assert len(f1s) == 5 and got == pytest.approx(sum(f1s) / len(f1s))


def test_mlp_probe_decodes_what_no_linear_probe_can():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3000, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)  # XOR of the signs
    test = np.arange(3000) >= 2400
    res = run_probes(x, y, test, mlp={"hidden": 32, "epochs": 30, "batch_size": 64, "lr": 1e-2})
    assert res["linear"].accuracy < 0.6 and res["mlp"].accuracy > 0.93
    assert res["mlp"].n_train == 2400 and res["mlp"].n_test == 600 and res["mlp"].n_inputs == 2
    a, b = fit_mlp(x[:500], y[:500], epochs=2, seed=1), fit_mlp(x[:500], y[:500], epochs=2, seed=1)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))  # seeded
    np.testing.assert_array_equal(fit_mlp(sparse.csr_matrix(x[:500]), y[:500], epochs=2, seed=1).predict(x),
                                  a.predict(x))  # a sparse input is the same input


def test_probes_over_layer_caches_and_sae_codes(tmp_path):
    meta, sentences = random_corpus(120, seed=2)
    rng = np.random.default_rng(0)
    tag = meta[:, META_TAG]
    informative = (np.eye(16)[np.where(tag >= 0, tag, 15)] * 4 + rng.normal(size=(len(meta), 16)) * 0.1)
    noise = rng.normal(size=(len(meta), 16))
    caches = {"layer1": write_cache(tmp_path / "a", informative, meta, sentences),
              "layer0": write_cache(tmp_path / "b", noise, meta, sentences)}
    for c in caches.values():
        c.meta["source"] = {"fingerprint": "same"}
    rows = probe_rows(meta)
    assert not (tag[rows] == SPECIAL).any() and (meta[rows, META_FIRST_PIECE] == 1).all()
    assert probe_rows(meta, "all").sum() > rows.sum()
    sae = random_sae(d=16, n=24, threshold=0.1)
    study = probe_caches(caches, sae=sae, sae_input="layer1", max_tokens=None, mlp={"epochs": 3, "hidden": 16})
    assert study.n_train + study.n_test == rows.sum() and study.n_sentences == 120
    lin = study.results["layer1"]["linear"]
    assert lin.accuracy == 1.0 and lin.macro_f1 == 1.0 and lin.n_inputs == 16
    assert set(lin.f1_per_class) <= set(CLASSES)
    assert study.results["layer0"]["linear"].accuracy < 0.7  # no information: near the majority rate
    assert study.results["sae"]["linear"].n_inputs == 24 and study.results["sae"]["mlp"].n_test == study.n_test
    # the majority floor is the test share of the train set's most frequent tag
    y = tag[rows]
    test = split_by_sentence(meta[rows, META_SENTENCE], 0.2, 0)
    majority = np.bincount(y[~test]).argmax()
    assert lin.majority_accuracy == pytest.approx((y[test] == majority).mean())
    # a cache of another tokenisation, or of another corpus, is refused
    other_meta, other_sentences = random_corpus(120, seed=5)
    other = write_cache(tmp_path / "c", rng.normal(size=(len(other_meta), 16)), other_meta, other_sentences)
    other.meta["source"] = {"fingerprint": "same"}
    with pytest.raises(ValueError, match="tokenise the same sentences differently"):
        probe_caches({"x": caches["layer1"], "y": other}, kinds=["linear"])
    other.meta["source"] = {"fingerprint": "else"}
    with pytest.raises(ValueError, match="different corpora"):
        probe_caches({"x": caches["layer1"], "y": other}, kinds=["linear"])
    with pytest.raises(ValueError, match="unknown probe kind"):
        probe_caches({"x": caches["layer1"]}, kinds=["svm"])
    with pytest.raises(ValueError, match="sae_input"):
        probe_caches(caches, sae=sae, sae_input="layer9")
