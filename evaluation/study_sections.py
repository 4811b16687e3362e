"""The studies' reports from their results: tables, figures and sections (:mod:`evaluation.interpret.study_report`
writes them as pages). Each builder takes a study's results, what :mod:`evaluation.study_runs` measured or the
``study.json`` a study wrote, draws its PNG figures into the report folder and returns the sections; nothing is
measured again, so ``train.py study report`` redraws a report from ``study.json`` alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evaluation.interpret.figures import Series, bar_chart, density_chart, line_chart
from evaluation.interpret.frontier import frontier_plot
from evaluation.interpret.pos import TAGS
from evaluation.interpret.sts_recovered import baseline_lines, task_name
from evaluation.interpret.study_report import Section, Table

#: The PS-Eval scores a study reports (the suite's ``interpret/pseval/...`` keys).
PSEVAL_KEYS = ("specificity", "f1", "accuracy", "precision", "recall")
#: Training-minus-held-out explained variance above which a study says the SAE memorised its training sentences.
MEMORISED_GAP = 0.05


def memorised(name: str, train_ev: float | None, held_ev: float, detail: str = "") -> str | None:
    """The sentence a study prints and reports when an SAE explains more than :data:`MEMORISED_GAP` more variance
    of its training vectors than of held-out ones; None when it does not."""
    if train_ev is None or not train_ev - held_ev > MEMORISED_GAP:
        return None
    return (f"{name} explains {train_ev:.3f} of its training vectors' variance but {held_ev:.3f} of held-out ones: "
            f"it memorised training sentences{detail}; give it more sentences or fewer latents.")


def decomposition_report(out: Path, data: dict) -> list[Section]:
    """The decomposition study's report sections (and figures, drawn into ``out``) from its results (what
    :func:`~evaluation.study_runs.run_decomposition` measured, or its ``study.json``): the models' table, the probes
    by layer and the shared and model-specific features."""
    models, cross = data["models"], data["cross_model"]
    head = Table(["model", "layer", "SAE", "held-out EV", "training EV", "never active (held out)", "L0",
                  "POS purity", "purity >= 0.8", "pooling survival", "feature share", "PS-Eval specificity",
                  "PS-Eval F1", "PS-Eval accuracy", "STS-B recovered"],
                 [[n, m["layer"], f"{m['num_latents']} x k{m['k']}, lr {m['lr'] or 'default'}",
                   m["held_out"]["explained_variance"],
                   m["train_fit"]["explained_variance"], m["held_out"]["never_active"], m["held_out"]["l0"],
                   m["suite"]["pos_purity_mean"],
                   m["suite"]["pos_purity_ge_0.8"], m["suite"]["pooling_survival_mean"],
                   m["suite"]["pooling_feature_share"], m["pseval"].get("specificity"), m["pseval"].get("f1"),
                   m["pseval"].get("accuracy"), m["suite"].get("sts_recovered/stsb")] for n, m in models.items()])
    rows, series = [], []
    for n, m in models.items():
        res = m["probes"]["results"]
        for kind in next(iter(res.values())):
            layers = sorted(int(k[5:]) for k in res if k.startswith("layer"))
            series.append(Series(f"{n} {kind}", layers, [res[f"layer{L}"][kind]["accuracy"] for L in layers]))
            series.append(Series(f"{n} {kind} SAE codes", [m["layer"]], [res["sae"][kind]["accuracy"]]))
        for inp, by_kind in res.items():
            rows.append([n, inp] + [v for k in by_kind.values() for v in (k["accuracy"], k["macro_f1"])]
                        + [next(iter(by_kind.values()))["majority_accuracy"]])
    kinds = list(next(iter(next(iter(models.values()))["probes"]["results"].values())))
    probe_table = Table(["model", "input"] + [f"{k} {s}" for k in kinds for s in ("accuracy", "macro-F1")]
                        + ["majority"], rows)
    line_chart(out / "probes.png", series, "POS probe accuracy by layer", "layer (hidden_states index)",
               "test accuracy (split by sentence)")
    first = next(iter(models.values()))["probes"]
    notes = [memorised(n, m["train_fit"]["explained_variance"], m["held_out"]["explained_variance"],
                       f" (its cache's variance is {m['sentence_variance_share']:.0%} between sentences; "
                       f"{m['cache_sentences']:,} cached sentences, held-out ones included, for {m['num_latents']:,} "
                       "latents), so its features describe those sentences more than the model")
             for n, m in models.items()]
    shares = ", ".join(f"{n} {m['sentence_variance_share']:.0%}" for n, m in models.items())
    sections = [Section("Models", [f"Brown token caches ([CLS]/[SEP] kept); SAE settings in study.json; the suite on "
                                   f"{data['settings']['suite_tokens']} tokens per model. Explained variance (EV) on "
                                   "held-out sentences and on as many training vectors; share of each cache's variance "
                                   f"that lies between sentences: {shares}.", *filter(None, notes)], [head],
                        links=[(f"{n}: feature browser", m["browser"]) for n, m in models.items()]),
                Section("POS probes", [f"Universal POS tag of each word's first wordpiece; {first['n_train']:,} train "
                                       f"and {first['n_test']:,} test words of {first['n_sentences']:,} sentences, "
                                       "split by sentence. 'sae' is the probe on the SAE's codes of the SAE's layer."],
                        [probe_table], ["probes.png"])]
    if cross:
        pair_rows = [[k.replace("|", " vs "), v["n_features"], v["n_silent"], v["n_shared"], v["shared_share"],
                      v["match_corr_mean"], v["match_corr_median"], v["n_mutual"]] for k, v in cross["pairs"].items()]
        model_rows = [[n, v["n_features"], v["n_silent"], v["shared_any_share"], v["shared_all_share"],
                       v["specific_share"], v["pos_shared"]["purity_mean"], v["pos_specific"]["purity_mean"]]
                      for n, v in cross["models"].items()]
        tags = [t for t in TAGS if any(t in v[g]["dominant"] for v in cross["models"].values()
                                       for g in ("pos_shared", "pos_specific"))]
        pos_rows = [[f"{n} {g[4:]}"] + [v[g]["dominant"].get(t, 0.0) for t in tags]
                    for n, v in cross["models"].items() for g in ("pos_shared", "pos_specific")]
        bar_chart(out / "cross_model_pos.png", tags, {r[0]: r[1:] for r in pos_rows},
                  "Dominant POS of shared and specific features", "share of the group's features")
        sections.append(Section(
            "Shared and model-specific features",
            [f"Features matched by the correlation of their activations over {cross['sentences']:,} Brown sentences' "
             f"words (max over a word's pieces); shared: match correlation >= {cross['threshold']} "
             f"({cross['method']} match). Silent: no activation on those words."],
            [Table(["model vs other", "features", "silent", "shared", "shared share", "mean match corr",
                    "median match corr", "mutual pairs"], pair_rows),
             Table(["model", "features", "silent", "shared (any)", "shared (all)", "specific", "purity shared",
                    "purity specific"], model_rows),
             Table(["group"] + tags, pos_rows)], ["cross_model_pos.png"]))
    return sections


def frontier_report(out: Path, data: dict) -> list[Section]:
    """The frontier study's report sections (and figures, drawn into ``out``) from its results (what
    :func:`~evaluation.study_runs.run_frontier` measured, or its ``study.json``): the sweep's table, explained
    variance and STS recovered against L0, the browsed SAE's density and energy."""
    points, extra, browse, settings = data["points"], data["extra"], data["browsed"], data["settings"]
    model = Path(data["model"]).name
    frontier_plot(points + extra, out / "frontier.png", f"{model} layer {data['layer']}: explained variance vs L0")
    figures = ["frontier.png"]
    if sts := data.get("sts"):  # absent in results of studies older than STS recovered
        frontier_plot(points + extra, out / "frontier_sts.png",
                      f"{model} layer {data['layer']}: STS recovered ({task_name(sts['task'])}) vs L0",
                      "sts_recovered", f"STS recovered on {task_name(sts['task'])} (1: nothing lost)")
        figures.append("frontier_sts.png")
    text = [f"{model} hidden_states[{data['layer']}] Brown tokens; every SAE trained {settings['steps']} steps of "
            f"{settings['batch_size']} vectors; scored with the inference threshold on {data['eval_vectors']:,} "
            "held-out vectors.", *baseline_lines(sts)]
    sections = [Section("Explained variance against L0", text, figures=figures),
                Section("Table", ["Training EV: the same scores on as many training vectors (much above the "
                                  "held-out one: the SAE memorised its training sentences).",
                                  *filter(None, (memorised(q["name"], q.get("train_explained_variance"),
                                                           q["explained_variance"]) for q in points + extra))],
                        [Table(["SAE", "latents", "k", "L0", "explained variance", "training EV", "FVU",
                                "never active", "STS recovered", "frontier"],
                               [[q["name"], q["num_latents"], q["k"], q["l0"], q["explained_variance"],
                                 q.get("train_explained_variance"), q["fvu"], q["never_active"],
                                 q.get("sts_recovered"), "yes" if q.get("on_front") else ""]
                                for q in points + extra])])]
    if density := data.get("browsed_density"):  # absent in results of studies older than the density histogram
        latents = next(q["num_latents"] for q in points if q["name"] == browse)
        density_chart(out / "density.png", {int(b): n for b, n in density.items()},
                      f"{browse}: feature density on {data['eval_vectors']:,} held-out vectors", latents)
        sections.append(Section("Feature density", [f"The {browse} SAE's latents by the log10 share of the held-out "
                                                    "vectors they fire on (SAELens' feature density; 'never': silent "
                                                    "on all)."],
                                [Table(["log10 firing frequency", "latents"], [[b, n] for b, n in density.items()])],
                                ["density.png"]))
    sections.append(energy_section(out, data, browse))
    return sections


