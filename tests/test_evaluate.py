"""STS evaluation (SimCSE protocol): scoring maths, loading, checkpoint == export, CLI, bad input, MiniLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.errors import DataError
from core.metrics import spearman100
from datamodules.sts import STSPairs, apply_text_form, load_sts, load_sts_subsets, senteval_text
from evaluation.evaluate import (
    SentenceEmbeddings,
    evaluate_sts,
    format_table,
    load_embedder,
    parse_tasks,
    score_subsets,
)


class TableEmbedder:
    """Fixed embeddings looked up by sentence."""

    name = "table"

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.calls: list[list[str]] = []

    def encode(self, sentences: list[str]) -> torch.Tensor:
        self.calls.append(list(sentences))
        return torch.tensor([self.vectors[s] for s in sentences])


def plain_spearman(x: list[float], y: list[float]) -> float:
    """Spearman without ties from its textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)), x 100."""
    n = len(x)
    rank_x = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: x[i]))}
    rank_y = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: y[i]))}
    d2 = sum((rank_x[i] - rank_y[i]) ** 2 for i in range(n))
    return 100 * (1 - 6 * d2 / (n * (n * n - 1)))


def test_spearman_closed_form_and_ties():
    assert spearman100([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)  # 1 - 6 * 2 / (4 * 15)
    assert spearman100([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)
    # ties get average ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> Pearson of the ranks
    rx, ry = torch.tensor([1.5, 1.5, 3.0]), torch.tensor([1.0, 2.0, 3.0])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert spearman100([0.2, 0.2, 0.9], [1, 2, 3]) == pytest.approx(
        100 * float(rx @ ry / (rx.norm() * ry.norm()))
    )


def test_score_subsets_all_wmean_mean_against_a_loop():
    g = torch.Generator().manual_seed(0)
    words = [f"s{i}" for i in range(40)]
    vectors = {w: torch.randn(5, generator=g).tolist() for w in words}
    subsets = [
        STSPairs("a", words[0:10], words[10:20], torch.rand(10, generator=g).mul(5).tolist()),
        STSPairs("b", words[20:26], words[26:32], torch.rand(6, generator=g).mul(5).tolist()),
        STSPairs(
            "c", words[32:36] + ["s0"], words[36:40] + ["s1"], torch.rand(5, generator=g).mul(5).tolist()
        ),
    ]
    emb = TableEmbedder(vectors)
    got = score_subsets("toy", subsets, SentenceEmbeddings(emb, {"toy": subsets}))

    def cos(a, b):
        va, vb = torch.tensor(vectors[a]), torch.tensor(vectors[b])
        return float(va @ vb / (va.norm() * vb.norm()))

    per, all_cos, all_gold = {}, [], []
    for p in subsets:
        c = [cos(a, b) for a, b in zip(p.sentences1, p.sentences2)]
        per[p.name] = plain_spearman(c, p.scores)
        all_cos += c
        all_gold += p.scores
    assert got.n_pairs == 21
    assert {k: v["n"] for k, v in got.subsets.items()} == {"a": 10, "b": 6, "c": 5}
    for name, rho in per.items():
        assert got.subsets[name]["spearman"] == pytest.approx(rho, abs=1e-9)
    assert got.all == pytest.approx(plain_spearman(all_cos, all_gold), abs=1e-9)
    assert got.wmean == pytest.approx((10 * per["a"] + 6 * per["b"] + 5 * per["c"]) / 21, abs=1e-9)
    assert got.mean == pytest.approx(sum(per.values()) / 3, abs=1e-9)
    assert len(emb.calls) == 1 and len(emb.calls[0]) == 40  # each distinct sentence encoded once


def test_tasks_share_one_encoding_of_each_sentence(tmp_path):
    write_semeval_year(tmp_path / "sts12-16" / "STS12")
    rows = [
        "genre\tfile\t2012\t1\t4.2\ta man reads\ta guy reads",
        "genre\tfile\t2012\t2\t2.0\ta dog\tnew one",
    ]
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "sts-test.csv").write_text("\n".join(rows) + "\n")
    sentences = [
        "a man reads",
        "a guy reads",
        "a dog",
        "the puppy",
        "the car",
        "a box",
        "a lady paints",
        "a woman paints",
        "new one",
    ]
    emb = TableEmbedder({s: [float(i), 1.0] for i, s in enumerate(sentences)})
    got = evaluate_sts(emb, "sts12,stsb", data_root=str(tmp_path), text="raw")
    assert got["sts12"].n_pairs == 3 and got["stsb"].n_pairs == 2
    assert len(emb.calls) == 1 and sorted(emb.calls[0]) == sorted(set(sentences) - {"the puppy"})


def write_semeval_year(folder: Path) -> Path:
    """A made-up SemEval year: two subsets, one unscored pair, a gold file without input (like STS12's
    ALL)."""
    folder.mkdir(parents=True)
    (folder / "STS.input.news.txt").write_text(
        "a man reads\ta guy reads\tsrc\na dog\tthe puppy\nthe car\ta box\n"
    )
    (folder / "STS.gs.news.txt").write_text("4.2\n\n0.4\n")
    (folder / "STS.input.video.txt").write_text("a lady paints\ta woman paints\n")
    (folder / "STS.gs.video.txt").write_text("4.8\n")
    (folder / "STS.gs.ALL.txt").write_text("4.2\n\n0.4\n4.8\n")
    return folder


def test_semeval_subsets_skip_unscored_pairs(tmp_path):
    write_semeval_year(tmp_path / "sts12-16" / "STS12")
    subsets = load_sts_subsets("sts12", data_root=str(tmp_path), hub=False)
    assert [(p.name, len(p)) for p in subsets] == [("news", 2), ("video", 1)]
    assert subsets[0].sentences2 == ["a guy reads", "a box"] and subsets[0].scores == [4.2, 0.4]
    whole = load_sts("sts12", data_root=str(tmp_path))
    assert whole.name == "sts12" and len(whole) == 3 and whole.scores == [4.2, 0.4, 4.8]


def test_sickr_all_is_the_three_sick_files(tmp_path):
    (tmp_path / "sick").mkdir()
    header = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    rows = {
        "SICK_train.txt": ["a man reads\ta guy reads\t4.5", "a dog\tthe car\t1.5"],
        "SICK_trial.txt": ["a lady paints\ta woman paints\t4.8"],
        "SICK_test_annotated.txt": ["two students\ta pair of students\t4.6", "the sea\ta box\t1.1"],
    }
    for name, lines in rows.items():
        (tmp_path / "sick" / name).write_text(
            header + "".join(f"{i}\t{r}\tNEUTRAL\n" for i, r in enumerate(lines))
        )
    sentences = {s for lines in rows.values() for r in lines for s in r.split("\t")[:2]}
    emb = TableEmbedder({s: [1.0, float(len(s)), float(s.count("a"))] for s in sentences})
    got = evaluate_sts(emb, ["sickr", "sickr_all"], data_root=str(tmp_path), text="raw")
    assert got["sickr"].n_pairs == 2  # the SimCSE protocol: test split only
    assert {k: v["n"] for k, v in got["sickr_all"].subsets.items()} == {
        "SICK_train.txt": 2,
        "SICK_trial.txt": 1,
        "SICK_test_annotated.txt": 2,
    }


def test_text_forms(tmp_path):
    # Moses (English, no escaping) then lower-case: SentEval's preprocessing of STS12-16 and STS-B
    assert senteval_text("Don't stop, it's the U.S. (really).") == "don 't stop , it 's the u.s. ( really ) ."
    write_semeval_year(tmp_path / "sts12-16" / "STS12")
    news = load_sts_subsets("sts12", data_root=str(tmp_path), hub=False, text="senteval")[0]
    assert news.sentences1 == ["a man reads", "the car"]
    caps = STSPairs("x", ["A Man plays."], ["Dogs, two."], [4.0])
    # SICK is tokenised but keeps its case
    assert apply_text_form("sickr", caps, "senteval").sentences1 == ["A Man plays ."]
    assert apply_text_form("stsb", caps, "senteval").sentences2 == ["dogs , two ."]
    # MTEB keeps STS-B raw, and STS12-16 as SentEval left them
    assert apply_text_form("stsb", caps, "mteb") == caps
    assert apply_text_form("sts15", caps, "mteb").sentences1 == ["a man plays ."]
    with pytest.raises(DataError, match="unknown text form 'moses'; choose from raw, senteval, mteb"):
        apply_text_form("stsb", caps, "moses")


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_task_lists_known_ones():
    with pytest.raises(
        DataError, match="unknown task 'sts17'.*sts12, sts13, sts14, sts15, sts16, stsb, sickr"
    ):
        parse_tasks("stsb,sts17")
    with pytest.raises(DataError, match="missing.tsv does not exist"):
        parse_tasks(["missing.tsv"])


def test_missing_data_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        evaluate_sts(TableEmbedder({}), "sts13", data_root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "sts12-16" / "STS13") in msg and "STS.input.<subset>.txt" in msg and "STS.gs" in msg
    with pytest.raises(DataError, match=r"stsb/sts-test.csv.*genre, file, year, id, score"):
        evaluate_sts(TableEmbedder({}), "stsb", data_root=str(tmp_path))


def test_bad_model_paths_and_names(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_model, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="has no weights.*model.safetensors"):
        load_embedder(str(folder))
    with pytest.raises(FileNotFoundError, match="neither a sentence-transformers folder"):
        load_embedder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_embedder(str(tmp_path / "nothing.ckpt"))
    with pytest.raises(ValueError, match="config.json' is a file but not a Lightning checkpoint"):
        load_embedder(str(folder / "config.json"))
    # huggingface_hub reads HF_HUB_OFFLINE when imported, before the conftest fixture sets it; without this,
    # the hub is tried over the network, with retries (a minute here)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="could not load model 'someone/not-a-model'.*offline, or a wrong name"):
        load_embedder("someone/not-a-model")


# ----------------------------------------------------------------------------- checkpoint == exported folder
@pytest.fixture(scope="module")
def trained(tiny_model, sample_data, tmp_path_factory):
    """A tiny ContrastiveModule after 3 steps, its checkpoint and its exported folder (mean pooling: the tiny
    random BERT's [CLS] vectors are nearly identical, cosines within 1e-4 of 1, too close to rank stably)."""
    import pytorch_lightning as pl

    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule
    from lightning_modules.export import export_sentence_transformer

    out = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0)
    module = ContrastiveModule(tiny_model, pooler="mean", mlp="always", max_length=16, lr=1e-2)
    data = SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    ckpt = out / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    folder = export_sentence_transformer(module, out / "export")
    return module, ckpt, folder


