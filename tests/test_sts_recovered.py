"""STS recovered (evaluation/interpret/sts_recovered.py): exact at both ends, hooks gone afterwards, the
positions it splices, and sentence-level SAEs."""

from __future__ import annotations

import math

import pytest
import torch

from core.hub import load_pretrained
from datamodules.activation_builder import CacheBuilder
from evaluation.interpret.sts_recovered import Splicer, reconstruct, sts_recovered
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

D = 32  # the tiny BERT's width


def identity_sae(d: int = D) -> BatchTopKSAE:
    """relu(x) - relu(-x) = x exactly: latents e_i and -e_i, zero biases, threshold 0."""
    sae = BatchTopKSAE(BatchTopKConfig(d_in=d, num_latents=2 * d, k=4))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.threshold.fill_(0.0)
    return sae.eval()


def zero_sae(d: int = D) -> BatchTopKSAE:
    sae = identity_sae(d)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def reads(sae: BatchTopKSAE, model: str, layer: int, special: str = "drop", level: str = "token") -> BatchTopKSAE:
    sae.activations = {"model": model, "layer": layer, "level": level, "special_tokens": special,
                       "text_prefix": "", "pooling": "mean", "normalize": False}
    return sae


@pytest.fixture(scope="module")
def loaded(tiny_model_no_dropout):
    return load_pretrained(tiny_model_no_dropout)


def test_identity_sae_is_exact():
    x = torch.randn(50, D)
    assert torch.equal(reconstruct(identity_sae())(x), x)
    assert torch.equal(reconstruct(zero_sae())(x), torch.zeros_like(x))


