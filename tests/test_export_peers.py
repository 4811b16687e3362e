"""Exported SAEs open in the libraries their users already work in: SAELens (a JumpReLU SAE whose threshold is the
global BatchTopK threshold: its encode / decode are this project's inference) and EleutherAI sparsify (its per-row
TopK); ``train.py export --format`` and the end-of-fit export's ``format``; the generated README.md. The peers come
from the ``peers`` extra; their tests skip with the reason when it is absent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_cli import fit_args

import train
from core.errors import DataError
from lightning_modules import SAEModule
from lightning_modules.components.batch_topk import BatchTopKSAE
from lightning_modules.export import export, export_sae, load_sae

D, F, K, B = 12, 64, 4, 256
ACTIVATIONS = {"model": "sentence-transformers/all-MiniLM-L6-v2", "model_fingerprint": "f00d", "layer": 6,
               "level": "token", "special_tokens": "drop", "text_prefix": "query: "}
NO_SAELENS = "needs sae-lens: pip install -e '.[peers]'"
NO_SPARSIFY = "needs eai-sparsify: pip install -e '.[peers]'"


def tiny_module(seed: int = 0) -> tuple[SAEModule, torch.Tensor]:
    """An SAEModule (d 12, 64 latents, k 4) with an input scale near 10, non-zero biases and a threshold halfway
    between the k*B-th and (k*B+1)-th largest pre-activation of ``x``: its inference codes have L0 exactly k."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 3 + 1
    module = SAEModule(sae=dict(d_in=D, num_latents=F, k=K))
    sae = module.sae
    sae.initialize(x)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        sae.b_dec.add_(torch.randn(D, generator=g) * 0.1)
        top = sae.pre_acts(x).flatten().topk(K * B + 1).values
        sae.threshold.fill_(float(top[-2:].mean()))
        sae.steps.fill_(1234)
    sae.activations = dict(ACTIVATIONS)
    return module.eval(), x


def test_tiny_sae_is_what_the_tests_assume():
    module, x = tiny_module()
    sae = module.sae
    assert sae.input_scale.item() > 5 and sae.b_dec.abs().min() > 0 and sae.b_enc.abs().min() > 0
    assert (sae.encode(x) > 0).sum(1).float().mean().item() == K


def test_saelens_export_opens_in_sae_lens_with_the_projects_codes_and_reconstruction(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason=NO_SAELENS)
    module, x = tiny_module()
    sae: BatchTopKSAE = module.sae
    codes_BF, x_hat_BD = sae.encode(x), sae(x).x_hat
    out = export(module, tmp_path / "saelens", format="saelens")
    loaded = sae_lens.SAE.load_from_disk(str(out))
    assert type(loaded).__name__ == "JumpReLUSAE"
    assert loaded.W_enc.shape == (D, F) and loaded.W_dec.shape == (F, D) and loaded.threshold.shape == (F,)
    torch.testing.assert_close(loaded.threshold, torch.full((F,), float(sae.threshold * sae.input_scale)))
    with torch.no_grad():
        got_BF = loaded.encode(x)
        assert torch.equal(got_BF > 0, codes_BF > 0)  # the same active latents: L0 exactly k here
        assert (got_BF > 0).sum(1).float().mean().item() == K
        torch.testing.assert_close(got_BF, codes_BF, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(got_BF), x_hat_BD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(codes_BF), sae.decode(codes_BF), rtol=1e-5, atol=1e-5)
    meta = loaded.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.exclude_special_tokens) == (ACTIVATIONS["model"], "hidden_states.6",
                                                                              True)
    assert meta.embedlab["activations"] == ACTIVATIONS and meta.embedlab["training_steps"] == 1234
    assert meta.embedlab["input_scale_folded"] == pytest.approx(sae.input_scale.item())


def test_saelens_reads_the_exported_sparsity_file(tmp_path, monkeypatch):
    """sparsity.safetensors beside the weights: SAE.load_from_disk opens the folder with it, and SAELens' own
    hub loader (its files served from the folder) returns it as the SAE's log feature sparsity."""
    pytest.importorskip("sae_lens", reason=NO_SAELENS)
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    module, _ = tiny_module()
    density = torch.linspace(-10, 0, F)
    module.sae.log10_density = density
    out = export(module, tmp_path / "repo" / "layer_6", format="saelens")
    assert SAE.load_from_disk(str(out)).cfg.d_sae == F
    monkeypatch.setattr(loaders, "hf_hub_download", lambda repo_id, filename, **kw: str(tmp_path / "repo" / filename))
    _, _, sparsity = loaders.sae_lens_huggingface_loader("local/repo", "layer_6")
    assert torch.equal(sparsity, density)