def energy_section(out: Path, data: dict, browse: str) -> Section:
    """The browsed SAE's features by energy E[z_i]: stability across seeds per energy decile, and the share of each
    feature's energy on informative vs imaginative Brown prose."""
    stab, deciles, groups = data["stability"], data["energy_deciles"], data["group_share"]
    text = [f"The suite on the {browse} SAE; features ranked by energy E[z_i] (mean code over the suite's tokens, "
            "zeros included) and cut into ten equal deciles."]
    figures = []
    if stab:
        text.append(f"Stability: the decoder rows of seeds {stab['seeds'][0]} and {stab['seeds'][1]} matched one to "
                    f"one ({stab['method']}): mean cosine {stab['mean_cos']:.3f}.")
        line_chart(out / "stability.png",
                   [Series("matched decoder cosine", list(range(10)), [d["stability_cos"] for d in deciles])],
                   f"{browse}: stability across seeds by energy decile", "energy decile (0: lowest)",
                   "mean matched cosine", y_range=(0, 1))
        figures.append("stability.png")
    tables = [Table(["energy decile", "mean energy", "matched cosine"],
                    [[d["decile"], d["energy_mean"], d["stability_cos"]] for d in deciles])]
    if groups:
        text.append(f"Group share E_a[z_i] / (E_a[z_i] + E_b[z_i]), a = informative prose (Brown A-J), b = imaginative "
                    f"(K-R): mean {groups['mean']:.3f}; {groups['specific_a']:.0f} features above 0.9, "
                    f"{groups['specific_b']:.0f} below 0.1.")
        tables.append(Table(["group share", "features"], [[f"{b / 10:.1f}-{(b + 1) / 10:.1f}", int(groups[f"hist/{b}"])]
                                                           for b in range(10)]))
    return Section("Features: energy, stability, groups", text, tables, figures,
                   [(f"{browse}: feature browser", f"saes/{browse}/interpret/features.html")])