def test_checkpoint_and_export_give_the_same_numbers(trained, sample_data, tiny_model):
    _module, ckpt, folder = trained
    tsv = str(sample_data / "sts_dev.tsv")
    from_ckpt = evaluate_sts(load_embedder(str(ckpt)), [tsv])[tsv]
    from_folder = evaluate_sts(load_embedder(str(folder)), [tsv])[tsv]
    untrained = evaluate_sts(load_embedder(tiny_model), [tsv])[tsv]
    assert from_ckpt.n_pairs == 60
    # The two encode paths agree to ~1e-7 per coordinate; on some CPUs that swaps the ranks of two near-tied cosine
    # similarities of this tiny random model (seen: 8e-4 on Spearman x 100), so allow a rank swap, not more.
    assert from_ckpt.all == pytest.approx(from_folder.all, abs=5e-3)
    assert abs(from_ckpt.all - untrained.all) > 0.1  # the trained weights were really used


def test_cli_prints_table_and_writes_json(trained, sample_data, tmp_path, capsys):
    from train import main

    _module, ckpt, _folder = trained
    tsv = str(sample_data / "sts_dev.tsv")
    out = tmp_path / "r" / "results.json"
    main(["evaluate", "--model", str(ckpt), "--tasks", tsv, "--output", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rho = result["tasks"][tsv]["all"]
    header = [c.strip() for c in printed.splitlines()[1].strip("|").split("|")]
    assert header == ["", "sts_dev", "Avg."]
    assert f"{rho:.2f}" in printed.splitlines()[3] and "wmean" in printed
    assert result["avg"]["all"] == pytest.approx(rho)
    assert result["tasks"][tsv]["n_pairs"] == 60


def test_table_layout():
    from evaluation.evaluate import TaskScore

    scores = {t: TaskScore(t, 70.0 + i, 71.0 + i, 0.0, 10) for i, t in enumerate(["sts12", "stsb", "sickr"])}
    lines = format_table(scores).splitlines()
    assert [c.strip() for c in lines[1].strip("|").split("|")] == [
        "",
        "STS12",
        "STSBenchmark",
        "SICKRelatedness",
        "Avg.",
    ]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["all", "70.00", "71.00", "72.00", "71.00"]
    assert [c.strip() for c in lines[4].strip("|").split("|")] == [
        "wmean",
        "71.00",
        "72.00",
        "73.00",
        "72.00",
    ]


# --------------------------------------------------------------------------------------- real data, MiniLM
@pytest.mark.data
def test_minilm_stsb_test_reproduces_mteb(shared_data, minilm):
    """82.03 is MTEB's published STS-B test score for all-MiniLM-L6-v2 (cosine Spearman)."""
    embedder = load_embedder("sentence-transformers/all-MiniLM-L6-v2", batch_size=128, device="cpu")
    score = evaluate_sts(embedder, "stsb", data_root=str(shared_data))["stsb"]
    assert score.n_pairs == 1379
    assert round(score.all, 2) == 82.03


def test_broken_checkpoints_and_lengths_are_named(trained, tmp_path):
    """A text file, a truncated download or a folder given as a checkpoint, and a max_length the model cannot
    take: errors that name the path or option, not torch's or transformers' internals."""
    from lightning_modules.export import load_module

    _, ckpt, folder = trained
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.ckpt: not a readable Lightning checkpoint"):
        load_module(tmp_path / "notes.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.ckpt: not a readable Lightning checkpoint"):
        load_module(tmp_path / "cut.ckpt")
    with pytest.raises(FileNotFoundError, match=r"is a folder; give the .ckpt file inside it"):
        load_module(tmp_path)
    with pytest.raises(ValueError, match=r"max_length must be at least 2 \(or unset for the model's own\), got 0"):
        load_embedder(str(ckpt), max_length=0)
    for model in (ckpt, folder):  # the tiny BERT has 64 positions
        with pytest.raises(ValueError, match=r"max_length=100 is longer than .* takes: 64 tokens"):
            load_embedder(str(model), max_length=100)


def test_a_checkpoint_renamed_without_its_suffix_still_evaluates_as_one(trained, sample_data, tmp_path):
    from train import main, user_error

    _, ckpt, _ = trained
    tsv = str(sample_data / "sts_dev.tsv")
    renamed = tmp_path / "model"  # e.g. `cp last.ckpt model`: still torch's zip archive
    renamed.write_bytes(ckpt.read_bytes())
    got, want = (evaluate_sts(load_embedder(str(model)), [tsv])[tsv].all for model in (renamed, ckpt))
    assert got == want
    notes = tmp_path / "notes"
    notes.write_text("not a model\n")
    with pytest.raises(ValueError) as raised:
        main(["evaluate", "--model", str(notes), "--tasks", tsv])
    assert user_error(raised.value) == (f"{str(notes)!r} is a file but not a Lightning checkpoint (neither .ckpt nor a "
                                        "zip archive, as torch writes them); give a checkpoint, a model folder or a "
                                        "hub name")


def test_export_never_mixes_into_an_unrelated_folder(trained, tmp_path):
    from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE
    from lightning_modules.export import export_sae, export_sentence_transformer

    module, _, folder = trained
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"run is not empty and holds no earlier export \(modules.json\)"):
        export_sentence_transformer(module, tmp_path / "run")
    with pytest.raises(FileExistsError, match=r"run is not empty and holds no earlier export \(cfg.json\)"):
        export_sae(BatchTopKSAE(BatchTopKConfig(d_in=4, num_latents=8, k=2)), tmp_path / "run")
    with pytest.raises(FileExistsError, match=r"notes.txt exists and is a file"):
        export_sentence_transformer(module, tmp_path / "run" / "notes.txt")
    with pytest.raises(FileExistsError, match=r"holds an earlier export: pass --overwrite to replace it"):
        export_sentence_transformer(module, folder)
    assert export_sentence_transformer(module, folder, overwrite=True) == folder  # replaced only when asked