def test_sparsify_export_opens_in_sparsify_with_the_projects_per_row_topk(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason=NO_SPARSIFY)
    module, x = tiny_module()
    sae = module.sae
    out = export(module, tmp_path / "sparsify")  # the default format
    coder = sparsify.SparseCoder.load_from_disk(out)
    # the project's per-row top-k (sparsify has no BatchTopK inference): k largest pre-activations of each row
    pre_BF = sae.pre_acts(x) * sae.input_scale
    vals_BK, idx_BK = pre_BF.topk(K, dim=1)
    want_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, vals_BK)
    with torch.no_grad():
        top = coder.encode(x)
        got_BF = torch.zeros_like(pre_BF).scatter(1, top.top_indices, top.top_acts)
        torch.testing.assert_close(got_BF, want_BF, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(coder.decode(top.top_acts, top.top_indices), sae.decode(want_BF), rtol=1e-4,
                                   atol=1e-4)
    assert not torch.equal(want_BF > 0, sae.encode(x) > 0)  # per-row top-k is not the threshold rule


def test_load_sae_reads_both_formats_back(tmp_path):
    module, x = tiny_module()
    codes_BF = module.sae.encode(x)
    for fmt in ("sparsify", "saelens"):
        back = load_sae(export(module, tmp_path / fmt, format=fmt))
        torch.testing.assert_close(back.encode(x), codes_BF, rtol=1e-5, atol=1e-5)
        assert back.activations == ACTIVATIONS and back.cfg.k == K and int(back.steps) == 1234
    files = {"sparsify": {"cfg.json", "sae.safetensors", "README.md"},
             "saelens": {"cfg.json", "sae_weights.safetensors", "README.md"}}
    assert {fmt: {p.name for p in (tmp_path / fmt).iterdir()} for fmt in files} == files
    assert set(load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec",
                                                                                     "b_dec", "threshold"}


def test_load_sae_reads_a_batchtopk_sae_saved_by_sae_lens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason=NO_SAELENS)
    torch.manual_seed(0)
    theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=K))
    with torch.no_grad():
        theirs.b_enc.normal_(0, 0.1)
        theirs.b_dec.normal_(0, 0.1)
    x = torch.randn(B, D)
    with torch.no_grad():  # its threshold: the median of the batch top-k codes of x (what its EMA tracks, roughly)
        acts = theirs.encode(x)
    theirs.topk_threshold = acts[acts > 0].median().double()
    theirs.save_inference_model(str(tmp_path))
    jumprelu = sae_lens.SAE.load_from_disk(str(tmp_path))
    ours = load_sae(tmp_path)
    with torch.no_grad():
        want = jumprelu.encode(x)
        assert 0 < (want > 0).sum(1).float().mean() < K  # above the median: fewer than k per row on average
        torch.testing.assert_close(ours.encode(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.decode(want), jumprelu.decode(want), rtol=1e-5, atol=1e-6)
    assert ours.cfg.k == K and ours.cfg.num_latents == F


def test_saelens_export_needs_a_threshold_and_a_known_format(tmp_path):
    module, _ = tiny_module()
    module.sae.threshold.fill_(-1.0)  # fewer than threshold_start steps
    with pytest.raises(DataError, match="no inference threshold yet .* export the sparsify format"):
        export(module, tmp_path / "a", format="saelens")
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match="format 'onnx' is not an export format: sparsify or saelens"):
        export(module, tmp_path / "b", format="onnx")


def test_the_readme_is_generated_from_the_sae_and_its_figures(tmp_path):
    module, _ = tiny_module()
    sae = module.sae
    threshold = f"{float(sae.threshold * sae.input_scale):.6g}"
    metrics = {"val/sae/fvu": 0.2051, "val/sae/l0": 31.5, "sae/l0": 32.0, "sae/dead_fraction": 0.125,
               "dead_latents": 8, "global_step": 900, "checkpoint": "runs/x/step900.ckpt"}
    export_sae(module, tmp_path / "lens", format="saelens", metrics=metrics)
    card = (tmp_path / "lens" / "README.md").read_text()
    for row in ("| model | `sentence-transformers/all-MiniLM-L6-v2` |", "| layer | 6 (", "| level | token (",
                "| special tokens | dropped (", "| text prefix | `query: ` (", f"| latents F | {F} |",
                f"| k (mean active latents per vector in training) | {K} |",
                f"| inference threshold (input units) | {threshold} |", "| training steps | 1234 |",
                "| FVU | 0.2051 | held-out split, inference threshold |",
                "| L0 (non-zero codes per vector) | 31.5 | held-out split",  # the held-out value wins
                "| dead fraction | 0.125 | training batch at the exported step", "| dead latents | 8 of 64 |",
                "| explained variance | not measured |", "up to step 900; the weights are those of `runs/x/step900",
                f"SAE.load_from_disk('{tmp_path / 'lens'}')", f"load_sae('{tmp_path / 'lens'}')"):
        assert row in card, row
    export_sae(module, tmp_path / "sparse")
    card = (tmp_path / "sparse" / "README.md").read_text()
    assert f"SparseCoder.load_from_disk('{tmp_path / 'sparse'}')" in card and "--format saelens" in card
    assert card.count("not measured") == 5  # no figures given: FVU, explained variance, L0, dead fraction, dead latents


