"""`train.py study ...` end to end on tiny BERTs over a generated Brown corpus: the report folders hold exactly what the
suite's functions give for the SAEs the study trained; a rerun reuses the SAEs; the frontier's points, the PNGs and
the pages; wrong inputs give one-line errors naming the option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from mini_brown import TWO_GENRES_TAG_MAP, write_mini_nltk
from test_pseval import E2E_ROWS, write_wic
from wandb_records import logged_history, read_records

import train
from core.errors import DataError
from datamodules.activation_cache import META_SENTENCE, ActivationCache
from datamodules.activations import held_out
from datamodules.wic import load_wic
from evaluation.interpret.codes import encode_sparse
from evaluation.interpret.cross_model import compare_models, word_codes
from evaluation.interpret.frontier import score_sae, sentence_variance_share
from evaluation.interpret.pos import label_features
from evaluation.interpret.probes import probe_caches
from evaluation.interpret.pseval import ps_eval
from evaluation.interpret.stability import energy_deciles, match_decoders, stability_by_decile
from evaluation.study_build import sentence_view
from lightning_modules.export import load_sae


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG, read by matplotlib."""
    from matplotlib.image import imread

    return imread(path).shape[:2]


ROOT = Path(__file__).resolve().parents[1]
WORDS = [("the", "at"), ("a", "at"), ("man", "nn"), ("dog", "nn"), ("guitar", "nn"), ("pasta", "nn"),
         ("is", "bez"), ("playing", "vbg"), ("cooking", "vbg"), ("reads", "vbz"), ("two", "cd"), (".", ".")]


