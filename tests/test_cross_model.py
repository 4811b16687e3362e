"""Cross-model feature matching on hand-made codes of two tokenisations of one corpus, where the shared and the
model-specific features are known; word pooling and correlations against loops."""

from __future__ import annotations

import numpy as np
import pytest
from test_interpret import codes_of, random_corpus

from datamodules.activation_cache import META_SENTENCE, META_WORD, POS_TAGS, SPECIAL
from evaluation.interpret.cross_model import (
    WORD_KEY_BASE,
    align,
    compare_models,
    feature_correlation,
    match_features,
    word_codes,
)
from evaluation.interpret.pos import label_features


def tokenise(sentences: list[dict], seed: int, keep_special: bool) -> np.ndarray:
    """Metadata rows of another tokeniser of the same sentences: 1 to 3 pieces a word, specials kept or not."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, sent in enumerate(sentences):
        toks = [(2, -1, SPECIAL, 0)] if keep_special else []
        for w, tag in enumerate(sent["tags"]):
            toks += [(50 + w, w, POS_TAGS.index(tag), int(p == 0)) for p in range(rng.integers(1, 4))]
        toks += [(3, -1, SPECIAL, 0)] if keep_special else []
        rows += [(s, pos, tok, w, tag, first) for pos, (tok, w, tag, first) in enumerate(toks)]
    return np.asarray(rows, dtype=np.int32)


def fire(meta: np.ndarray, sentences: list[dict], tags: set[str], strength: dict,
         piece_scale: np.ndarray) -> np.ndarray:
    """(N,) a feature's codes: on the words with one of ``tags``, the word's ``strength`` times the piece's scale
    (at most 1, so the word-level maximum is the strength when one piece has scale 1)."""
    out = np.zeros(len(meta), dtype=np.float32)
    for r, (s, w) in enumerate(meta[:, [META_SENTENCE, META_WORD]]):
        if w >= 0 and sentences[s]["tags"][w] in tags:
            out[r] = strength[(s, w)] * piece_scale[r]
    return out


def test_shared_and_specific_features_are_found():
    meta_a, sentences = random_corpus(60, seed=1)
    meta_b = tokenise(sentences, seed=2, keep_special=False)
    rng = np.random.default_rng(0)
    strength = {(s, w): float(rng.uniform(0.5, 2.0)) for s, sent in enumerate(sentences)
                for w in range(len(sent["words"]))}
    scale_a = np.where(meta_a[:, 5] == 1, 1.0, 0.3)  # the first piece carries the word's value
    scale_b = np.where(meta_b[:, 5] == 1, 0.2, 1.0)  # later pieces carry it (words of 1 piece: 0.2 of it)
    scale_b[np.r_[np.diff(meta_b[:, META_WORD]) != 0, True] & (meta_b[:, 5] == 1)] = 1.0  # one-piece words
    a = np.stack([fire(meta_a, sentences, {"NOUN"}, strength, scale_a),
                  fire(meta_a, sentences, {"VERB", "ADV"}, strength, scale_a),
                  (rng.random(len(meta_a)) < 0.3) * rng.uniform(0.5, 1, len(meta_a)),  # fires anywhere: specific
                  np.zeros(len(meta_a))], 1).astype(np.float32)  # silent
    b = np.stack([2 * fire(meta_b, sentences, {"VERB", "ADV"}, strength, scale_b),  # = a's 1, scaled
                  fire(meta_b, sentences, {"NOUN"}, strength, scale_b),  # = a's 0
                  (rng.random(len(meta_b)) < 0.3) * rng.uniform(0.5, 1, len(meta_b))], 1).astype(np.float32)
    codes_a, codes_b = codes_of(a, meta_a), codes_of(b, meta_b)
    wa, wb = word_codes(codes_a), word_codes(codes_b)
    n_words = sum(len(s["words"]) for s in sentences)
    assert wa.codes.shape == (n_words, 4) and wb.codes.shape == (n_words, 3)  # specials left out, every word kept
    # word codes: the largest code over each word's pieces (a loop)
    for r, key in enumerate(wb.keys):
        s, w = divmod(int(key), WORD_KEY_BASE)
        pieces = (meta_b[:, META_SENTENCE] == s) & (meta_b[:, META_WORD] == w)
        np.testing.assert_allclose(wb.codes[r].toarray()[0], b[pieces].max(0))
    A, B = align(wa, wb)
    np.testing.assert_allclose(A[:, 0].toarray().ravel(), B[:, 1].toarray().ravel(), rtol=1e-6)

    labels = {"a": label_features(codes_a, sentences, top_k=50, n_unique=20),
              "b": label_features(codes_b, sentences, top_k=50, n_unique=20)}
    res = compare_models({"a": wa, "b": wb}, labels, threshold=0.9)
    match = res.matches["a|b"]
    assert list(match.best_ab[:2]) == [1, 0] and match.best_ab[3] == -1 and list(match.best_ba[:2]) == [1, 0]
    np.testing.assert_allclose(match.corr_ab[:2], 1.0, atol=1e-5)
    assert match.corr_ab[2] < 0.5 and match.corr_ba[2] < 0.5 and np.isnan(match.corr_ab[3])
    ma, mb = res.models["a"], res.models["b"]
    assert (ma["n_shared_any"], ma["n_specific"], ma["n_silent"]) == (2, 1, 1)
    assert (mb["n_shared_any"], mb["n_specific"], mb["n_silent"]) == (2, 1, 0)
    assert ma["shared_any_share"] == pytest.approx(2 / 3) and mb["specific_share"] == pytest.approx(1 / 3)
    assert res.pairs["a|b"]["n_mutual"] == 2 and res.n_words["a|b"] == n_words
    assert ma["pos_shared"]["dominant"] == {"NOUN": 0.5, "VERB": 0.5} or ma["pos_shared"]["dominant"] == {
        "NOUN": 0.5, "ADV": 0.5}
    assert ma["pos_shared"]["n"] == 2 and ma["pos_specific"]["n"] == 1
    assert labels["a"].purity[0] == 1.0 and ma["pos_shared"]["purity_mean"] == pytest.approx(
        labels["a"].purity[:2].mean())
    # one-to-one matching finds the same pairs here
    hung = compare_models({"a": wa, "b": wb}, labels, threshold=0.9, one_to_one=True)
    assert list(hung.matches["a|b"].best_ab[:2]) == [1, 0] and hung.models["a"]["n_shared_any"] == 2
    # three models, b twice: b's specific feature is now shared with its copy (any) but not with a (all)
    three = compare_models({"a": wa, "b": wb, "c": wb}, threshold=0.9)
    assert (three.models["b"]["n_shared_any"], three.models["b"]["n_shared_all"]) == (3, 2)
    assert (three.models["a"]["n_shared_any"], three.models["a"]["n_shared_all"]) == (2, 2)
    with pytest.raises(ValueError, match="at least 2 SAEs"):
        compare_models({"a": wa})
    other = word_codes(codes_of(a, np.where(np.arange(6) == 0, meta_a + 1000, meta_a)))
    with pytest.raises(ValueError, match="share no word occurrence"):
        align(other, wb)


def test_correlation_and_best_match_equal_loops():
    rng = np.random.default_rng(3)
    from scipy import sparse

    A = np.where(rng.random((40, 5)) < 0.4, rng.random((40, 5)), 0).astype(np.float32)
    B = np.where(rng.random((40, 4)) < 0.4, rng.random((40, 4)), 0).astype(np.float32)
    A[:, 4] = 0  # constant: no correlation
    corr = feature_correlation(sparse.csr_matrix(A), sparse.csr_matrix(B))
    for i in range(5):
        for j in range(4):
            if i == 4:
                assert np.isnan(corr[i, j])
            else:
                assert corr[i, j] == pytest.approx(np.corrcoef(A[:, i], B[:, j])[0, 1], abs=1e-6)
    m = match_features(corr)
    for i in range(4):
        assert m.best_ab[i] == int(np.argmax(corr[i])) and m.corr_ab[i] == pytest.approx(corr[i].max())
    assert m.best_ab[4] == -1
    for j in range(4):
        assert m.best_ba[j] == int(np.nanargmax(corr[:, j]))
