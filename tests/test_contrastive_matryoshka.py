"""Matryoshka prefixes in ContrastiveModule: the step, the options, STS selection, and the export's truncate_dim."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_cli import SENTENCES, fit_args

import train
from callbacks import STSEvaluator
from core.metrics import spearman100
from datamodules.sts import load_sts
from lightning_modules import ContrastiveModule
from lightning_modules.losses import InBatchNegatives, Views, info_nce

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
DIMS = [4, 16, 32]  # the tiny BERT's hidden size is 32


def test_the_step_is_the_weighted_sum_of_the_prefix_losses(tiny_model_no_dropout):
    """With dropout off, the module's step loss equals InfoNCE on each prefix of the encoder's own output."""
    module = ContrastiveModule(tiny_model_no_dropout, pooler="mean", matryoshka_dims=DIMS,
                               matryoshka_weights=[2.0, 1.0, 0.5])
    enc = module.encoder
    padded = [enc.collate(enc.tokenize(v)) for v in (SENTENCES, SENTENCES[1:] + SENTENCES[:1])]
    L = max(p["input_ids"].shape[1] for p in padded)
    batch = {k: torch.stack([F.pad(p[k], (0, L - p[k].shape[1])) for p in padded], dim=1)
             for k in ("input_ids", "attention_mask")}
    loss = module.training_step(batch, 0)
    z = module.embed_views(batch["input_ids"], batch["attention_mask"])
    parts = [info_nce(InBatchNegatives()(Views(z[:, 0, :k], z[:, 1, :k], None, 0, len(z)), 0.05), 0.05)
             for k in DIMS]
    assert loss.item() == pytest.approx((2 * parts[0] + parts[1] + 0.5 * parts[2]).item(), rel=1e-5)
    assert len({round(p.item(), 4) for p in parts}) == 3  # each prefix is its own number
    assert module.selection_dims == DIMS


@pytest.mark.parametrize("options,match", [
    (dict(pooler="cls"), "mlp: train_only drops the MLP at inference"),
    (dict(matryoshka_dims=[8, 4, 32]), "strictly increasing sizes in \\[1, 32\\]"),
    (dict(matryoshka_dims=[8, 64]), "strictly increasing sizes in \\[1, 32\\]"),
    (dict(matryoshka_dims=[0, 8]), "strictly increasing"),
    (dict(matryoshka_weights=[1.0, 1.0]), "one non-negative weight per dim \\(3\\)"),
    (dict(matryoshka_weights=[0.0, 0.0, 0.0]), "not all 0"),
    (dict(matryoshka_dims=None, matryoshka_weights=[1.0]), "matryoshka_weights needs model.matryoshka_dims"),
])
def test_bad_options_name_the_option(tiny_model, options, match):
    kw = {"pooler": "mean", "matryoshka_dims": DIMS, **options}
    with pytest.raises(ValueError, match=match):
        ContrastiveModule(tiny_model, **kw)


def test_sts_selection_is_the_mean_over_the_prefixes(tiny_model, sample_data):
    torch.manual_seed(0)
    module = ContrastiveModule(tiny_model, pooler="mean", matryoshka_dims=DIMS).eval()
    cb = STSEvaluator(task=str(sample_data / "sts_dev.tsv"))
    cb.setup(None, module, "validate")
    pairs = load_sts(str(sample_data / "sts_dev.tsv"), "dev", None)
    z1, z2 = module.encode(pairs.sentences1), module.encode(pairs.sentences2)
    per_prefix = [spearman100(F.cosine_similarity(z1[:, :k], z2[:, :k], dim=-1), pairs.scores) for k in DIMS]
    assert cb.evaluate(module) == pytest.approx(sum(per_prefix) / 3, abs=1e-3)
    assert max(per_prefix) - min(per_prefix) > 0.1  # the mean is not the whole embedding's score


def test_fit_export_and_truncate_dim_load_the_trained_prefix(tmp_path, tiny_model, sample_data):
    """From the command line: fit with --model.matryoshka_dims, export, and SentenceTransformer(DIR, truncate_dim=k)
    gives the module's k-d prefix (by cosine); the card records the dims."""
    from sentence_transformers import SentenceTransformer

    cli = train.main(fit_args(tmp_path, tiny_model, sample_data, "--model.pooler", "mean",
                              "--model.matryoshka_dims", "[4, 16, 32]"))
    assert cli.model.matryoshka_dims == DIMS
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "st")])
    assert "| Matryoshka dims | 4, 16, 32 (" in (tmp_path / "st" / "README.md").read_text()
    z = cli.model.encode(SENTENCES)
    for k in DIMS:
        st = SentenceTransformer(str(tmp_path / "st"), device="cpu", truncate_dim=k)
        got = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
        torch.testing.assert_close(got, F.normalize(z[:, :k], dim=-1), atol=1e-5, rtol=1e-4)
    assert Path(ckpt).is_file()