@pytest.mark.parametrize("special", ["drop", "keep"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_identity_clean_zero_ablated_exactly(tiny_model_no_dropout, sample_data, loaded, layer, special):
    tsv = str(sample_data / "sts_dev.tsv")
    model = tiny_model_no_dropout
    ident = sts_recovered(reads(identity_sae(), model, layer, special), [tsv], None, loaded=loaded)[tsv]
    zero = sts_recovered(reads(zero_sae(), model, layer, special), [tsv], None, loaded=loaded)[tsv]
    assert ident["spliced"] == ident["clean"] and ident["clean"] == zero["clean"]
    assert zero["spliced"] == zero["ablated"] == ident["ablated"]
    assert ident["n_pairs"] == 60
    if special == "keep":  # every position zeroed: one embedding for every sentence, no ranking
        assert zero["ablated_constant"] and zero["ablated"] == 0.0 and zero["recovered"] == 0.0
    else:  # [CLS]/[SEP] keep their clean states
        assert not zero["ablated_constant"] and zero["ablated"] != zero["clean"]
        assert zero["recovered"] == 0.0
    assert ident["recovered"] == 1.0


def builder_for(loaded, model: str, layer: int, special: str) -> CacheBuilder:
    b = CacheBuilder(model, "token", layer, "mean", False, special, 64, "", 7, "cpu", "float32")
    b.model, b.tokenizer = loaded
    return b


def test_splice_positions_and_hook_removed(tiny_model_no_dropout, loaded):
    """Doubling the last layer's states doubles them at the spliced positions only: the mean-pooled embedding is
    (sum over real tokens of h_t * (1 + spliced_t)) / n, from the clean hidden states (closed form)."""
    model, tok = loaded
    texts = ["the man is playing a guitar .", "a dog", "two students reading some newspaper in the park ."]
    enc = tok(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    with torch.no_grad():
        h_BLD = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask_BL = enc["attention_mask"].bool()
    before = [dict(m._forward_hooks) for m in model.modules()]
    for special, where_BL in (("keep", mask_BL), ("drop", mask_BL & ~enc["special_tokens_mask"].bool())):
        z = Splicer(builder_for(loaded, tiny_model_no_dropout, 2, special), "mean").embed(texts, lambda h: 2 * h)
        expect = (h_BLD * (mask_BL.float() + where_BL.float())[..., None]).sum(1) / mask_BL.sum(1, keepdim=True)
        torch.testing.assert_close(z.float(), expect, rtol=1e-5, atol=1e-5)
    assert [dict(m._forward_hooks) for m in model.modules()] == before
    with torch.no_grad():
        after = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.equal(after, h_BLD)


def test_middle_layer_splice_changes_the_rest(tiny_model_no_dropout, loaded):
    """A random SAE at layer 1 moves the embeddings (the forward continues from the spliced states)."""
    sae = BatchTopKSAE(BatchTopKConfig(d_in=D, num_latents=64, k=4)).eval()
    sae.threshold.fill_(0.0)
    splicer = Splicer(builder_for(loaded, tiny_model_no_dropout, 1, "drop"), "mean")
    texts = ["a man is cooking .", "the lady reads a paper ."]
    assert not torch.allclose(splicer.embed(texts), splicer.embed(texts, reconstruct(sae)))


def test_sentence_level(tiny_model_no_dropout, sample_data, loaded):
    tsv = str(sample_data / "sts_dev.tsv")
    res = sts_recovered(reads(identity_sae(), tiny_model_no_dropout, 2, level="sentence"), [tsv], None,
                        loaded=loaded)[tsv]
    assert res["spliced"] == res["clean"] and res["ablated"] == 0.0 and res["recovered"] == 1.0
    half = identity_sae()
    with torch.no_grad():
        half.W_dec[:D // 2].zero_()  # positive halves of the first 16 dimensions lost: STS moves
    res = sts_recovered(reads(half, tiny_model_no_dropout, 2, level="sentence"), [tsv], None, loaded=loaded)[tsv]
    assert res["spliced"] != res["clean"] and math.isclose(res["recovered"], res["spliced"] / res["clean"])


def test_sae_of_unknown_origin_is_refused(sample_data):
    from core.errors import DataError

    with pytest.raises(DataError, match="what the SAE reads"):
        sts_recovered(identity_sae(), [str(sample_data / "sts_dev.tsv")], None)


def test_fit_end_export_reports_it(tiny_model_no_dropout, sample_data, tmp_path):
    """ExportOnFitEnd measures STS recovered when the datamodule names a data root: sae_metrics.json, eval.json's
    summary (W&B's) and the card carry the same figures, those of the exported SAE."""
    import json

    import pytorch_lightning as pl

    from callbacks import ExportOnFitEnd
    from datamodules import ActivationsDataModule
    from lightning_modules import SAEModule
    from lightning_modules.export import load_sae

    tsv = str(sample_data / "sts_dev.tsv")
    dm = ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, source="sentences.txt", max_length=32,
                               data_root=str(sample_data), cache_dir=str(tmp_path / "cache"), batch_size=64,
                               val_fraction=0.1)
    pl.seed_everything(0)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, threshold_start=2), lr=3e-3, init_samples=256)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ExportOnFitEnd(output_dir=str(tmp_path / "sae"), sts_tasks=[tsv])])
    trainer.fit(model, dm)
    metrics = json.loads((tmp_path / "sae" / "sae_metrics.json").read_text())
    again = sts_recovered(load_sae(tmp_path / "sae"), [tsv], str(sample_data), max_length=32)[tsv]
    assert metrics[f"sts_recovered/{tsv}"] == pytest.approx(again["recovered"], abs=1e-9)
    assert metrics[f"sts/{tsv}/clean"] == again["clean"] and metrics[f"sts/{tsv}/spliced"] == again["spliced"]
    summary = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert summary[f"eval/sts_recovered/{tsv}"] == pytest.approx(again["recovered"], abs=1e-9)
    card = (tmp_path / "sae" / "README.md").read_text()
    assert "## STS recovered" in card and f"{again['clean']:.4g} | {again['spliced']:.4g}" in card


def test_interpret_suite_reports_it(tiny_model_no_dropout, sample_data, tmp_path):
    """run_suite with sts_tasks: the scalars land in summary.json (and so in every logger); an identity SAE of what
    the cache holds recovers all of it."""
    import json

    from datamodules import ActivationsDataModule
    from datamodules.activation_cache import ActivationCache
    from evaluation.interpret.suite import run_suite

    dm = ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, source=str(sample_data / "sentences.txt"),
                               cache_dir=str(tmp_path / "cache"), max_length=32, max_sentences=40)
    dm.prepare_data()
    tsv = str(sample_data / "sts_dev.tsv")
    cache = ActivationCache(dm.cache_folder())
    result = run_suite(identity_sae(), cache, tmp_path / "interp", sts_tasks=[tsv], data_root=str(sample_data),
                       top_k=20, n_unique=5, n_contexts=2)
    saved = json.loads((tmp_path / "interp" / "summary.json").read_text())
    assert saved[f"interpret/sts_recovered/{tsv}"] == result.summary[f"interpret/sts_recovered/{tsv}"] == 1.0
    assert saved[f"interpret/sts/{tsv}/clean"] == saved[f"interpret/sts/{tsv}/spliced"]
