"""Brown reader and the activation cache: vectors equal the model's hidden states, metadata aligns with the text,
the cache is reused only when it matches, and batches stream without repetition."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mini_brown import write_mini_nltk

from core.errors import DataError
from datamodules.activation_builder import CacheBuilder
from datamodules.activation_cache import META_COLUMNS, POS_TAGS, SPECIAL
from datamodules.activations import ActivationsDataModule, BatchRowSampler
from datamodules.brown import read_brown

BROWN_FILES = {
    # word/TAG tokens, one sentence per line, blank lines between paragraphs; "1/2/cd" has a slash in the word;
    # "zz" is not in the universal map (-> X); tags are upper-cased before mapping, as NLTK does.
    "brown/ca01": "\n\n\tThe/at man/nn is/bez playing/vbg ./.\n\n\tA/at dog/nn-tl reads/vbz 1/2/cd oddity/zz ./.\n",
    "brown/cb01": "\n\n\tthe/at boy./nn paints/vbz a/at car/nn\n",
}
TAG_MAP = "AT\tDET\nNN\tNOUN\nNN-TL\tNOUN\nBEZ\tVERB\nVBG\tVERB\nVBZ\tVERB\nCD\tNUM\n.\t.\n"


@pytest.fixture(scope="module")
def nltk_root(tmp_path_factory) -> Path:
    """A miniature NLTK data folder in the real format (corpora/brown.zip + taggers/universal_tagset.zip)."""
    root = tmp_path_factory.mktemp("nltk") / "nltk_data"
    return write_mini_nltk(root, BROWN_FILES, "ca01 news\ncb01 editorial\n", TAG_MAP).parent


def make_dm(model: str, tmp_path: Path, **kw) -> ActivationsDataModule:
    defaults = dict(model_name_or_path=model, cache_dir=str(tmp_path / "cache"), batch_size=16, max_length=32,
                    encode_batch_size=8)
    return ActivationsDataModule(**{**defaults, **kw})


# --------------------------------------------------------------------------------------------------- Brown
def test_brown_reader_on_a_handmade_zip(nltk_root):
    sents = read_brown(nltk_root)
    assert [s.words for s in sents] == [("The", "man", "is", "playing", "."),
                                        ("A", "dog", "reads", "1/2", "oddity", "."),
                                        ("the", "boy.", "paints", "a", "car")]
    assert sents[1].tags == ("DET", "NOUN", "VERB", "NUM", "X", ".")
    assert [s.category for s in sents] == ["news", "news", "editorial"]
    assert read_brown(nltk_root, tagset="brown")[0].tags == ("AT", "NN", "BEZ", "VBG", ".")
    assert len(read_brown(nltk_root, categories=["editorial"])) == 1
    assert len(read_brown(nltk_root, max_sentences=2)) == 2


def test_brown_reader_errors(nltk_root, tmp_path):
    with pytest.raises(DataError, match="corpora/brown.zip"):
        read_brown(tmp_path)
    with pytest.raises(DataError, match="unknown Brown categories"):
        read_brown(nltk_root, categories=["poetry"])
    bad = tmp_path / "bad" / "nltk_data"
    (bad / "corpora").mkdir(parents=True)
    with zipfile.ZipFile(bad / "corpora" / "brown.zip", "w") as z:
        z.writestr("brown/ca01", "\tThe/at man\n")
        z.writestr("brown/cats.txt", "ca01 news\n")
    with pytest.raises(DataError, match=r"brown/ca01:1: token 'man' has no '/TAG'"):
        read_brown(bad.parent, tagset="brown")


@pytest.mark.data
def test_brown_news_matches_nltk_counts(shared_data):
    sents = read_brown(shared_data, categories=["news"])
    assert len(sents) == 4623 and sum(len(s.words) for s in sents) == 100554  # nltk brown.sents/words('news')
    assert sents[0].tags[:6] == ("DET", "NOUN", "NOUN", "ADJ", "NOUN", "VERB")


# ------------------------------------------------------------------------------------------ token vectors
def hidden_states(model_dir: str, texts: list[str], layer: int) -> list[tuple[list[int], torch.Tensor]]:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=32)
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[layer][0]
        out.append((enc["input_ids"][0].tolist(), h))
    return out


@pytest.mark.parametrize("special_tokens", ["drop", "keep"])
def test_token_vectors_equal_the_models_hidden_states(tiny_model_no_dropout, sample_data, tmp_path, special_tokens):
    dm = make_dm(tiny_model_no_dropout, tmp_path, source=str(sample_data / "sentences.txt"), max_sentences=20,
                 layer=1, special_tokens=special_tokens, cache_dtype="float32", shard_sentences=7)
    dm.prepare_data()
    dm.setup()
    texts = [line for line in (sample_data / "sentences.txt").read_text().splitlines()][:20]
    ref = hidden_states(tiny_model_no_dropout, texts, layer=1)
    meta = dm.cache.metadata()
    vectors = dm.cache.gather(np.arange(len(dm.cache)))
    rows = 0
    for sid, (ids, h) in enumerate(ref):
        keep = list(range(len(ids))) if special_tokens == "keep" else list(range(1, len(ids) - 1))
        m = meta[rows : rows + len(keep)]
        assert (m[:, 0] == sid).all() and m[:, 1].tolist() == keep
        assert m[:, 2].tolist() == [ids[p] for p in keep]
        torch.testing.assert_close(vectors[rows : rows + len(keep)], h[keep], atol=1e-5, rtol=1e-5)
        tags = m[:, 4].tolist()
        assert tags == [SPECIAL if p in (0, len(ids) - 1) else -1 for p in keep]  # plain text: no POS tags
        rows += len(keep)
    assert rows == len(dm.cache) == dm.cache.meta["n_vectors"]
    assert dm.cache.meta["columns"] == list(META_COLUMNS) and len(dm.cache.shards) == 3


def test_brown_wordpieces_get_their_words_tag(tiny_model_no_dropout, nltk_root, tmp_path):
    dm = make_dm(tiny_model_no_dropout, tmp_path, source="brown", data_root=str(nltk_root), special_tokens="keep")
    dm.prepare_data()
    dm.setup()
    meta = dm.cache.metadata()
    third = meta[meta[:, 0] == 2]  # "the boy. paints a car": "boy." -> "boy" + "." (one word, two pieces)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_no_dropout)
    pieces = tok.convert_ids_to_tokens(third[:, 2].tolist())
    assert pieces == ["[CLS]", "the", "boy", ".", "paints", "a", "car", "[SEP]"]
    assert third[:, 3].tolist() == [-1, 0, 1, 1, 2, 3, 4, -1]  # word index
    assert [POS_TAGS[t] for t in third[:, 4]] == ["SPECIAL", "DET", "NOUN", "NOUN", "VERB", "DET", "NOUN", "SPECIAL"]
    assert third[:, 5].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]  # first piece of its word
    second = meta[meta[:, 0] == 1]
    assert "X" in [POS_TAGS[t] for t in second[:, 4]] and "NUM" in [POS_TAGS[t] for t in second[:, 4]]
    rec = dm.cache.sentences()[2]
    assert rec["words"][1] == "boy." and rec["tags"][1] == "NOUN" and rec["category"] == "editorial"


def test_prefix_tokens_are_dropped_but_change_the_context(tiny_model_no_dropout, sample_data, tmp_path):
    kw = dict(source=str(sample_data / "sentences.txt"), max_sentences=5, cache_dtype="float32")
    plain = make_dm(tiny_model_no_dropout, tmp_path, **kw)
    prefixed = make_dm(tiny_model_no_dropout, tmp_path, text_prefix="hello world ", **kw)
    for dm in (plain, prefixed):
        dm.prepare_data()
        dm.setup()
    a, b = plain.cache.metadata(), prefixed.cache.metadata()
    assert (a[:, 2] == b[:, 2]).all()  # the same tokens are kept: only the prefix was dropped
    assert (b[:, 1] == a[:, 1] + 2).all()  # two prefix tokens before them
    va, vb = plain.cache.gather(np.arange(len(a))), prefixed.cache.gather(np.arange(len(b)))
    assert (va - vb).abs().max() > 1e-3


def test_sentence_vectors_equal_mean_pooling_with_specials(tiny_model_no_dropout, sample_data, tmp_path):
    from lightning_modules.components.encoder import Encoder

    texts = (sample_data / "sentences.txt").read_text().splitlines()[:12]
    want = Encoder(tiny_model_no_dropout, pooler="mean", max_length=32).encode(texts)
    for normalize in (False, True):
        dm = make_dm(tiny_model_no_dropout, tmp_path, source=str(sample_data / "sentences.txt"), max_sentences=12,
                     level="sentence", normalize=normalize, cache_dtype="float32")
        dm.prepare_data()
        dm.setup()
        got = dm.cache.gather(np.arange(12))
        ref = torch.nn.functional.normalize(want, dim=-1) if normalize else want
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert dm.cache.metadata()[:, 0].tolist() == list(range(12))


# ---------------------------------------------------------------------------------------- cache identity
def test_cache_is_reused_and_a_mismatch_is_refused(tiny_model_no_dropout, tiny_model, sample_data, tmp_path,
                                                   monkeypatch):
    src = dict(source=str(sample_data / "sentences.txt"), max_sentences=10)
    first = make_dm(tiny_model_no_dropout, tmp_path, layer=1, **src)
    first.prepare_data()
    folder = first.cache_folder()

    def no_model(self):
        raise AssertionError("the cache should have been reused without running the model")

    monkeypatch.setattr(CacheBuilder, "load", no_model)
    again = make_dm(tiny_model_no_dropout, tmp_path, layer=1, **src)
    again.prepare_data()
    again.setup()
    assert again.cache.folder == folder
    # another layer (or model) under cache_dir: another folder, never the old one
    assert make_dm(tiny_model_no_dropout, tmp_path, layer=2, **src).cache_folder() != folder
    assert make_dm(tiny_model, tmp_path, layer=1, **src).cache_folder() != folder  # different weights
    # the same explicit folder with other settings: a clear error naming what differs
    with pytest.raises(DataError, match=r"layer: cache has 1, requested 2"):
        make_dm(tiny_model_no_dropout, tmp_path, layer=2, cache_path=str(folder), **src).prepare_data()
    with pytest.raises(DataError, match=r"model_fingerprint"):
        make_dm(tiny_model, tmp_path, layer=1, cache_path=str(folder), **src).setup()


def test_layer_out_of_range_names_the_valid_range(tiny_model, sample_data, tmp_path):
    with pytest.raises(DataError, match=r"layer 3 is out of range .* 2 layers.* 0 \(embeddings output\) to 2"):
        make_dm(tiny_model, tmp_path, source=str(sample_data / "sentences.txt"), layer=3).prepare_data()
    dm = make_dm(tiny_model, tmp_path, source=str(sample_data / "sentences.txt"), layer=-3, max_sentences=2)
    assert dm.identity()["layer"] == 0


def test_interrupted_build_resumes_at_the_missing_shard(tiny_model_no_dropout, sample_data, tmp_path, monkeypatch):
    kw = dict(source=str(sample_data / "sentences.txt"), max_sentences=30, shard_sentences=10)
    dm = make_dm(tiny_model_no_dropout, tmp_path, **kw)
    dm.prepare_data()
    folder = dm.cache_folder()
    whole = np.load(folder / "shard_00002.vectors.npy")
    (folder / "meta.json").unlink()
    (folder / "shard_00002.meta.npy").unlink()  # the last shard was being written
    calls = []
    original = CacheBuilder.encode_layers

    def counting(self, corpus, idx):
        calls.append(list(idx))
        return original(self, corpus, idx)

    monkeypatch.setattr(CacheBuilder, "encode_layers", counting)
    again = make_dm(tiny_model_no_dropout, tmp_path, **kw)
    again.prepare_data()
    assert calls == [list(range(20, 30))]
    np.testing.assert_array_equal(np.load(folder / "shard_00002.vectors.npy"), whole)
    n = sum(len(np.load(folder / f"shard_0000{i}.meta.npy")) for i in range(3))
    assert json.loads((folder / "meta.json").read_text())["n_vectors"] == n


def test_bad_options_are_rejected(tiny_model, tmp_path):
    with pytest.raises(DataError, match="level"):
        make_dm(tiny_model, tmp_path, level="word")
    with pytest.raises(DataError, match="special_tokens"):
        make_dm(tiny_model, tmp_path, special_tokens="mask")
    with pytest.raises(DataError, match="not found"):
        make_dm(tiny_model, tmp_path, source="missing/file.txt").prepare_data()
    with pytest.raises(DataError, match="not a local folder and the Hugging Face hub could not provide it"):
        make_dm("no-such-owner/no-such-model", tmp_path, source="missing.txt").prepare_data()  # offline in tests
    with pytest.raises(DataError, match=r"max_sentences must be >= 1 or null \(all sentences\), got -10"):
        make_dm(tiny_model, tmp_path, max_sentences=-10)
    (tmp_path / "s.txt").write_text("a man is playing\n")
    with pytest.raises(DataError, match=r"data.max_length=100 is longer than .* takes: 64 tokens"):
        make_dm(tiny_model, tmp_path, source=str(tmp_path / "s.txt"), max_length=100).prepare_data()


# --------------------------------------------------------------------------------------------- streaming
def test_sampler_permutes_each_epoch_and_splits_ranks():
    rows = np.arange(100)
    s = BatchRowSampler(rows, batch_size=8, shuffle=True, seed=0, drop_last=True)
    epoch0 = np.concatenate(list(s))
    s.set_epoch(1)
    epoch1 = np.concatenate(list(s))
    assert len(s) == 12 and len(np.unique(epoch0)) == 96 and not np.array_equal(epoch0, epoch1)
    ranks = [BatchRowSampler(rows, 8, True, 0, True, rank=r, world=2) for r in range(2)]
    got = [np.concatenate(list(r)) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) == set(epoch0)
    tail = BatchRowSampler(rows, 8, shuffle=False, seed=0, drop_last=False)
    assert len(tail) == 13 and np.array_equal(np.concatenate(list(tail)), rows)


def test_dataloader_batches_and_validation_split(tiny_model_no_dropout, sample_data, tmp_path):
    dm = make_dm(tiny_model_no_dropout, tmp_path, source=str(sample_data / "sentences.txt"), val_fraction=0.2,
                 batch_size=32, max_sentences=100)
    dm.prepare_data()
    dm.setup()
    meta = dm.cache.metadata()
    val_sentences = set(meta[dm.val_rows, 0])
    assert 8 <= len(val_sentences) <= 35 and not val_sentences & set(meta[dm.train_rows, 0])  # ~20% of 100
    batches = list(dm.train_dataloader())
    assert all(b.shape == (32, dm.dim) and b.dtype == torch.float32 for b in batches)
    assert len(batches) == len(dm.train_rows) // 32
    val = torch.cat(list(dm.val_dataloader()))
    torch.testing.assert_close(val, dm.cache.gather(dm.val_rows))
    assert dm.sample(10, seed=3).shape == (10, dm.dim)
    torch.testing.assert_close(dm.sample(10, seed=3), dm.sample(10, seed=3))


@pytest.mark.data
def test_minilm_brown_alignment(minilm, shared_data, tmp_path):
    dm = make_dm(minilm, tmp_path, source="brown", data_root=str(shared_data), max_sentences=2, max_length=64)
    dm.prepare_data()
    dm.setup()
    meta = dm.cache.metadata()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    first = meta[meta[:, 0] == 0]
    pieces = tok.convert_ids_to_tokens(first[:, 2].tolist())
    i = pieces.index("atlanta")
    assert pieces[i : i + 3] == ["atlanta", "'", "s"] and first[i : i + 3, 3].tolist() == [10, 10, 10]
    assert [POS_TAGS[t] for t in first[i : i + 3, 4]] == ["NOUN"] * 3 and first[i : i + 3, 5].tolist() == [1, 0, 0]
    assert dm.dim == 384 and SPECIAL not in first[:, 4]


@pytest.mark.data
def test_sts_task_source_gives_each_distinct_sentence_once(tiny_model_no_dropout, shared_data, tmp_path):
    from datamodules.sts import load_sts

    dm = make_dm(tiny_model_no_dropout, tmp_path, source="stsb", split="dev", data_root=str(shared_data),
                 level="sentence", max_sentences=40)
    dm.prepare_data()
    dm.setup()
    pairs = load_sts("stsb", "dev", str(shared_data))
    want = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))[:40]
    assert [r["text"] for r in dm.cache.sentences()] == want and len(dm.cache) == 40


@pytest.mark.parametrize("level, special", [("token", "drop"), ("token", "keep"), ("sentence", "drop")])
def test_several_layers_from_one_pass_equal_per_layer_builds(tiny_model_no_dropout, sample_data, tmp_path, level,
                                                               special, monkeypatch):
    """prepare_layers: one forward per batch for layers 0, 1, 2 (and -1, the same as 2) writes the very caches the
    per-layer builds write, vector for vector, each reusable alone."""
    from datamodules.activations import prepare_layers

    kw = dict(source=str(sample_data / "sentences.txt"), max_sentences=30, shard_sentences=12, level=level,
              special_tokens=special, cache_dtype="float32")
    passes = []
    original = CacheBuilder.encode_layers

    def counting(self, corpus, idx):
        passes.append(self.layers)
        return original(self, corpus, idx)

    monkeypatch.setattr(CacheBuilder, "encode_layers", counting)
    together = prepare_layers([make_dm(tiny_model_no_dropout, tmp_path / "one", layer=L, **kw) for L in (0, 1, 2, -1)])
    assert passes == [(0, 1, 2)] * 3  # three shards, one pass each for all layers
    for L, dm in zip((0, 1, 2), together):
        alone = make_dm(tiny_model_no_dropout, tmp_path / "per_layer", layer=L, **kw)
        alone.prepare_data()
        a, b = dm.cache_folder(), alone.cache_folder()
        assert a.name == b.name and dm.built_here
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for shard in sorted(a.glob("shard_*.npy")):
            np.testing.assert_array_equal(np.load(shard), np.load(b / shard.name))
        assert (a / "texts.jsonl").read_text() == (b / "texts.jsonl").read_text()
        meta_a, meta_b = (json.loads((f / "meta.json").read_text()) for f in (a, b))
        assert {k: v for k, v in meta_a.items() if k != "build"} == {k: v for k, v in meta_b.items() if k != "build"}
        assert meta_a["layer"] == L and meta_a["build"]["layers_in_pass"] == [0, 1, 2]
    assert together[3].cache.folder == together[2].cache.folder
    # a second call finds them all built: no forward pass
    passes.clear()
    prepare_layers([make_dm(tiny_model_no_dropout, tmp_path / "one", layer=L, **kw) for L in (0, 2)])
    assert passes == []


def test_prepare_layers_refuses_other_settings(tiny_model_no_dropout, sample_data, tmp_path):
    from datamodules.activations import prepare_layers

    kw = dict(source=str(sample_data / "sentences.txt"), max_sentences=10)
    with pytest.raises(DataError, match="differ in more than their layer: max_length"):
        prepare_layers([make_dm(tiny_model_no_dropout, tmp_path, layer=1, **kw),
                        make_dm(tiny_model_no_dropout, tmp_path, layer=2, max_length=16, **kw)])
