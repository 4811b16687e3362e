import pytest
import torch

from core.tensors import masked_mean
from lightning_modules.components.encoder import Encoder


def batch(enc, sentences):
    return enc.collate(enc.tokenize(sentences))


SENTENCES = ["a man is playing a guitar .", "the dog", "a lady is reading the daily paper in the park ."]


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "mean", "first_last_avg"])
def test_poolers_match_their_definition(tiny_model, pooler):
    enc = Encoder(tiny_model, pooler=pooler, mlp="none").eval()
    b = batch(enc, SENTENCES)
    out = enc.model(**b, output_hidden_states=True)
    hs, mask = out.hidden_states, b["attention_mask"].float()
    if pooler.startswith("cls"):
        want = hs[-1][:, 0]
    else:
        tokens = hs[-1] if pooler == "mean" else (hs[1] + hs[-1]) / 2
        want = torch.stack([tokens[i, mask[i] == 1].mean(0) for i in range(len(SENTENCES))])  # incl. [CLS]/[SEP]
    torch.testing.assert_close(enc(**b), want, rtol=1e-5, atol=1e-6)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_dropout_is_active_after_loading(tiny_model):
    """docs/pitfalls.md #1: from_pretrained returns eval mode; SimCSE needs two different dropout views."""
    enc = Encoder(tiny_model, pooler="cls")
    assert enc.model.training
    b = batch(enc, SENTENCES)
    assert not torch.allclose(enc(**b), enc(**b))
    enc.eval()
    torch.testing.assert_close(enc(**b), enc(**b))


def test_mlp_train_only_vs_always(tiny_model):
    only = Encoder(tiny_model, pooler="cls")  # default for cls: train_only
    assert only.mlp_mode == "train_only"
    b = batch(only, SENTENCES)
    only.eval()
    raw = only.model(**b).last_hidden_state[:, 0]
    torch.testing.assert_close(only(**b), raw)  # dropped at inference
    always = Encoder(tiny_model, pooler="cls", mlp="always").eval()
    always.mlp.load_state_dict(only.mlp.state_dict())
    torch.testing.assert_close(always(**b), torch.tanh(only.mlp.dense(raw)))
    assert Encoder(tiny_model, pooler="mean").mlp is None


def test_encode_is_order_independent_and_restores_mode(tiny_model):
    enc = Encoder(tiny_model, pooler="mean")
    z = enc.encode(SENTENCES, batch_size=2)
    z_rev = enc.encode(SENTENCES[::-1], batch_size=3)
    torch.testing.assert_close(z, z_rev.flip(0), rtol=1e-5, atol=1e-6)
    assert enc.training


def test_max_length_truncates(tiny_model):
    enc = Encoder(tiny_model, pooler="mean", max_length=4)
    assert [len(ids) for ids in enc.tokenize(SENTENCES)] == [4, 4, 4]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pooler": "max"}, "unknown pooler 'max'"),
        ({"pooler": "cls", "mlp": "sometimes"}, "unknown mlp mode"),
        ({"pooler": "cls_before_pooler", "mlp": "always"}, "cls_before_pooler"),
        ({"max_length": 1}, "max_length"),
        ({"max_length": 65}, r"max_length=65 is longer than .* takes: 64 tokens"),  # its position embeddings
    ],
)
def test_bad_options(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Encoder(tiny_model, **kwargs)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not load model .*local folder"):
        Encoder(str(tmp_path / "no_such_model"))


def test_the_left_out_pooler_is_not_reported_but_other_missing_weights_are(tiny_model, tmp_path):
    """load_pretrained drops the pooler on purpose: transformers' report of its "unexpected" weights is filtered
    out, and only that report: a checkpoint missing an encoder weight is still reported."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from core.hub import load_pretrained

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    try:
        load_pretrained(tiny_model)
        assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
        broken = tmp_path / "broken"
        shutil.copytree(tiny_model, broken)
        weights = load_file(str(broken / "model.safetensors"))
        key = next(k for k in weights if "layer.0.attention.self.query.weight" in k)
        save_file({k: v for k, v in weights.items() if k != key}, str(broken / "model.safetensors"))
        load_pretrained(str(broken))
        reports = [r.getMessage() for r in records if "LOAD REPORT" in r.getMessage()]
        assert len(reports) == 1 and "query.weight" in reports[0] and "MISSING" in reports[0]
    finally:
        log.removeHandler(handler)


def test_negative_learning_rates_are_named(tiny_model):
    from lightning_modules import ContrastiveModule, SAEModule

    with pytest.raises(ValueError, match=r"lr and weight_decay must be >= 0, got lr=-1"):
        ContrastiveModule(tiny_model, lr=-1)
    with pytest.raises(ValueError, match=r"weight_decay=-0.1"):
        ContrastiveModule(tiny_model, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"lr must be >= 0 \(or null for the size-scaled default\), got -0.001"):
        SAEModule(sae=dict(d_in=8, k=2), lr=-1e-3)