# --------------------------------------------------------------------------------------- train.py and fit end
@pytest.fixture(scope="module")
def fitted_sae(tmp_path_factory):
    """A tiny SAEModule fitted 6 steps by Lightning on random vectors, its checkpoint, and the end-of-fit export in
    the SAELens format."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from callbacks import ExportOnFitEnd

    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    x = torch.randn(512, D) * 4 + 1
    module = SAEModule(sae=dict(d_in=D, num_latents=F, k=K, threshold_start=1, dead_after=128), lr=1e-2)
    module.sae.activations = dict(ACTIVATIONS)
    callback = ExportOnFitEnd(format="saelens")
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[callback])
    trainer.fit(module, DataLoader(x, batch_size=64))
    return module.eval(), x, trainer.checkpoint_callback.best_model_path, callback.exported


def test_the_end_of_fit_export_writes_the_saelens_format_with_its_metrics_and_card(fitted_sae):
    module, x, ckpt, out = fitted_sae
    assert (out / "sae_weights.safetensors").is_file() and not (out / "sae.safetensors").exists()
    metrics = json.loads((out / "sae_metrics.json").read_text())
    assert metrics["checkpoint"] == ckpt and metrics["global_step"] == 6 and metrics["sae/l0"] == K
    torch.testing.assert_close(load_sae(out).encode(x), module.encode(x), rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert f"| FVU | {metrics['sae/fvu']:.4g} | training batch at the exported step" in card
    assert f"| dead latents | {metrics['dead_latents']} of {F} |" in card


def test_an_earlier_best_checkpoint_gets_its_own_figures_not_the_last_steps(tmp_path):
    """The export holds the best checkpoint's weights; figures logged at a later step describe other weights."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from callbacks import ExportOnFitEnd

    pl.seed_everything(0)
    x = torch.randn(512, D) * 4 + 1
    module = SAEModule(sae=dict(d_in=D, num_latents=F, k=K, threshold_start=1, dead_after=128), lr=1e-2)
    # the highest training FVU is kept as "best": an early step, since training lowers it
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="sae/fvu", mode="max", every_n_train_steps=1)
    callback = ExportOnFitEnd(output_dir=str(tmp_path / "sae"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[best, callback])
    trainer.fit(module, DataLoader(x, batch_size=64))
    metrics = json.loads((tmp_path / "sae" / "sae_metrics.json").read_text())
    ckpt = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] < 6 and metrics["checkpoint"] == best.best_model_path
    assert metrics["global_step"] == ckpt["global_step"]
    assert metrics["sae/fvu"] == pytest.approx(float(best.best_model_score))  # the checkpoint's own value
    assert "sae/l0" not in metrics and metrics["last_logged"]["global_step"] == 6  # later values kept apart
    assert metrics["last_logged"]["sae/fvu"] == pytest.approx(float(trainer.callback_metrics["sae/fvu"]))
    assert metrics["last_logged"]["sae/fvu"] < metrics["sae/fvu"]
    dead = (ckpt["state_dict"]["sae.tokens_since_fired"] >= 128).sum()
    assert metrics["dead_latents"] == int(dead)  # the checkpoint's buffers
    card = (tmp_path / "sae" / "README.md").read_text()
    assert f"| FVU | {metrics['sae/fvu']:.4g} | training batch at the exported step" in card
    assert "| L0 (non-zero codes per vector) | not measured |" in card


def test_train_export_format_saelens_and_its_errors(fitted_sae, tmp_path, tiny_model, sample_data):
    module, x, ckpt, _ = fitted_sae
    train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "lens"), "--format", "saelens"])
    out = tmp_path / "lens"
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "jumprelu"
    torch.testing.assert_close(load_sae(out).encode(x), module.encode(x), rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "| FVU | not measured |" in card and "up to step 6; the weights are those of" in card
    # the SAELens folder is an SAE to every loader: interpret loads it, evaluate says it is no sentence encoder
    from evaluation.evaluate import load_embedder
    from lightning_modules.export import load_any_sae

    torch.testing.assert_close(load_any_sae(out).encode(x), module.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="is an exported SAE: evaluate scores sentence encoders"):
        load_embedder(str(out))
    with pytest.raises(DataError) as bad:
        train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "x"), "--format", "onnx"])
    assert train.user_error(bad.value) == "--format 'onnx' is not an export format: sparsify or saelens (SAEs only)"
    cli = train.main(fit_args(tmp_path, tiny_model, sample_data, "--trainer.max_steps", "1"))
    encoder_ckpt = cli.trainer.checkpoint_callback.best_model_path
    with pytest.raises(DataError) as bad:
        train.main(["export", "--ckpt_path", encoder_ckpt, "--output_dir", str(tmp_path / "y"), "--format",
                    "saelens"])
    message = train.user_error(bad.value)
    assert message.startswith("--format saelens: only SAEs have export formats; ContrastiveModule exports as")
    assert "\n" not in message
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(DataError, match="ExportOnFitEnd format 'jumprelu' is not an export format"):
        from callbacks import ExportOnFitEnd

        ExportOnFitEnd(format="jumprelu")