def pseval_report(out: Path, data: dict) -> list[Section]:
    """The PS-Eval study's report sections (and figure, drawn into ``out``) from its results (what
    :func:`~evaluation.study_runs.run_pseval` measured, or its ``study.json``, whose layers are strings)."""
    results = dict(sorted((int(L), r) for L, r in data["layers"].items()))

    def train_ev(r: dict) -> float | None:  # None in results of studies older than the training scores
        return r.get("train_fit", {}).get("explained_variance")

    layers = list(results)
    line_chart(out / "pseval.png", [Series({"f1": "F1"}.get(k, k), layers,
                                           [results[L]["pseval"].get(k, float("nan")) for L in layers])
                                    for k in ("specificity", "f1", "accuracy")],
               f"PS-Eval by layer: {Path(data['model']).name}", "layer (hidden_states index)", "score", y_range=(0, 1))
    table = Table(["layer", "balanced pairs", *PSEVAL_KEYS, "held-out EV", "training EV", "L0", "POS purity",
                   "STS-B recovered"],
                  [[L, r["pairs"], *(r["pseval"].get(k) for k in PSEVAL_KEYS), r["held_out"]["explained_variance"],
                    train_ev(r), r["held_out"]["l0"], r["suite"]["pos_purity_mean"],
                    r["suite"].get("sts_recovered/stsb")] for L, r in results.items()])
    notes = [memorised(f"the layer-{L} SAE", train_ev(r), r["held_out"]["explained_variance"])
             for L, r in results.items()]
    sections = [Section("PS-Eval by layer", ["WiC dev pairs whose target is one token in both contexts, T/F balanced; "
                                            "'same top feature' predicts 'same sense'.", *filter(None, notes)],
                        [table], ["pseval.png"],
                        [(f"layer {L}: feature browser", r["browser"]) for L, r in results.items()])]
    return sections


#: Each study's report, by the name its results record: the page's title and the builder of its sections.
REPORTS: dict[str, tuple[str, Callable[[Path, dict], list[Section]]]] = {
    "decomposition": ("Decomposition study", decomposition_report), "frontier": ("Sparsity frontier", frontier_report),
    "pseval": ("PS-Eval by layer", pseval_report)}

__all__ = ["MEMORISED_GAP", "PSEVAL_KEYS", "REPORTS", "decomposition_report", "energy_section", "frontier_report",
           "memorised", "pseval_report"]
