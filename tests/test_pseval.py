"""PS-Eval and the WiC reader: metrics from a hand-made confusion matrix, row validation, the single-token filter and
balancing on a constructed WiC file, the argmax-feature rule on a hand-set SAE (d = 6, F = 8), a batched tiny-BERT
run against unbatched forward passes, and the real WiC dev split with the offline MiniLM."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from core.errors import DataError
from core.hub import load_pretrained
from datamodules.wic import WiCPair, load_wic, read_wic
from evaluation.interpret.pseval import (
    Confusion,
    balance,
    confusion,
    ps_eval,
    score_layer,
    single_token_pairs,
    top_features,
)
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

R2 = math.sqrt(2)


def write_wic(folder: Path, rows: list[str], golds: list[str], split: str = "dev") -> Path:
    (folder / split).mkdir(parents=True, exist_ok=True)
    data = folder / split / f"{split}.data.txt"
    data.write_text("\n".join(rows) + "\n")
    (folder / split / f"{split}.gold.txt").write_text("\n".join(golds) + "\n")
    return data


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_a_hand_computed_confusion_matrix():
    pred = [True, True, True, True, False, False, False, False, False, False]
    gold = [True, True, True, False, True, True, False, False, False, False]
    cm = confusion(pred, gold)
    assert cm == Confusion(tp=3, fp=1, tn=4, fn=2)
    m = cm.metrics()
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["accuracy"] == pytest.approx(7 / 10) and m["specificity"] == pytest.approx(4 / 5)
    # Everything predicted "same": recall 1, specificity 0 (the failure PS-Eval exists to expose); 0/0 -> 0
    assert Confusion(tp=5, fp=5, tn=0, fn=0).metrics()["specificity"] == 0.0
    assert Confusion(0, 0, 0, 0).metrics() == dict.fromkeys(m, 0.0)


# --------------------------------------------------------------------------------------------- WiC reader
GOOD = "bank\tN\t1-3\tthe bank closed\tsit on the bank"


def test_read_wic_parses_rows(tmp_path):
    data = write_wic(tmp_path, [GOOD, "run\tV\t0-0\trun fast\trun a shop"], ["T", "F"])
    pairs = read_wic(data)
    assert pairs == [WiCPair("bank", "N", 1, 3, "the bank closed", "sit on the bank", True),
                     WiCPair("run", "V", 0, 0, "run fast", "run a shop", False)]
    assert pairs[0].words2[pairs[0].idx2] == "bank"
    assert load_wic("dev", str(tmp_path), source=".") == pairs  # a folder holding dev/dev.data.txt


@pytest.mark.parametrize("row, gold, where, message", [
    ("bank\tN\t1-2\tthe bank closed", "T", "data:2", "expected 5 TAB-separated fields"),
    ("bank\tN\t1_2\tthe bank closed\tsit on the bank", "T", "data:2", "not of the form i-j"),
    ("bank\tN\t-1-2\tthe bank closed\tsit on the bank", "T", "data:2", "not of the form i-j"),
    ("bank\tN\t3-2\tthe bank closed\tsit on the bank", "T", "data:2", "index 3 is out of range for context1"),
    ("bank\tN\t1-4\tthe bank closed\tsit on the bank", "T", "data:2", "index 4 is out of range for context2"),
    (GOOD, "yes", "gold:2", "gold label 'yes' is not T or F"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, gold, where, message):
    data = write_wic(tmp_path, [GOOD, row, GOOD], ["T", gold, "F"])
    with pytest.raises(DataError, match=message) as err:
        read_wic(data)
    path = data if where.startswith("data") else data.with_name("dev.gold.txt")
    assert f"{path}:{where.split(':')[1]}:" in str(err.value)


def test_gold_length_mismatch_names_both_files_and_the_line(tmp_path):
    data = write_wic(tmp_path, [GOOD, GOOD, GOOD], ["T", "F"])
    with pytest.raises(DataError, match=r"has 2 lines but .*dev.data.txt has 3") as err:
        read_wic(data)
    assert f"{data.with_name('dev.gold.txt')}:3 is missing" in str(err.value)


def test_missing_local_wic_says_how_to_point_at_files(tmp_path):
    with pytest.raises(DataError, match=r"set data_root to the folder holding wic/dev/dev.data.txt"):
        load_wic("dev", str(tmp_path), hub=False)
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_wic("validation", str(tmp_path))
    with pytest.raises(DataError, match=r"from the Hugging Face hub .*set data_root to the folder holding wic/dev"):
        load_wic("dev", str(tmp_path))  # offline (conftest): the hub fails, and the error says what to do


def test_hub_rows_become_word_indices(monkeypatch):
    import datamodules.wic as wic

    rows = [{"word": "place", "sentence1": "Do you want to come over to my place?", "start1": 31, "end1": 36,
             "sentence2": "A political system with no place for the less prominent groups.", "start2": 27,
             "end2": 32, "idx": 0, "label": 0}]
    monkeypatch.setattr(wic, "load_hub_dataset", lambda name, split, hint, subset=None: rows)
    (pair,) = load_wic("dev")
    assert pair.words1[pair.idx1] == "place" and pair.words1[pair.idx1 + 1] == "?"  # "?" split off
    assert pair.words2[pair.idx2] == "place" and pair.gold is False and pair.pos == ""
    monkeypatch.setattr(wic, "load_hub_dataset", lambda *a, **k: [{**rows[0], "label": -1}])
    with pytest.raises(DataError, match="no public gold"):
        load_wic("test")


# ------------------------------------------------------------------------------ filtering and balancing
# tiny tokenizer (conftest): one token per vocabulary word, but "dog." / "kid," are two (punctuation is split off)
FILTER_ROWS = [  # (row, gold); * = target is two tokens in one context, ~ = target truncated at max_length 8
    ("dog\tN\t1-1\tthe dog is playing\ta dog reads", "T"),
    ("man\tN\t1-2\tthe man reads\tan old man", "T"),
    ("paper\tN\t1-2\tthe paper is big\tthe daily paper", "T"),
    ("box\tN\t2-1\ta heavy box\tthe box", "T"),
    ("dog\tN\t1-1\tthe dog.\ta dog", "T"),  # *
    ("kid\tN\t0-1\tkid, reads\tthe kid", "T"),  # *
    ("car\tN\t1-7\tthe car\ta man in a big old city car", "T"),  # ~
    ("wall\tN\t1-1\tthe wall\ta wall", "F"),
    ("sea\tN\t2-0\tat the sea\tsea", "F"),
    ("park\tN\t1-1\tthe park\tthe park", "F"),
    ("yard\tN\t1-0\tthe yard.\tyard", "F"),  # *
]


def test_single_token_filter_and_balance(tmp_path, tiny_model_no_dropout):
    data = write_wic(tmp_path, [r for r, _ in FILTER_ROWS], [g for _, g in FILTER_ROWS])
    pairs = read_wic(data)
    _, tokenizer = load_pretrained(tiny_model_no_dropout)
    kept, where, counts = single_token_pairs(pairs, tokenizer, max_length=8)
    assert counts == {"pairs": 11, "multi_token": 3, "truncated": 1, "single_token": 7}
    assert [p.word for p in kept] == ["dog", "man", "paper", "box", "wall", "sea", "park"]
    assert where[:2] == [(2, 2), (2, 3)]  # [CLS] shifts word i to token i + 1
    gold = [p.gold for p in kept]  # 4 T, 3 F
    chosen = balance(gold, seed=0)
    assert len(chosen) == 6 and chosen == sorted(chosen) and {4, 5, 6} <= set(chosen)  # every F kept, 3 of 4 T
    assert balance(gold, seed=0) == chosen
    assert len({tuple(balance(gold, seed=s)) for s in range(20)}) > 1  # the seed picks which T are dropped


# ----------------------------------------------------------------------------------- argmax feature rule
def hand_sae(threshold: float = 0.5) -> BatchTopKSAE:
    """d = 6, F = 8: latents 0-5 are the unit axes, 6 = (e0 + e1)/sqrt2, 7 = (e2 + e3)/sqrt2; zero biases."""
    sae = BatchTopKSAE(BatchTopKConfig(d_in=6, num_latents=8, k=2, normalize_input=False, b_dec_init="zeros"))
    W = torch.zeros(8, 6)
    W[:6] = torch.eye(6)
    W[6, :2] = W[7, 2:4] = 1 / R2
    with torch.no_grad():
        sae.W_enc.copy_(W), sae.W_dec.copy_(W), sae.threshold.fill_(threshold)
    return sae.train()  # scoring must switch to eval (threshold) by itself and restore the mode


def test_largest_code_decides_and_all_zero_means_no_feature():
    h1 = torch.tensor([[4.0, 3, 2, 1, 0, 0],    # latent 6 (7/sqrt2 = 4.95) beats latent 0 (4)
                       [0, 0, 3, 0, 0, 0],      # latent 2 (3) beats latent 7 (2.12)
                       [0, 0, 0, 0, 0, 2],      # latent 5
                       [0.1, 0, 0, 0, 0, 0],    # every code below the threshold 0.5: no feature
                       [0, 0, 0, 0, 1, 0]])     # latent 4
    h2 = torch.tensor([[3.0, 4, 0, 0, 0, 0],    # latent 6 again: predicted same
                       [0, 0, 2, 2, 0, 0],      # latent 7 (2.83): different
                       [0, 0, 0, 0, 0, 1],      # latent 5: same
                       [0.1, 0, 0, 0, 0, 0],    # no feature on both sides: still "different"
                       [0, 0, 0, 0, 1, 0]])     # latent 4: same
    sae = hand_sae()
    assert top_features(sae.eval().encode(h1)).tolist() == [6, 2, 5, -1, 4]
    gold = [True, True, False, False, True]
    res = score_layer(3, sae.train(), h1, h2, gold)
    assert sae.training
    assert res.confusion == Confusion(tp=2, fp=1, tn=1, fn=1)
    assert (res.no_feature_contexts, res.no_feature_pairs) == (2, 1)
    assert res.specificity == pytest.approx(1 / 2) and res.precision == pytest.approx(2 / 3)
    assert res.to_dict()["pseval/layer3/specificity"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="SAE expects d_in = 6"):
        score_layer(3, sae, torch.zeros(5, 7), torch.zeros(5, 7), gold)


# --------------------------------------------------------------------------------------------- tiny BERT
E2E_ROWS = [  # all single-token, 6 T and 6 F: balancing keeps every pair
    "dog\tN\t1-1\tthe dog is playing in the park\ta dog reads", "man\tN\t1-2\tthe man reads\tan old man",
    "paper\tN\t1-2\tthe paper is big\tthe daily paper", "box\tN\t2-1\ta heavy box\tthe box is in the car",
    "wall\tN\t1-1\tthe wall\ta wall", "sea\tN\t2-0\tat the sea\tsea", "park\tN\t1-1\tthe park\tthe big park",
    "yard\tN\t1-0\tthe yard\tyard", "car\tN\t1-0\tthe car\tcar", "guitar\tN\t0-2\tguitar\tplays the guitar",
    "city\tN\t1-1\tthe city centre\tthe city", "school\tN\t1-3\tat school\tthe kid is at school",
]


def random_sae(d_in: int, seed: int) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=d_in, num_latents=64, k=4, normalize_input=False, b_dec_init="zeros"))
    sae.threshold.fill_(0.0)
    return sae


def test_tiny_bert_end_to_end_matches_unbatched_passes(tmp_path, tiny_model_no_dropout):
    pairs = read_wic(write_wic(tmp_path, E2E_ROWS, ["T"] * 6 + ["F"] * 6))
    model, tokenizer = load_pretrained(tiny_model_no_dropout)
    saes = {1: random_sae(32, 0), -1: random_sae(32, 1)}
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    res = ps_eval((model, tokenizer), saes, pairs, batch_size=5)
    handle.remove()
    assert len(calls) == 5  # 24 contexts in batches of 5, all layers from the same passes
    assert set(res) == {1, -1}
    for layer, r in res.items():
        assert r.layer == layer and r.counts["balanced"] == 12 and r.counts["multi_token"] == 0
        cm = r.confusion
        assert cm.tp + cm.fn == 6 and cm.tn + cm.fp == 6
        # reference: one unpadded forward pass per context, the target token read off by hand
        want = []
        for p in pairs:
            feats = []
            for words, i in ((p.words1, p.idx1), (p.words2, p.idx2)):
                enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
                with torch.no_grad():
                    h = model(**enc, output_hidden_states=True).hidden_states[layer][0, i + 1]
                feats.append(int(top_features(saes[layer].eval().encode(h[None]))[0]))
            want.append(feats[0] == feats[1] and feats[0] >= 0)
        assert cm == confusion(want, [p.gold for p in pairs])
    # a text prefix (e5's "query: ") goes before every context, as the cache put it before every sentence
    prefixed = ps_eval((model, tokenizer), {1: saes[1]}, pairs, batch_size=5, text_prefix="a man ")[1]
    want = []
    for p in pairs:
        feats = []
        for words, i in ((p.words1, p.idx1), (p.words2, p.idx2)):
            enc = tokenizer(["a", "man", *words], is_split_into_words=True, return_tensors="pt")
            with torch.no_grad():
                h = model(**enc, output_hidden_states=True).hidden_states[1][0, i + 3]
            feats.append(int(top_features(saes[1].eval().encode(h[None]))[0]))
        want.append(feats[0] == feats[1] and feats[0] >= 0)
    assert prefixed.confusion == confusion(want, [p.gold for p in pairs]) != res[1].confusion
    with pytest.raises(DataError, match="layer 3 is out of range"):
        ps_eval(tiny_model_no_dropout, {3: saes[1]}, pairs)
    with pytest.raises(DataError, match=r"layers \[-1, 2\] name the same hidden_states entry twice"):
        ps_eval(tiny_model_no_dropout, {2: saes[1], -1: saes[-1]}, pairs)


# -------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_wic_dev_with_minilm(shared_data, minilm):
    start = time.perf_counter()
    pairs = load_wic("dev", str(shared_data))
    assert len(pairs) == 638 and sum(p.gold for p in pairs) == 319
    res = ps_eval(minilm, {3: random_sae(384, 0), 6: random_sae(384, 1)}, pairs, batch_size=128)
    for r in res.values():
        c = r.counts
        assert c["pairs"] == 638 and c["single_token"] + c["multi_token"] + c["truncated"] == 638
        assert c["balanced_true"] == c["balanced_false"] == min(c["single_token_true"], c["single_token_false"])
        assert c["balanced"] > 300  # most WiC targets are one MiniLM wordpiece
        cm = r.confusion
        assert cm.tp + cm.fp + cm.tn + cm.fn == c["balanced"]
        assert all(0 <= r.to_dict()[f"pseval/layer{r.layer}/{m}"] <= 1 for m in ("f1", "specificity"))
    assert time.perf_counter() - start < 20