def write_brown(root: Path, n: int = 60) -> Path:
    """``root/nltk_data`` with ``n`` random tagged sentences in two genres; returns ``root``."""
    rng = np.random.default_rng(0)

    def sentences(k: int) -> str:
        return "".join("\n\t" + " ".join("/".join(WORDS[i]) for i in rng.integers(0, len(WORDS), rng.integers(3, 8)))
                       + "\n" for _ in range(k))

    write_mini_nltk(root / "nltk_data", {"brown/ca01": sentences(n // 2), "brown/ck01": sentences(n - n // 2)},
                    "ca01 news\nck01 fiction\n", TWO_GENRES_TAG_MAP)
    write_wic(root / "wic", E2E_ROWS, ["T"] * 6 + ["F"] * 6)
    return root


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    return write_brown(tmp_path_factory.mktemp("study_data"))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[str]:
    base = tmp_path_factory.mktemp("models")
    return [str(build_tiny_model(base / name, dropout=0.0, seed=s)) for s, name in enumerate(("bert-a", "bert-b"))]


TINY = ["--steps", "8", "--batch_size", "16", "--sae.expansion_factor", "2", "--sae.k", "4",
        "--sae.threshold_start", "2", "--max_length", "32", "--top_k", "20", "--n_unique", "5", "--n_contexts", "3",
        "--val_fraction", "0.3", "--suite_tokens", "null"]


def sentence_share_loop(x: np.ndarray, sid: np.ndarray) -> float:
    """Between-sentence share of the variance, from the formula, one sentence at a time."""
    mean = x.mean(0)
    total = sum(float(((r - mean) ** 2).sum()) for r in x)
    within = 0.0
    for s in np.unique(sid):
        rows = x[sid == s]
        within += float(((rows - rows.mean(0)) ** 2).sum())
    return 1 - within / total


def test_sentence_variance_share_against_the_formula():
    rng = np.random.default_rng(3)
    sid = np.repeat([7, 2, 9, 4], [3, 1, 5, 2])
    x = rng.normal(size=(len(sid), 5)) + 3 * rng.normal(size=(10, 5))[sid]
    want = sentence_share_loop(x, sid)
    assert 0.5 < want < 1
    # shards of any size and chunks smaller than a shard give the same share
    assert sentence_variance_share([x], sid) == pytest.approx(want, rel=1e-12)
    assert sentence_variance_share([x[:4], torch.tensor(x[4:])], sid, chunk_rows=3) == pytest.approx(want, rel=1e-12)
    # every token of a sentence the same vector: all of the variance is between sentences; one sentence: none
    assert sentence_variance_share([x[[0, 0, 5, 5, 5]]], np.array([1, 1, 2, 2, 2])) == pytest.approx(1.0)
    assert sentence_variance_share([x], np.zeros(len(x))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="11 rows but 3 sentence ids"):
        sentence_variance_share([x], sid[:3])


def test_memorisation_note_and_per_model_keys(tmp_path, capsys, monkeypatch):
    from commands import study
    from evaluation.interpret.study_report import Section, Table
    from evaluation.study_runs import per_model
    from evaluation.study_sections import memorised

    assert memorised("m", 0.70, 0.66) is None and memorised("m", None, 0.5) is None  # gap 0.04
    note = memorised("m", 0.80, 0.60, " (detail)")
    assert note == ("m explains 0.800 of its training vectors' variance but 0.600 of held-out ones: it memorised "
                    "training sentences (detail); give it more sentences or fewer latents.")
    # keys as listed, or naming the same folder
    lrs = {"bge_small_en": 1e-3, "sentence-transformers/all-MiniLM-L6-v2": 2e-3}
    assert per_model(lrs, "/models/bge_small_en", 5e-3) == 1e-3
    assert per_model(lrs, "BAAI/bge-small-en", 5e-3) == 1e-3
    assert per_model(lrs, "sentence-transformers/all-MiniLM-L6-v2", 5e-3) == 2e-3
    assert per_model(lrs, "/m/all-mpnet-base-v2", 5e-3) == 5e-3
    # a report whose SAE memorised says so; a W&B failure after the report is written is a one-line warning
    table = Table(["layer", "x"], [[1, 0.5]])
    data = {"study": "pseval", "settings": {"wandb_project": "p"}}

    def broken(*args):
        raise RuntimeError("no network")

    monkeypatch.setattr(study, "log_wandb", broken)
    study.report(tmp_path, "T", [Section("S", [note], [table])], data, "p")
    out = capsys.readouterr().out
    assert "warning: --wandb_project p: the report was not logged to W&B (RuntimeError: no network)" in out
    assert "it memorised training sentences (detail)" in (tmp_path / "report.md").read_text()


def test_decomposition_study_report_equals_the_functions(two_models, study_root, tmp_path, capsys):
    out = tmp_path / "decomp"
    argv = ["study", "decomposition", "--models", *two_models, "--data_root", str(study_root), "--output_dir",
            str(out), "--probe_sentences", "40", "--probe_tokens", "null", "--mlp_epochs", "2", "--mlp_hidden", "8",
            "--compare_sentences", "50", "--match_threshold", "0.3", "--lrs", '{"bert_b": 0.002}', *TINY]
    train.main(argv)
    data = json.loads((out / "study.json").read_text())
    assert set(data["models"]) == {"bert-a", "bert-b"}
    for f in ("report.md", "report.html", "probes.png", "cross_model_pos.png"):
        assert (out / f).is_file(), f
    assert png_size(out / "probes.png") == (520, 900) and (out / "probes.svg").is_file()
    page = (out / "report.html").read_text()
    assert "data:image/svg+xml;base64," in page and "bert-a/L2/interpret/features.html" in page
    saes, caches = {}, {}
    for name, m in data["models"].items():
        folder = out / name / "L2"
        assert (folder / "interpret" / "features.html").is_file() and (folder / "sae" / "train.json").is_file()
        assert m["layer"] == 2 and m["num_layers"] == 2 and m["sae"]["steps"] == 8
        assert m["lr"] == m["sae"]["settings"]["lr"] == {"bert-a": 5e-3, "bert-b": 2e-3}[name]  # --lrs by folder
        sae = load_sae(folder / "sae")
        cache = ActivationCache(m["cache"])
        saes[name], caches[name] = sae, cache
        # the suite's summary and PS-Eval, as `train.py interpret` writes them
        summary = json.loads((folder / "interpret" / "summary.json").read_text())
        assert m["suite"]["pos_purity_mean"] == pytest.approx(summary["interpret/pos_purity_mean"])
        want_ps = ps_eval(m["model"], {2: sae}, load_wic("dev", str(study_root)))[2]
        assert m["pseval"]["specificity"] == pytest.approx(want_ps.specificity)
        # probes: layers 0..2 over the same words, and the SAE's codes, as probe_caches gives them
        layer_caches = {k: ActivationCache(c) for k, c in m["probe_caches"].items()}
        assert set(m["probes"]["results"]) == {"layer0", "layer1", "layer2", "sae"}
        assert m["probe_caches"]["layer2"] == m["cache"] and m["probes"]["n_sentences"] == 40  # the probe caches'
        want = probe_caches(layer_caches, sae=sae, sae_input="layer2", max_tokens=None,
                            mlp={"epochs": 2, "hidden": 8, "seed": 0})
        assert m["probes"]["n_test"] == want.n_test and m["probes"]["n_train"] == want.n_train
        for inp in ("layer0", "layer1", "layer2", "sae"):
            for kind in ("linear", "mlp"):
                assert m["probes"]["results"][inp][kind]["accuracy"] == pytest.approx(
                    want.results[inp][kind].accuracy)
                assert m["probes"]["results"][inp][kind]["macro_f1"] == pytest.approx(
                    want.results[inp][kind].macro_f1)
        # held-out scores of the SAE
        dm_rows = np.flatnonzero(held_out(cache.metadata()[:, META_SENTENCE].astype(np.int64), 0.3))
        assert m["held_out"]["explained_variance"] == pytest.approx(
            score_sae(sae, cache.gather(dm_rows))["explained_variance"], rel=1e-6)
        # ... and on as many training vectors, drawn from the rows the SAE trained on
        train_rows = np.flatnonzero(~held_out(cache.metadata()[:, META_SENTENCE].astype(np.int64), 0.3))
        drawn = np.sort(np.random.default_rng(0).choice(train_rows, len(dm_rows), replace=False))
        fit = score_sae(sae, cache.gather(drawn))
        assert m["train_fit"]["n"] == len(dm_rows) and m["train_fit"]["fvu"] == pytest.approx(fit["fvu"], rel=1e-6)
        assert m["fit_gap"] == pytest.approx(fit["explained_variance"] - m["held_out"]["explained_variance"])
        assert m["sentence_variance_share"] == pytest.approx(
            sentence_share_loop(cache.gather(np.arange(len(cache))).double().numpy(),
                                cache.metadata()[:, META_SENTENCE]))
    report_md = (out / "report.md").read_text()
    assert ("memorised training sentences" in report_md) == any(m["fit_gap"] > 0.05 for m in data["models"].values())
    # cross-model: the same sentences, codes, labels and matches
    common = np.intersect1d(*(np.unique(c.metadata()[:, META_SENTENCE]) for c in caches.values()))
    chosen = np.sort(np.random.default_rng(0).permutation(common)[:50])
    words, labels = {}, {}
    for name, cache in caches.items():
        codes = encode_sparse(saes[name], sentence_view(cache, chosen))
        labels[name] = label_features(codes, cache.sentences(), top_k=20, n_unique=5, n_contexts=0)
        words[name] = word_codes(codes)
    want = compare_models(words, labels, 0.3).to_dict()
    assert data["cross_model"]["sentences"] == len(chosen) == 50
    assert data["cross_model"]["models"] == json.loads(json.dumps(want["models"]))
    assert data["cross_model"]["pairs"] == json.loads(json.dumps(want["pairs"]))
    # a rerun reuses the trained SAEs and gives the same numbers
    capsys.readouterr()
    train.main(argv)
    assert "reusing the SAE" in capsys.readouterr().out
    again = json.loads((out / "study.json").read_text())
    for name in caches:
        assert again["models"][name]["held_out"] == data["models"][name]["held_out"]
        assert again["models"][name]["probes"] == data["models"][name]["probes"]


def test_frontier_and_pseval_studies(two_models, study_root, tmp_path, monkeypatch, sample_data):
    out = tmp_path / "frontier"
    tsv = str(sample_data / "sts_dev.tsv")
    train.main(["study", "frontier", "--model", two_models[0], "--data_root", str(study_root), "--output_dir",
                str(out), "--ks", "[2, 4]", "--expansions", "[1, 2]", "--eval_tokens", "1000", "--sts_tasks",
                f"[{tsv}]", *TINY])
    data = json.loads((out / "study.json").read_text())
    points = {p["name"]: p for p in data["points"]}
    # STS recovered of each SAE of the sweep: one more column and a plot against L0
    from evaluation.interpret.sts_recovered import sts_recovered

    again = sts_recovered(load_sae(out / "saes" / "1x4"), [tsv], str(study_root), max_length=32,
                          reads=ActivationCache(data["cache"]).meta)[tsv]
    assert points["1x4"]["sts_recovered"] == pytest.approx(again["recovered"], abs=1e-9)
    assert data["sts"] == {"task": tsv, "clean": again["clean"], "ablated": again["ablated"],
                           "ablated_constant": again["ablated_constant"]}
    assert png_size(out / "frontier_sts.png") == (520, 900) and "STS recovered" in (out / "report.md").read_text()
    assert sum(data["browsed_density"].values()) == points["2x4"]["num_latents"]
    assert set(points) == {"1x2", "1x4", "2x2", "2x4"} and points["2x4"]["num_latents"] == 64
    for p in points.values():  # the frontier flag: nothing else has L0 <= and more explained variance
        beaten = any(q["l0"] <= p["l0"] and q["explained_variance"] > p["explained_variance"]
                     for q in points.values() if q is not p)
        assert p["on_front"] == (not beaten)
    assert data["browsed"] == "2x4" and (out / "saes" / "2x4" / "interpret" / "features.html").is_file()  # --sae's
    # every point is scored on as many training vectors too
    cache = ActivationCache(data["cache"])
    sid = cache.metadata()[:, META_SENTENCE].astype(np.int64)
    val_rows, train_rows = np.flatnonzero(held_out(sid, 0.3)), np.flatnonzero(~held_out(sid, 0.3))
    drawn = np.sort(np.random.default_rng(0).choice(train_rows, len(val_rows), replace=False))
    assert points["1x2"]["train_explained_variance"] == pytest.approx(
        score_sae(load_sae(out / "saes" / "1x2"), cache.gather(drawn))["explained_variance"], rel=1e-6)
    # stability: the browsed SAE again with seed 1, decoders matched one to one, by energy decile of the suite's codes
    sae_a, sae_b = load_sae(out / "saes" / "2x4"), load_sae(out / "saes" / "2x4_seed1")
    assert json.loads((out / "saes" / "2x4_seed1" / "train.json").read_text())["settings"]["seed"] == 1
    assert not torch.equal(sae_a.W_dec, sae_b.W_dec)
    matching = match_decoders(sae_a.W_dec, sae_b.W_dec)
    assert data["stability"]["seeds"] == [0, 1]
    assert data["stability"]["mean_cos"] == pytest.approx(matching.mean_cos, rel=1e-6)
    energy = encode_sparse(sae_a, cache).energy
    want = stability_by_decile(matching, energy)
    for d in data["energy_deciles"]:
        assert d["energy_mean"] == pytest.approx(float(energy[energy_deciles(energy) == d["decile"]].mean()), rel=1e-5)
        assert d["stability_cos"] == pytest.approx(want[d["decile"]], rel=1e-6, nan_ok=True)
    assert sum(data["group_share"][f"hist/{b}"] for b in range(10)) > 0  # news and fiction sentences
    assert png_size(out / "stability.png") == (520, 900)
    assert "matched cosine" in (out / "report.md").read_text()
    assert png_size(out / "frontier.png") == png_size(out / "density.png") == (520, 900)
    assert "| 2x4 | 64 | 4 |" in (out / "report.md").read_text()
    # `study report` redraws the same report from study.json alone: the same pages' text and the same pixels
    train.main(["study", "report", str(out / "study.json"), "--output_dir", str(tmp_path / "redrawn")])
    assert (tmp_path / "redrawn" / "report.md").read_text() == (out / "report.md").read_text()
    from matplotlib.image import imread

    for png in ("frontier.png", "frontier_sts.png", "density.png", "stability.png"):
        np.testing.assert_array_equal(imread(tmp_path / "redrawn" / png), imread(out / png))
    # the recipe's SAE is scored on the same held-out vectors: an SAE of the sweep gets its own numbers back
    train.main(["study", "frontier", "--model", two_models[0], "--data_root", str(study_root), "--output_dir",
                str(out), "--ks", "[2, 4]", "--expansions", "[1, 2]", "--eval_tokens", "1000",
                "--recipe_sae", str(out / "saes" / "2x4"), "--browse", "2x4", *TINY])
    again = json.loads((out / "study.json").read_text())
    assert again["extra"][0]["explained_variance"] == pytest.approx(points["2x4"]["explained_variance"])
    with pytest.raises(DataError, match="--browse 3x3"):
        train.main(["study", "frontier", "--model", two_models[0], "--data_root", str(study_root), "--output_dir",
                    str(out), "--ks", "[2, 4]", "--expansions", "[1, 2]", "--browse", "3x3", *TINY])

    out = tmp_path / "pseval"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    train.main(["study", "pseval", "--model", two_models[0], "--data_root", str(study_root), "--output_dir",
                str(out), "--layers", "[1, 2]", "--wandb_project", "embedlab-test", *TINY])
    data = json.loads((out / "study.json").read_text())
    # W&B (offline, no credentials): the report's table, its figure and page, and every number in the summary
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    history = logged_history(run_file)[0]
    assert history["ps-eval-by-layer/table0/_type"] == "table-file"
    assert history["ps-eval-by-layer/pseval/_type"] == "image-file" and history["report/_type"] == "html-file"
    table = json.loads((run_file.parent / "files" / history["ps-eval-by-layer/table0/path"]).read_text())
    assert table["columns"][:3] == ["layer", "balanced pairs", "specificity"]
    assert [row[0] for row in table["data"]] == [1, 2]
    assert table["data"][1][2] == pytest.approx(data["layers"]["2"]["pseval"]["specificity"])
    summary, config = {}, {}
    for r in read_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind in ("summary", "run"):
            items = r.summary.update if kind == "summary" else r.run.config.update
            (summary if kind == "summary" else config).update({i.key: json.loads(i.value_json) for i in items})
    assert summary["layers/2/held_out/explained_variance"] == pytest.approx(
        data["layers"]["2"]["held_out"]["explained_variance"])
    assert config["layers"] == [1, 2] and config["steps"] == 8
    data["layers"] = {int(k): v for k, v in data["layers"].items()}
    assert set(data["layers"]) == {1, 2}
    saes = {L: load_sae(out / f"L{L}" / "sae") for L in (1, 2)}
    want = ps_eval(two_models[0], saes, load_wic("dev", str(study_root)))
    for L in (1, 2):
        assert data["layers"][L]["pseval"]["specificity"] == pytest.approx(want[L].specificity)
        assert data["layers"][L]["pairs"] == 12
        assert (out / f"L{L}" / "interpret" / "features.html").is_file()
    assert png_size(out / "pseval.png") == (520, 900)
    assert "layer 2: feature browser" in (out / "report.html").read_text()


def test_wrong_inputs_name_the_option(two_models, study_root, tmp_path):
    base = ["--data_root", str(study_root), "--output_dir", str(tmp_path / "x"), *TINY]
    cases = [
        (["study", "nope"], "unknown study 'nope'"),
        (["study", "decomposition", "--models", two_models[0], two_models[0], *base], "share a report folder"),
        (["study", "decomposition", "--models", two_models[0], "--probe_kinds", "[svm]", *base], "--probe_kinds"),
        (["study", "decomposition", "--models", two_models[0], "--match_threshold", "2", *base], "--match_threshold"),
        (["study", "decomposition", "--models", two_models[0], "--lrs", '{"bert-x": 0.1}', *base],
         "--lrs: ['bert-x'] name none of --models"),
        (["study", "decomposition", "--models", two_models[0], "--text_prefixes", '{"bert": "q: "}', *base],
         "--text_prefixes: ['bert'] name none"),
        (["study", "frontier", "--model", two_models[0], "--ks", "[0]", *base], "--ks"),
        (["study", "frontier", "--model", two_models[0], "--stability_seed", "0", *base], "--stability_seed 0"),
        (["study", "frontier", "--model", two_models[0], "--max_sentences", "0", *base], "--max_sentences 0"),
        (["study", "pseval", "--model", two_models[0], *base[:-2], "--val_fraction", "1.5"], "--val_fraction 1.5"),
    ]
    for argv, message in cases:
        with pytest.raises(DataError, match=message.replace("[", r"\[")):
            train.main(argv)
    with pytest.raises(DataError, match="WiC did not load"):
        train.main(["study", "pseval", "--model", two_models[0], *base, "--data_root", str(tmp_path)])
    # from the shell: one line naming the problem, no traceback
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "study", "nope"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and res.stderr.startswith("error: study: unknown study 'nope'")
    assert "Traceback" not in res.stderr and torch.get_num_threads() >= 1


def test_a_folder_that_is_no_model_is_named_before_any_model_is_studied(two_models, study_root, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("read the paper")
    out = tmp_path / "report"
    with pytest.raises(DataError) as raised:
        train.main(["study", "decomposition", "--models", two_models[0], str(notes), "--data_root", str(study_root),
                    "--output_dir", str(out), *TINY])
    assert train.user_error(raised.value) == f"{notes} is not a model folder: it has no config.json (it holds todo.txt)"
    assert not out.exists()  # the first model was not studied for nothing


def test_study_configs_parse():
    from jsonargparse import ArgumentParser  # noqa: F401  (the study parsers are jsonargparse's)

    from commands.study import STUDIES

    configs = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
    assert configs
    for path in configs:
        name = path.stem.split("_", 1)[0]
        assert name in STUDIES, path
        with pytest.raises(SystemExit) as done:  # --help after --config: parsed, then the help (nothing runs)
            STUDIES[name](["--config", str(path), "--print_config"])
        assert done.value.code == 0
