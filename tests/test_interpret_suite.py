"""The suite as a product: sentence samples of a cache, the InterpretSAE callback at the end of a real fit (files,
CSV and offline W&B records equal to calling the suite's functions directly) and `train.py interpret` on the
exported SAE giving the same numbers; bad inputs give clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mini_brown import write_two_genres
from test_interpret import random_corpus, random_sae, write_cache
from test_pseval import E2E_ROWS, write_wic

from callbacks.interpret import FEATURE_COLUMNS, InterpretSAE
from core.errors import DataError
from datamodules.activation_cache import ActivationCache
from datamodules.activations import ActivationsDataModule
from datamodules.wic import load_wic
from evaluation.interpret.codes import encode_sparse, read_rows
from evaluation.interpret.pseval import ps_eval
from evaluation.interpret.report import interpret_sae
from lightning_modules.export import export_sae, load_sae
from lightning_modules.family import SAE

SUITE_ARGS = {"top_k": 20, "n_unique": 5, "n_contexts": 3}


# -------------------------------------------------------------------------------------------- sampling
def test_sentence_sample_keeps_whole_sentences_in_cache_order(tmp_path):
    meta, sentences = random_corpus(40, seed=3)
    vectors = np.random.default_rng(0).normal(size=(len(meta), 6)).astype(np.float32)
    full = write_cache(tmp_path / "c", vectors, meta, sentences, cuts=(50, 90))
    view = full.sample_sentences(len(full) // 2, seed=1)
    assert 0 < len(view) <= len(full) // 2 and np.all(np.diff(view.rows) > 0)
    sid = full.metadata()[:, 0]
    chosen = np.unique(sid[view.rows])
    assert len(view) == np.isin(sid, chosen).sum()  # every row of every chosen sentence
    sizes = np.bincount(sid)
    for seed in range(30):  # filled up: no left-out sentence would still fit
        v = full.sample_sentences(len(full) // 2, seed=seed)
        left_out = np.setdiff1d(np.arange(40), np.unique(sid[v.rows]))
        assert len(v) <= len(full) // 2 < len(v) + sizes[left_out].min()
    np.testing.assert_array_equal(view.metadata(), full.metadata()[view.rows])
    torch.testing.assert_close(read_rows(view, 0, len(view)), full.gather(view.rows))
    torch.testing.assert_close(read_rows(view, 3, 17), full.gather(view.rows[3:17]))
    np.testing.assert_array_equal(full.sample_sentences(len(full) // 2, seed=1).rows, view.rows)
    assert not np.array_equal(full.sample_sentences(len(full) // 2, seed=2).rows, view.rows)
    inner = view.sample_sentences(len(view) // 2, seed=0)
    assert set(inner.rows) < set(view.rows)
    inner_sid = full.metadata()[inner.rows, 0]
    assert len(inner) == np.isin(sid, inner_sid).sum()  # whole sentences again
    np.testing.assert_array_equal(inner.metadata(), full.metadata()[inner.rows])
    assert full.sample_sentences(len(full)) is full
    # codes of the view are the codes of its rows, with their metadata
    sae = random_sae(d=6, n=8)
    codes = encode_sparse(sae, view, chunk_rows=7)
    np.testing.assert_allclose(codes.dense(), encode_sparse(sae, full.gather(view.rows).numpy()).dense(), atol=1e-6)
    np.testing.assert_array_equal(codes.meta, view.metadata())
    with pytest.raises(ValueError, match="every sentence has more than max_rows=1 vectors"):
        full.sample_sentences(1)


# ---------------------------------------------------------------------------------- callback and command
def without_seconds(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("interpret/seconds/")}


@pytest.fixture
def brown_wic_root(tmp_path) -> Path:
    root = write_two_genres(tmp_path / "data")
    write_wic(root / "wic", E2E_ROWS, ["T"] * 6 + ["F"] * 6)
    return root


def test_callback_after_fit_and_the_command_match_the_functions(tiny_model_no_dropout, brown_wic_root, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, WandbLogger
    from wandb_records import logged_history

    import train
    from lightning_modules import SAEModule

    dm = ActivationsDataModule(tiny_model_no_dropout, source="brown", data_root=str(brown_wic_root),
                               special_tokens="keep", cache_dir=str(tmp_path / "cache"), max_length=32,
                               cache_dtype="float32", batch_size=8)
    other = export_sae(random_sae(d=32, n=64, seed=5), tmp_path / "other_seed")
    cb = InterpretSAE(compare_sae=str(other), pseval=True, output_dir=str(tmp_path / "interp"), **SUITE_ARGS)
    wandb_logger = WandbLogger(project="embedlab-test", save_dir=str(tmp_path), offline=True)
    pl.seed_everything(0)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, threshold_start=2), lr=3e-3, init_samples=64)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=[CSVLogger(tmp_path / "csv"), wandb_logger],
                         callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, dm)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    # the files hold exactly what the suite's functions give for the trained SAE
    sae, sae_b = model.sae.eval(), load_sae(other)
    want = interpret_sae(sae, dm.cache, sae_b, **SUITE_ARGS)
    pairs = load_wic("dev", str(brown_wic_root))
    want_ps = ps_eval(tiny_model_no_dropout, {2: sae}, pairs)[2]
    out = tmp_path / "interp"
    summary = json.loads((out / "summary.json").read_text())
    assert summary.pop("layer") == 2 and summary.pop("cache") == str(dm.cache.folder) and summary.pop("sample") is None
    expected = without_seconds({**want.summary, **want_ps.to_dict("interpret/pseval")})
    fires = np.array([f["fires"] for f in want.features], dtype=np.float64)  # the density of the suite's tokens
    decade = np.clip(np.floor(np.log10(fires / want.summary["interpret/n_tokens"] + 1e-10)), -10, -1)
    expected.update({f"interpret/log10_density_hist/{b}": int((decade == b).sum()) for b in range(-10, 0)})
    assert without_seconds(summary) == pytest.approx(expected)
    assert json.loads((out / "features.json").read_text()) == want.features
    assert json.loads((out / "pseval.json").read_text())["2"]["confusion"] == want_ps.confusion.__dict__
    assert "feature-data" in (out / "features.html").read_text()
    assert {"load_sentences", "codes", "pos_labels", "pooling", "stability", "group_share", "records", "pseval",
            "write"} == {
        k.rsplit("/", 1)[1] for k in summary if k.startswith("interpret/seconds/")}
    assert summary["interpret/stability_method"] == "hungarian" and summary["interpret/pseval/layer2/balanced"] == 12

    # the local logger and W&B got the scalars at the last step; W&B also the tables and the page
    rows = list(csv.DictReader(open(Path(trainer.loggers[0].log_dir) / "metrics.csv")))
    last = [r for r in rows if r.get("interpret/pos_purity_mean")]
    assert float(last[0]["interpret/pos_purity_mean"]) == pytest.approx(want.summary["interpret/pos_purity_mean"])
    history = logged_history(next(run_dir.glob("run-*.wandb")))
    logged = {k: v for r in history for k, v in r.items()}
    assert logged["interpret/pseval/layer2/specificity"] == pytest.approx(want_ps.specificity)
    assert logged["interpret/features/_type"] == "table-file" and logged["interpret/pseval/_type"] == "table-file"
    assert logged["interpret/browser/_type"] == "html-file"
    table = json.loads((run_dir / "files" / logged["interpret/features/path"]).read_text())
    assert table["columns"] == FEATURE_COLUMNS and len(table["data"]) == 64
    assert [row[4] for row in table["data"]] == [f["fires"] for f in want.features]

    # on demand, from the exported SAE: the same numbers
    exported = export_sae(model, tmp_path / "sae")
    train.main(["interpret", "--sae", str(exported), "--cache", str(dm.cache.folder), "--compare_sae", str(other),
                "--data_root", str(brown_wic_root), "--pseval", "true", "--top_k", "20", "--n_unique", "5",
                "--n_contexts", "3"])
    again = json.loads((exported / "interpret" / "summary.json").read_text())
    assert without_seconds(again) == pytest.approx(without_seconds(json.loads((out / "summary.json").read_text())),
                                                   rel=1e-4, abs=1e-6)


def test_an_sae_that_cannot_read_the_cache_is_one_line_naming_both(tmp_path):
    import train

    def error(sae: Path) -> str:
        with pytest.raises(ValueError) as raised:
            train.main(["interpret", "--sae", str(sae), "--cache", str(cache.folder)])
        return train.user_error(raised.value)

    meta, sentences = random_corpus(6, seed=0)
    cache = write_cache(tmp_path / "c", np.ones((len(meta), 6), np.float32), meta, sentences)
    narrow = export_sae(random_sae(d=5), tmp_path / "narrow")
    assert error(narrow) == f"{narrow} takes 5-d inputs but {cache.folder} holds 6-d vectors: an SAE of another model?"
    of_tokens = random_sae(d=6)
    of_tokens.activations = {"level": "token"}
    of_tokens = export_sae(of_tokens, tmp_path / "of_tokens")
    (cache.folder / "meta.json").write_text(json.dumps(json.loads((cache.folder / "meta.json").read_text())
                                                       | {"level": "sentence"}))
    assert error(of_tokens) == (f"{cache.folder} holds sentence-level vectors ({of_tokens} was trained on token-level "
                                "ones); the interpretability suite needs a token-level cache (data.level=token)")
    assert not (tmp_path / "of_tokens" / "interpret").exists()


def test_bad_inputs_are_named(tiny_model_no_dropout, brown_wic_root, tmp_path):
    import train

    meta, sentences = random_corpus(6, seed=0)
    cache = write_cache(tmp_path / "c", np.ones((len(meta), 6), np.float32), meta, sentences)
    (tmp_path / "not_an_sae").mkdir()
    with pytest.raises(DataError, match="not_an_sae: neither an SAE checkpoint"):
        train.main(["interpret", "--sae", str(tmp_path / "not_an_sae"), "--cache", str(cache.folder)])
    with pytest.raises(DataError, match="no meta.json"):
        train.main(["interpret", "--sae", str(export_sae(random_sae(), tmp_path / "s")), "--cache", str(tmp_path)])
    sentence_cache = json.loads((cache.folder / "meta.json").read_text()) | {"level": "sentence"}
    (cache.folder / "meta.json").write_text(json.dumps(sentence_cache))
    from evaluation.interpret.suite import run_suite

    with pytest.raises(ValueError, match="sentence-level vectors; the interpretability suite needs a token-level"):
        run_suite(random_sae(), ActivationCache(cache.folder), tmp_path / "o")
    # PS-Eval: required and WiC missing is an error; auto skips it with a warning naming the reason
    cb = InterpretSAE(pseval=True)
    with pytest.raises(DataError, match="nowhere/wic does not exist"):
        cb._wic(str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="PS-Eval skipped, WiC did not load"):
        assert InterpretSAE(pseval=None)._wic(str(tmp_path / "nowhere")) is None
    assert InterpretSAE(pseval=False)._wic(str(brown_wic_root)) is None


def test_extra_config_runs_the_suite_when_fit_ends(tiny_model_no_dropout, brown_wic_root, tmp_path, monkeypatch):
    import yaml

    import train

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((configs / "sae_minilm_brown_tokens.yaml").read_text())
    del cfg["defaults"]  # configs/defaults/sae.yaml's export and checkpoint: the callbacks below stand instead
    cfg["trainer"].update(accelerator="cpu", max_epochs=None, max_steps=4, logger=False, enable_progress_bar=False,
                          default_root_dir=str(tmp_path / "run"), val_check_interval=None,
                          callbacks=[{"class_path": "callbacks.ExportOnFitEnd"}])
    cfg["model"]["init_args"].update(init_samples=64)
    cfg["model"]["init_args"]["sae"].update(threshold_start=2)
    cfg["data"]["init_args"].update(model_name_or_path=tiny_model_no_dropout, data_root=str(brown_wic_root),
                                    cache_dir=str(tmp_path / "cache"), special_tokens="keep", batch_size=8,
                                    val_fraction=0.0, max_length=32)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    extra = yaml.safe_load((configs / "callbacks" / "interpret.yaml").read_text())
    extra["trainer"]["callbacks+"][0]["init_args"].update(wic_data_root=str(brown_wic_root), top_k=20, n_unique=5)
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    cli = train.main(["fit", "--config", str(tmp_path / "recipe.yaml"), "--config", str(tmp_path / "extra.yaml")])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, InterpretSAE))
    summary = json.loads((tmp_path / "run" / "interpret" / "summary.json").read_text())
    assert summary["interpret/n_tokens"] == len(cli.datamodule.cache) == 30
    assert summary["interpret/pooling_tokens"] == "all" and summary["interpret/pseval/layer2/balanced"] == 12
    assert cb.result.files["summary"] == tmp_path / "run" / "interpret" / "summary.json"
    want = interpret_sae(cli.model.sae.eval(), cli.datamodule.cache, top_k=20, n_unique=5).summary  # final weights
    for key in ("interpret/pos_purity_mean", "interpret/alive_share", "interpret/pooling_feature_share"):
        assert summary[key] == pytest.approx(want[key])


def test_wrong_settings_fail_before_training_and_dims_are_checked(tmp_path):
    from types import SimpleNamespace

    from evaluation.interpret.suite import run_suite

    trainer = SimpleNamespace(datamodule=SimpleNamespace(level="token"), log_dir=str(tmp_path), default_root_dir=".",
                              checkpoint_callback=None)
    module = SimpleNamespace(sae=None, export_type=SAE)  # an SAEModule before its setup built the SAE
    cb = InterpretSAE()
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)
    assert cb._out == tmp_path / "interpret"
    with pytest.raises(DataError, match="compare_sae='nope': neither an exported SAE folder"):
        InterpretSAE(compare_sae="nope").setup(trainer, module, "fit")
    with pytest.raises(DataError, match=r"pseval_saes\[3\]='gone': neither an exported SAE folder"):
        InterpretSAE(pseval_saes={3: "gone"}).setup(trainer, module, "fit")
    with pytest.raises(DataError, match="cache='nocache': not an activation cache"):
        InterpretSAE(cache="nocache").setup(trainer, module, "fit")
    with pytest.raises(DataError, match="needs an SAEModule, got SimpleNamespace"):
        InterpretSAE().setup(trainer, SimpleNamespace(), "fit")
    sentences = SimpleNamespace(datamodule=SimpleNamespace(level="sentence"), log_dir=None, default_root_dir=".")
    with pytest.raises(DataError, match="does not give token-level activations"):
        InterpretSAE().setup(sentences, module, "fit")
    InterpretSAE(compare_sae="nope").setup(trainer, module, "validate")  # only fit is checked
    meta, sents = random_corpus(4, seed=0)
    cache = write_cache(tmp_path / "c", np.ones((len(meta), 6), np.float32), meta, sents)
    with pytest.raises(ValueError, match=r"sae_b takes 5-d inputs but .* holds 6-d vectors"):
        run_suite(random_sae(d=6), cache, tmp_path / "o", sae_b=random_sae(d=5))
    # widths, levels and sizes are checked at setup too, against the explicit cache or the datamodule's
    narrow = str(export_sae(random_sae(d=5), tmp_path / "narrow"))
    with pytest.raises(DataError, match=r"compare_sae=.*narrow' takes 5-d inputs but the activations are 6-d"):
        InterpretSAE(cache=str(cache.folder), compare_sae=narrow).setup(trainer, module, "fit")
    with_cache = SimpleNamespace(datamodule=SimpleNamespace(level="token", cache=cache), log_dir=None,
                                 default_root_dir=".")
    with pytest.raises(DataError, match=r"pseval_saes\[3\]=.*narrow' takes 5-d inputs but the activations are 6-d"):
        InterpretSAE(pseval_saes={3: narrow}).setup(with_cache, module, "fit")
    InterpretSAE(compare_sae=str(export_sae(random_sae(d=6), tmp_path / "wide"))).setup(with_cache, module, "fit")
    (tmp_path / "seed1.ckpt").touch()  # a checkpoint is accepted here; load_any_sae reads it when fit ends
    InterpretSAE(compare_sae=str(tmp_path / "seed1.ckpt")).setup(with_cache, module, "fit")
    sentence_level = json.loads((cache.folder / "meta.json").read_text()) | {"level": "sentence"}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "meta.json").write_text(json.dumps(sentence_level))
    with pytest.raises(DataError, match="holds sentence-level vectors; the suite needs a token-level cache"):
        InterpretSAE(cache=str(tmp_path / "s")).setup(trainer, module, "fit")
    with pytest.raises(DataError, match="max_tokens=0: give a positive number of tokens"):
        InterpretSAE(max_tokens=0)
    # the cache's own layer among the extra PS-Eval SAEs would replace the SAE under study
    (cache.folder / "meta.json").write_text(json.dumps(json.loads((cache.folder / "meta.json").read_text())
                                                       | {"layer": 2}))
    with pytest.raises(ValueError, match=r"pseval_saes\[2\]: layer 2 is the cache's own"):
        run_suite(random_sae(d=6), ActivationCache(cache.folder), tmp_path / "o", wic_pairs=[],
                  pseval_saes={2: random_sae(d=6)})


def test_a_sampled_run_is_the_suite_on_the_sampled_rows(tmp_path):
    from evaluation.interpret.pooling import pooling_contributions
    from evaluation.interpret.suite import run_suite

    meta, sentences = random_corpus(40, seed=4)  # categories news / fiction / romance in turn
    vectors = np.random.default_rng(1).normal(size=(len(meta), 6)).astype(np.float32)
    full = write_cache(tmp_path / "c", vectors, meta, sentences, cuts=(60,))
    sae = random_sae(d=6, n=8)
    res = run_suite(sae, full, tmp_path / "o", max_tokens=len(full) // 2, sample_seed=3, **SUITE_ARGS)
    view = full.sample_sentences(len(full) // 2, seed=3)
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert saved["sample"] == {"max_tokens": len(full) // 2, "sample_seed": 3, "cache_tokens": len(full)}
    assert res.summary["interpret/n_tokens"] == len(view) < len(full)
    assert "interpret/group_share_mean" in res.summary  # both genres are in the sample
    # the pooling decomposition of the view = that of a plain array holding the view's rows
    x, m = full.gather(view.rows).numpy(), full.metadata()[view.rows]
    want = pooling_contributions(sae, encode_sparse(sae, [(x, m)]), x, special_tokens="keep")
    got = pooling_contributions(sae, encode_sparse(sae, view), view)
    np.testing.assert_allclose(got.contribution, want.contribution, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got.error_share, want.error_share, rtol=1e-4, atol=1e-6)
    # a sample (or cache) of one genre has no group share
    one_genre = [{**s, "category": "news"} for s in sentences]
    news = write_cache(tmp_path / "n", vectors, meta, one_genre)
    assert not any("group_share" in k for k in run_suite(sae, news, tmp_path / "o2", **SUITE_ARGS).summary)


def test_without_pseval_contexts_of_a_cache_without_words_still_highlight_the_token(tiny_model_no_dropout,
                                                                                     sample_data, tmp_path):
    """A plain-text cache stores token ids, not words: the suite loads the cache model's tokenizer (not the model)
    to show each context as its tokens with the activating one marked, PS-Eval or not."""
    from transformers import AutoTokenizer

    from evaluation.interpret.suite import run_suite

    dm = ActivationsDataModule(tiny_model_no_dropout, source=str(sample_data / "sentences.txt"), max_length=32,
                               special_tokens="keep", cache_dir=str(tmp_path / "cache"), cache_dtype="float32")
    dm.prepare_data()
    dm.setup()
    result = run_suite(random_sae(d=32, n=16, seed=1), dm.cache, tmp_path / "out", **SUITE_ARGS)
    tok = AutoTokenizer.from_pretrained(tiny_model_no_dropout)
    sentences = (sample_data / "sentences.txt").read_text().splitlines()
    tokenised = {tuple(tok.convert_ids_to_tokens(tok(s, truncation=True, max_length=32)["input_ids"]))
                 for s in sentences}
    contexts = [c for f in result.features for c in f["contexts"]]
    assert len(contexts) > 20
    for c in contexts:
        assert tuple(c["tokens"]) in tokenised and 0 <= c["index"] < len(c["tokens"])
    assert any(c["tokens"][c["index"]] not in ("[CLS]", "[SEP]") for c in contexts)
