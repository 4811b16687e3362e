"""The one STS score (core.metrics.sts_spearman) against the formula written out, and each place that scores STS
(validation, the STSEvaluator callback, MCR2's choice of initialisation, ``train.py evaluate``) against it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from callbacks.sts import STSEvaluator
from core.metrics import SentenceIndex, sts_spearman
from datamodules.sts import STSPairs
from evaluation.evaluate import SentenceEmbeddings, score_subsets
from lightning_modules import ContrastiveModule, MCR2Module

# Six pairs by hand, no cosine a rounding away from another (rows 2 and 4 are exactly 0 at every prefix), gold
# scores with a tie.
Z1 = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 2, 3, 4], [2, 0, 1, 0], [0, 1, 1, 1]]
Z2 = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1], [4, 3, 2, 1], [0, 1, 0, 2], [1, 3, 1, 0]]
GOLD = [5.0, 4.0, 1.0, 3.0, 1.0, 2.5]


def plain_cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def plain_score(z1: list[list[float]], z2: list[list[float]], gold: list[float], dims: list[int]) -> float:
    """Spearman x 100 of the cosine of each pair's first k dims, averaged over ``dims``."""
    rhos = [spearmanr([plain_cosine(a[:k], b[:k]) for a, b in zip(z1, z2)], gold).statistic * 100 for k in dims]
    return sum(rhos) / len(rhos)


@pytest.mark.parametrize("dims", [None, [2, 4]])
def test_the_scorer_is_the_formula(dims):
    z1, z2 = torch.tensor(Z1, dtype=torch.float64), torch.tensor(Z2, dtype=torch.float64)
    want = plain_score(Z1, Z2, GOLD, dims or [4])
    assert sts_spearman(z1, z2, GOLD, dims) == pytest.approx(want, abs=1e-12)
    assert sts_spearman(z1.float(), z2.float(), GOLD, dims) == pytest.approx(want, abs=1e-5)
    assert abs(plain_score(Z1, Z2, GOLD, [2]) - plain_score(Z1, Z2, GOLD, [4])) > 1  # the prefixes differ


def test_a_non_finite_embedding_scores_nan():
    z1 = torch.tensor(Z1, dtype=torch.float32)
    z1[3, 0] = float("nan")
    assert math.isnan(sts_spearman(z1, torch.tensor(Z2, dtype=torch.float32), GOLD))


# ------------------------------------------------------------------------------------- the callers, same embeddings
WORDS = [f"s{i}" for i in range(12)]
PAIRS = STSPairs("toy", WORDS[:6], WORDS[6:], GOLD)
VECTORS = dict(zip(WORDS, Z1 + Z2))


def table(sentences, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([VECTORS[s] for s in sentences], dtype=dtype)


def scorer(dims=None, dtype=torch.float32) -> float:
    return sts_spearman(table(PAIRS.sentences1, dtype), table(PAIRS.sentences2, dtype), PAIRS.scores, dims)


def test_sentence_index_scores_pairs_from_the_distinct_sentences():
    index = SentenceIndex([PAIRS, STSPairs("again", WORDS[:2], WORDS[:2], [1.0, 2.0])])
    assert index.sentences == sorted(WORDS) and len(index) == 12
    assert index.score(table(index.sentences), PAIRS, [2, 4]) == scorer([2, 4])


class TableEmbedder:
    name = "table"

    def encode(self, sentences: list[str]) -> torch.Tensor:
        return table(sentences)


def test_evaluate_scores_with_the_scorer():
    halves = [STSPairs("a", WORDS[:3], WORDS[6:9], GOLD[:3]), STSPairs("b", WORDS[3:6], WORDS[9:], GOLD[3:])]
    got = score_subsets("toy", halves, SentenceEmbeddings(TableEmbedder(), {"toy": halves}))
    assert got.all == scorer(dtype=torch.float64)
    for p in halves:
        want = sts_spearman(table(p.sentences1, torch.float64), table(p.sentences2, torch.float64), p.scores)
        assert got.subsets[p.name]["spearman"] == want


@pytest.mark.parametrize("dims", [None, [2, 4]])
def test_sts_evaluator_scores_with_the_scorer(dims):
    module = SimpleNamespace(encoder=SimpleNamespace(tokenize=list), selection_dims=dims,
                             encode_ids=lambda ids, batch_size: table(ids))  # the "ids" are the sentences
    callback = STSEvaluator()
    callback.pairs = PAIRS
    callback.setup(None, module, "validate")
    assert callback.evaluate(module) == scorer(dims)


@pytest.mark.parametrize("dims", [None, [2, 4]])
def test_mcr2_dev_score_scores_with_the_scorer(dims, tmp_path: Path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{s}\n" for a, b, s in zip(PAIRS.sentences1, PAIRS.sentences2, PAIRS.scores)))
    head = SimpleNamespace(out_dim=4, load_state_dict=lambda state: None)
    module = SimpleNamespace(init_data_root=None, init_dev=str(dev), head=head, encode=table, selection_dims=dims)
    assert MCR2Module.dev_score(module, {}) == scorer(dims)


@pytest.mark.parametrize("dims", [None, [2, 4]])
def test_validation_scores_with_the_scorer(tiny_model, dims):
    """Validation takes the cosines batch by batch and ranks them at the epoch's end: the scorer's number, over the
    Matryoshka prefixes when the module has them (the score its checkpoints are selected by, under the same name)."""
    module = ContrastiveModule(tiny_model, pooler="mean", max_length=16, matryoshka_dims=dims)
    rows = table(WORDS)
    module.embed_batch = lambda input_ids, attention_mask: rows[input_ids[:, 0]]  # each sentence's id: its row
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    ids = torch.tensor([[[WORDS.index(a), 0], [WORDS.index(b), 0]] for a, b in zip(PAIRS.sentences1,
                                                                                     PAIRS.sentences2)])
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "scores": s} for i, s in zip(ids, PAIRS.scores)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(data, batch_size=4))  # two batches: 4 pairs, then 2
    assert logged == {"val/sts0_spearman": scorer(dims)}
