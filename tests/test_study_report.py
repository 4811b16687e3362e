"""`train.py study report RESULT.json --output_dir DIR`: a study's report redrawn from its results alone, with nothing
measured again. Hand-made results of each study give the report's PNGs (drawn by matplotlib, with the numbers of the
JSON on them), its pages listing the same numbers, and the results copied as study.json; results an earlier version
of a study wrote give what they can or a one-line error; with --wandb_project the figures reach W&B as images."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from wandb_records import logged_history

pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[plots]'")

import train  # noqa: E402
from core.errors import DataError  # noqa: E402
from evaluation.interpret import figures  # noqa: E402
from evaluation.interpret.study_report import cell  # noqa: E402

SETTINGS = {"steps": 400, "batch_size": 1024, "suite_tokens": 30000, "wandb_project": None}
TAGS = {"NOUN": 0.8, "VERB": 0.15, "ADJ": 0.05}


def probes(accuracy: dict[str, float]) -> dict:
    """Probe results as ``probe_caches(...).to_dict()`` gives them: linear and mlp per input (mlp 0.01 higher)."""
    return {"n_sentences": 100, "n_train": 800, "n_test": 200, "results": {
        inp: {kind: {"accuracy": a + (0.01 if kind == "mlp" else 0.0), "macro_f1": a - 0.1, "majority_accuracy": 0.3}
              for kind in ("linear", "mlp")} for inp, a in accuracy.items()}}


def model(layer: int, accuracy: dict[str, float], ev: float) -> dict:
    scores = {"explained_variance": ev, "fvu": 1 - ev, "l0": 31.5, "never_active": 0.002, "n": 5000}
    return {"model": f"m/layer{layer}", "layer": layer, "num_latents": 3072, "k": 32, "lr": 5e-3,
            "held_out": scores, "train_fit": {**scores, "explained_variance": ev + 0.01}, "fit_gap": 0.01,
            "sentence_variance_share": 0.27, "cache_sentences": 5000,
            "suite": {"pos_purity_mean": 0.6, "pos_purity_ge_0.8": 0.18, "pooling_survival_mean": 0.85,
                      "pooling_feature_share": 0.67},
            "pseval": {"specificity": 0.4, "f1": 0.54, "accuracy": 0.5}, "probes": probes(accuracy),
            "browser": f"m{layer}/L{layer}/interpret/features.html"}


def group(purity: float) -> dict:
    return {"n": 10, "purity_mean": purity, "dominant": TAGS}


DECOMPOSITION = {
    "study": "decomposition", "argv": [], "settings": SETTINGS,
    "models": {"small": model(6, {"layer0": 0.9243, "layer3": 0.9486, "layer6": 0.8531, "sae": 0.8801}, 0.7893),
               "base": model(12, {"layer0": 0.9321, "layer6": 0.9532, "layer12": 0.8412, "sae": 0.7731}, 0.6831)},
    "cross_model": {"threshold": 0.5, "method": "best", "sentences": 2000,
                    "pairs": {"small|base": {"n_features": 3072, "n_silent": 8, "n_shared": 1339,
                                             "shared_share": 0.437, "match_corr_mean": 0.4787,
                                             "match_corr_median": 0.4632, "n_mutual": 1041}},
                    "models": {n: {"n_features": 3072, "n_silent": 8, "shared_any_share": 0.437,
                                   "shared_all_share": 0.437, "specific_share": 0.563, "pos_shared": group(0.5747),
                                   "pos_specific": group(0.6214)} for n in ("small", "base")}}}

FRONTIER = {
    "study": "frontier", "argv": [], "output_dir": "runs/study_frontier", "model": "org/MiniLM", "layer": 6,
    "eval_vectors": 16290, "browsed": "8x32", "settings": SETTINGS, "group_share": None, "extra": [],
    "points": [{"name": f"{e}x{k}", "num_latents": 384 * e, "k": k, "l0": k * 0.9, "explained_variance": ev,
                "train_explained_variance": ev + 0.02, "fvu": 1 - ev, "never_active": 0.01, "on_front": True,
                "sts_recovered": ev + 0.2}
               for e, k, ev in ((4, 8, 0.6230), (4, 32, 0.7308), (8, 8, 0.6387), (8, 32, 0.7385))],
    "stability": {"seeds": [0, 1], "mean_cos": 0.2934, "method": "hungarian"},
    "energy_deciles": [{"decile": d, "energy_mean": 0.001 * (d + 1), "stability_cos": 0.18 + 0.03 * d}
                       for d in range(10)],
    "sts": {"task": "stsb", "clean": 82.03, "ablated": 0.0, "ablated_constant": True},
    "browsed_density": {"-10": 101, "-4": 300, "-3": 2000, "-2": 671}}

PSEVAL = {"study": "pseval", "argv": [], "model": "org/MiniLM", "settings": SETTINGS, "layers": {
    str(L): {"pseval": {"specificity": s, "f1": 0.5, "accuracy": 0.52, "precision": 0.5, "recall": 0.4},
             "held_out": {"explained_variance": 0.9, "l0": 27.5}, "train_fit": {"explained_variance": 0.91},
             "suite": {"pos_purity_mean": 0.62}, "pairs": 456, "browser": f"L{L}/interpret/features.html"}
    for L, s in ((1, 0.7018), (2, 0.7325), (10, 0.5526))}}


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """``{file name: matplotlib Figure}`` of every figure the report saves (through figures.save_figure)."""
    seen, save = {}, figures.save_figure

    def spy(fig, path):
        seen[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(figures, "save_figure", spy)
    return seen


def redraw(tmp_path: Path, data: dict, name: str) -> Path:
    result, out = tmp_path / f"{name}.json", tmp_path / name
    result.write_text(json.dumps(data))
    train.main(["study", "report", str(result), "--output_dir", str(out)])
    assert json.loads((out / "study.json").read_text()) == data  # the results, as given
    return out


def check_files(out: Path, names: list[str], drawn: dict) -> tuple[str, str]:
    """The PNGs (matplotlib's, with an SVG beside each) are the figures drawn; the report's markdown and page."""
    from matplotlib.figure import Figure

    assert sorted(p.name for p in out.glob("*.png")) == sorted(names) == sorted(drawn)
    for name in names:
        assert isinstance(drawn[name], Figure)
        assert b"Matplotlib" in (out / name).read_bytes()[:200]  # the PNG's Software text, which matplotlib writes
        assert (out / name).with_suffix(".svg").is_file()
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def listed(value: float, md: str, page: str) -> bool:
    return f"| {cell(value)} |" in md and f"<td>{cell(value)}</td>" in page


def test_decomposition_report_from_its_results(tmp_path, drawn):
    out = redraw(tmp_path, DECOMPOSITION, "decomposition")
    md, page = check_files(out, ["probes.png", "cross_model_pos.png"], drawn)
    ax = drawn["probes.png"].axes[0]
    assert ax.get_title() == "POS probe accuracy by layer" and ax.get_xlabel() == "layer (hidden_states index)"
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    for name, m in DECOMPOSITION["models"].items():
        res = m["probes"]["results"]
        for kind in ("linear", "mlp"):
            layers = sorted(int(k[5:]) for k in res if k.startswith("layer"))
            assert lines[f"{name} {kind}"] == [[L, res[f"layer{L}"][kind]["accuracy"]] for L in layers]
            assert lines[f"{name} {kind} SAE codes"] == [[m["layer"], res["sae"][kind]["accuracy"]]]
            assert all(listed(r[kind]["accuracy"], md, page) for r in res.values())
        assert listed(m["held_out"]["explained_variance"], md, page)
    ax = drawn["cross_model_pos.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ADJ", "NOUN", "VERB"]  # TAGS' order, then only those
    heights = [round(p.get_height(), 9) for p in ax.patches]
    assert heights == [TAGS[t] for _ in range(4) for t in ("ADJ", "NOUN", "VERB")]  # 2 models x shared, specific
    assert "small: feature browser" in page and "(m6/L6/interpret/features.html)" in md


def test_frontier_report_from_its_results_and_from_older_ones(tmp_path, drawn):
    out = redraw(tmp_path, {**FRONTIER, "output_dir": str(tmp_path / "study")}, "frontier")  # where it ran
    md, page = check_files(out, ["frontier.png", "frontier_sts.png", "density.png", "stability.png"], drawn)
    ax = drawn["stability.png"].axes[0]
    assert ax.get_title() == "8x32: stability across seeds by energy decile"
    assert ax.get_xlabel() == "energy decile (0: lowest)" and ax.get_ylabel() == "mean matched cosine"
    np.testing.assert_array_equal(ax.lines[0].get_xydata(),
                                  [[d["decile"], d["stability_cos"]] for d in FRONTIER["energy_deciles"]])
    assert all(listed(d["stability_cos"], md, page) for d in FRONTIER["energy_deciles"])
    ax = drawn["frontier.png"].axes[0]
    assert {line.get_label(): line.get_xydata().tolist() for line in ax.lines} == {
        f"F = {n}": [[p["l0"], p["explained_variance"]] for p in FRONTIER["points"] if p["num_latents"] == n]
        for n in (1536, 3072)}
    assert all(listed(p["explained_variance"], md, page) and listed(p["l0"], md, page) for p in FRONTIER["points"])
    assert [p.get_height() for p in drawn["density.png"].axes[0].patches] == [101, 300, 2000, 671]
    assert "against the clean encoder (82.03)" in md and not (tmp_path / "study").exists()  # all in --output_dir
    # results written before STS recovered and the density histogram: the rest of the report
    older = {k: v for k, v in copy.deepcopy(FRONTIER).items() if k not in ("sts", "browsed_density")}
    drawn.clear()
    out = redraw(tmp_path, older, "older")
    md, _ = check_files(out, ["frontier.png", "stability.png"], drawn)
    assert "## Feature density" not in md and "mean cosine 0.293" in md


def test_pseval_report_layers_in_order_to_wandb_and_wrong_results(tmp_path, drawn, monkeypatch):
    result, out = tmp_path / "pseval.json", tmp_path / "pseval"
    result.write_text(json.dumps(PSEVAL))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline: no credentials
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    train.main(["study", "report", str(result), "--output_dir", str(out), "--wandb_project", "embedlab-test"])
    history = logged_history(next((out / "wandb").glob("offline-run-*/run-*.wandb")))[0]
    assert history["ps-eval-by-layer/pseval/_type"] == "image-file"  # the redrawn PNG, as a wandb.Image
    md, page = check_files(out, ["pseval.png"], drawn)
    ax = drawn["pseval.png"].axes[0]
    assert ax.lines[0].get_label() == "specificity"
    assert ax.lines[0].get_xydata().tolist() == [[1, 0.7018], [2, 0.7325], [10, 0.5526]]  # JSON's string keys, as ints
    assert md.index("| 2 | 456 |") < md.index("| 10 | 456 |") and listed(0.7325, md, page)
    bad = tmp_path / "bad.json"
    for data, message in (({"study": "nope"}, "names none of decomposition, frontier, pseval"),
                          ({**DECOMPOSITION, "models": {"a": {"layer": 1}}}, "the results lack 'num_latents'")):
        bad.write_text(json.dumps(data))
        with pytest.raises(DataError, match=message):
            train.main(["study", "report", str(bad), "--output_dir", str(tmp_path / "bad")])
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not readable as a study's JSON"):
        train.main(["study", "report", str(bad), "--output_dir", str(tmp_path / "bad")])
