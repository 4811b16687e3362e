"""BatchTopK SAE: hand-set tiny weights (d = 6, F = 8) with closed-form expectations, the sparse gradients against
dense autograd, export round trips, the Lightning module on a tiny encoder, every SAE recipe, DDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.components.batch_topk import (
    BatchTopKConfig,
    BatchTopKSAE,
    batch_topk,
    fold_input_scale,
    geometric_median,
)
from lightning_modules.export import export_sae, load_sae

ROOT = Path(__file__).resolve().parents[1]
R2 = math.sqrt(2)


def hand_sae(k: int = 2, **kw) -> BatchTopKSAE:
    """d = 6, F = 8: latents 0-5 are the unit axes, 6 = (e0 + e1)/sqrt2, 7 = (e2 + e3)/sqrt2; tied; zero biases."""
    cfg = BatchTopKConfig(d_in=6, num_latents=8, k=k, normalize_input=False, b_dec_init="zeros", **kw)
    sae = BatchTopKSAE(cfg)
    W = torch.zeros(8, 6)
    W[:6] = torch.eye(6)
    W[6, :2] = W[7, 2:4] = 1 / R2
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
    return sae


X = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0],
                  [0.5, 0.0, 0.0, 0.0, 0.0, 0.1]])
PRE = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 7 / R2, 3 / R2],
                    [0.5, 0.0, 0.0, 0.0, 0.0, 0.1, 0.5 / R2, 0.0]])


# ------------------------------------------------------------------------------------------ selection
def test_batch_topk_keeps_k_times_B_over_the_whole_batch_not_k_per_row():
    sae = hand_sae(k=2).train()
    torch.testing.assert_close(sae.pre_acts(X), PRE)
    codes = sae.encode(X)
    want = torch.zeros(2, 8)
    want[0, [0, 1, 6, 7]] = PRE[0, [0, 1, 6, 7]]  # the 4 = k * B largest of the batch are all in row 0
    torch.testing.assert_close(codes, want)
    per_row = torch.zeros(2, 8).scatter(1, PRE.topk(2, dim=1).indices, PRE.gather(1, PRE.topk(2, dim=1).indices))
    assert (per_row[1] > 0).sum() == 2 and (codes[1] > 0).sum() == 0  # per-row top-k would give row 1 two codes
    out = sae(X)
    torch.testing.assert_close(sae.dense(out), want)
    torch.testing.assert_close(out.x_hat, want @ sae.W_dec.detach())  # b_dec = 0
    assert out.rows.tolist() == [0, 0, 0, 0] and out.latents.tolist() == [0, 1, 6, 7]
    assert out.fired.tolist() == [True, True, False, False, False, False, True, True]


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("dominant_row", [False, True])
def test_candidate_selection_equals_the_full_flat_topk(dominant_row, shortcut):
    g = torch.Generator().manual_seed(0)
    pre = torch.relu(torch.randn(64, 40, generator=g))
    if dominant_row:  # row 3 holds more than its 4k candidates of the global top: the exact fallback must run
        pre[3] += 10
    want = pre.reshape(-1).topk(3 * 64).indices
    want = want[pre.reshape(-1)[want] > 0].sort().values
    got = batch_topk(pre, k=3, candidates_per_row=4, shortcut=shortcut)
    assert torch.equal(got, want)
    assert torch.equal(batch_topk(pre, k=3, candidates_per_row=0), want)
    if dominant_row:
        assert ((got // 40) == 3).sum() == 40


def test_fewer_positive_entries_than_k_times_B_still_gives_k_times_B_entries():
    """A size known in advance (no host sync): the positives, and zeros that code nothing."""
    pre = torch.zeros(3, 8)
    pre[0, 2], pre[2, 5] = 1.0, 2.0
    for shortcut in (True, False):
        got = batch_topk(pre, k=4, shortcut=shortcut)
        assert got.numel() == 12 and got.unique().numel() == 12 and torch.equal(got, got.sort().values)
        assert got[pre.reshape(-1)[got] > 0].tolist() == [2, 21]


# ---------------------------------------------------------------------------------------- threshold
def test_inference_uses_the_threshold_and_is_independent_of_the_batch():
    sae = hand_sae(k=2)
    sae.threshold.fill_(2.5)
    sae.eval()
    codes = sae.encode(X)
    want = PRE * (PRE > 2.5)
    torch.testing.assert_close(codes, want)
    torch.testing.assert_close(sae.encode(X[1:]), codes[1:])  # alone or in a batch: the same codes
    sae.train()  # batch top-k: row 1 alone gets its own 2 codes, in the batch none
    assert (sae.encode(X[1:]) > 0).sum() == 2 and (sae.encode(X)[1] > 0).sum() == 0


def test_eval_without_a_threshold_warns_and_falls_back_to_batch_topk():
    sae = hand_sae(k=2).eval()
    with pytest.warns(UserWarning, match="no threshold yet"):
        codes = sae.encode(X)
    assert (codes > 0).sum() == 4


def test_threshold_is_an_ema_of_the_batch_minimum_after_warmup():
    sae = hand_sae(threshold_start=2, threshold_beta=0.9)
    fired = torch.zeros(8, dtype=torch.bool)
    for step, m in enumerate([1.0, 2.0, 3.0, 5.0], 1):
        sae.update_stats(fired, 10, torch.tensor(m))
        if step <= 2:
            assert sae.threshold.item() == -1.0  # not estimated during the first threshold_start steps
    assert sae.threshold.item() == pytest.approx(0.9 * 3.0 + 0.1 * 5.0)
    sae.update_stats(fired, 10, torch.tensor(math.inf))  # nothing fired: unchanged
    assert sae.threshold.item() == pytest.approx(3.2)
    state = sae.state_dict()
    fresh = hand_sae()
    fresh.load_state_dict(state)
    assert fresh.threshold.item() == pytest.approx(3.2) and fresh.steps.item() == 5


# ------------------------------------------------------------------------------- decoder constraints
def test_gradient_projection_removes_the_component_along_each_row():
    sae = hand_sae()
    G = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    sae.W_dec.grad = G.clone()
    sae.project_decoder_grad()
    W = sae.W_dec.detach()
    want = G - (G * W).sum(-1, keepdim=True) * W
    torch.testing.assert_close(sae.W_dec.grad, want)
    torch.testing.assert_close((sae.W_dec.grad * W).sum(-1), torch.zeros(8), atol=1e-6, rtol=0)


def test_renormalisation_restores_unit_rows_and_keeps_directions():
    sae = hand_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 9, dtype=torch.float32)[:, None])
    sae.normalize_decoder()
    torch.testing.assert_close(torch.linalg.vector_norm(sae.W_dec, dim=-1), torch.ones(8))
    torch.testing.assert_close(sae.W_dec.detach(), hand_sae().W_dec.detach())


@pytest.fixture(params=["cpu shortcuts", "fixed sizes"])
def sae_path(request, monkeypatch):
    """Both ways the SAE computes a step: with the CPU's shortcuts that read values on the host, and with every size
    fixed in advance as on an accelerator (no host sync), forced here on the CPU."""
    if request.param == "fixed sizes":
        from lightning_modules.components import batch_topk as module

        monkeypatch.setattr(module, "host_reads_are_free", lambda t: False)
    return request.param


# ---------------------------------------------------------------------------------------------- AuxK
@pytest.mark.parametrize("normalize", [True, False])
def test_aux_loss_on_a_constructed_dead_latent(normalize, sae_path):
    # k = 1: the batch keeps 2 codes: latent 6 of row 0 (4.95) and latent 0 of row 0 (4.0); row 1 gets nothing.
    sae = hand_sae(k=1, k_aux=1, dead_after=100, aux_coef=0.5, aux_normalize=normalize).train()
    sae.tokens_since_fired[7] = 100  # latent 7 = (e2 + e3)/sqrt2 is dead; its pre-activations: 3/sqrt2 and 0
    out = sae(X)
    x_hat = torch.zeros(2, 6)
    x_hat[0] = 4.0 * sae.W_dec[0].detach() + 7 / R2 * sae.W_dec[6].detach()
    e = X - x_hat
    recon = torch.zeros(2, 6)
    recon[0] = 3 / R2 * sae.W_dec[7].detach()  # row 1's pre-activation of latent 7 is 0: nothing to add
    want = (e - recon).pow(2).sum(-1).mean()
    if normalize:
        want = want / (e - e.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(out.loss, out.mse + 0.5 * want)
    # detached residual: the aux gradient reaches only the dead latent's rows (and b_dec via the encoder input)
    out.aux_loss.backward()
    assert sae.W_dec.grad[7].abs().sum() > 0 and sae.W_dec.grad[:7].abs().sum() == 0
    assert sae.W_enc.grad[:7].abs().sum() == 0 and sae.b_enc.grad[:7].abs().sum() == 0


def test_aux_residual_not_detached_reaches_the_live_latents():
    sae = hand_sae(k=1, k_aux=1, dead_after=100, aux_detach=False).train()
    sae.tokens_since_fired[7] = 100
    sae(X).aux_loss.backward()
    assert sae.W_dec.grad[[0, 6]].abs().sum() > 0


def test_no_dead_latent_means_no_aux_loss_and_counters_follow_firing(sae_path):
    sae = hand_sae(k=2, dead_after=100).train()
    out = sae(X)
    assert out.aux_loss.item() == 0.0
    sae.tokens_since_fired[:] = 50
    sae.update_stats(out.fired, 2, out.acts.min())
    assert sae.tokens_since_fired.tolist() == [0, 0, 52, 52, 52, 52, 0, 0]


# --------------------------------------------------------------------------- sparse vs dense gradients
def dense_reference(sae: BatchTopKSAE, x: torch.Tensor):
    """The same loss written densely from the formulas: (B, F) codes and matmuls, autograd everywhere."""
    cfg = sae.cfg
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    xn = x / sae.input_scale
    pre = torch.relu((xn - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
    idx = pre.flatten().topk(cfg.k * x.shape[0]).indices
    mask = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device)
    mask[idx] = True
    codes = pre * mask.view_as(pre)
    # Matryoshka: prefix j decodes the codes of latents < width_j; the plain SAE is the one level (F, 1.0)
    latent = torch.arange(pre.shape[1], device=pre.device)
    recon = sum(w * (xn - (codes * (latent < width)) @ p["W_dec"] - p["b_dec"]).pow(2).sum(-1).mean()
                for width, w in cfg.levels)
    x_hat = codes @ p["W_dec"] + p["b_dec"]
    mse = recon
    dead = sae.tokens_since_fired >= cfg.dead_after
    ranked = torch.where(dead, pre, torch.full_like(pre, -1.0)).topk(min(cfg.aux_k, int(dead.sum())), dim=1).indices
    aux_mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, ranked, True) & dead
    e = xn - x_hat
    e = e.detach() if cfg.aux_detach else e
    aux = (e - (pre * aux_mask) @ p["W_dec"]).pow(2).sum(-1).mean()
    if cfg.aux_normalize:
        aux = aux / (e - e.mean(0)).pow(2).sum(-1).mean()
    (mse + cfg.aux_coef * aux).backward()
    return mse + cfg.aux_coef * aux, {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("aux_detach,aux_normalize,scale", [(True, True, 1.0), (False, False, 3.0),
                                                            (True, False, 0.5)])
def test_sparse_gradients_equal_dense_autograd(aux_detach, aux_normalize, scale, sae_path):
    torch.manual_seed(0)
    cfg = BatchTopKConfig(d_in=6, num_latents=8, k=2, k_aux=3, dead_after=5, aux_coef=0.25,
                          aux_detach=aux_detach, aux_normalize=aux_normalize, normalize_input=False)
    sae = perturbed(cfg, dead=[1, 5, 6], scale=scale)
    x = torch.randn(7, 6, dtype=torch.float64) * scale
    assert_matches_dense(sae, x)


def test_sparse_gradients_equal_dense_autograd_when_most_chosen_codes_are_zero(sae_path):
    """Fewer positive pre-activations than k * B (and than k_aux per row among the dead): the fixed-size selections
    carry zeros, which must code nothing and pass no gradient (relu)."""
    torch.manual_seed(1)
    cfg = BatchTopKConfig(d_in=6, num_latents=8, k=3, k_aux=4, dead_after=5, aux_coef=0.5, normalize_input=False)
    sae = perturbed(cfg, dead=[1, 5, 6])
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)
    x = torch.randn(7, 6, dtype=torch.float64)
    out = assert_matches_dense(sae, x)
    positive = int((sae.pre_acts(x) > 0).sum())
    assert 0 < positive < 3 * 7 == out.acts.numel() and int((out.acts > 0).sum()) == positive


def perturbed(cfg: BatchTopKConfig, dead: list[int], scale: float = 1.0) -> BatchTopKSAE:
    """A float64 SAE in train mode away from its tied initialisation, with latents ``dead`` dead (AuxK runs)."""
    sae = BatchTopKSAE(cfg).double().train()
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(scale)
    sae.tokens_since_fired[dead] = cfg.dead_after
    return sae


def assert_matches_dense(sae: BatchTopKSAE, x: torch.Tensor):
    """The sparse loss and every parameter gradient equal :func:`dense_reference`'s; returns the output."""
    out = sae(x)
    out.loss.backward()
    loss, grads = dense_reference(sae, x)
    tight = dict(rtol=1e-10, atol=1e-12)  # float64: only summation order differs (it caught float32 weights)
    torch.testing.assert_close(out.loss, loss, **tight)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name, **tight)
    return out


# ------------------------------------------------------------------------------------------- Matryoshka
def hand_matryoshka(widths, weights=(), aux: bool = True, seed: int = 0) -> tuple[BatchTopKSAE, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = BatchTopKConfig(d_in=6, num_latents=12, k=3, k_aux=3, dead_after=5, aux_coef=0.25 if aux else 0.0,
                          normalize_input=False, matryoshka_widths=list(widths), matryoshka_weights=list(weights))
    return perturbed(cfg, dead=[2, 9]), torch.randn(7, 6, dtype=torch.float64)


@pytest.mark.parametrize("widths, weights", [([2, 5, 12], [0.5, 0.3, 0.2]), ([4, 12], []), ([1, 11, 12], [0, 1, 2])])
def test_matryoshka_loss_and_gradients_equal_the_nested_formula(widths, weights, sae_path):
    """Against dense autograd of sum_j w_j ||x - (codes * [latent < width_j]) W_dec - b_dec||^2, AuxK on."""
    sae, x = hand_matryoshka(widths, weights)
    out = assert_matches_dense(sae, x)
    with torch.no_grad():  # each prefix's error from the formula, on the codes the batch top-k selected
        codes, latent = sae.dense(out), torch.arange(sae.num_latents)
        want = [(x - (codes * (latent < w)) @ sae.W_dec - sae.b_dec).pow(2).sum(-1).mean()
                for w in sae.cfg.widths]
    torch.testing.assert_close(out.prefix_mse, torch.stack(want))
    torch.testing.assert_close(out.prefix_mse[-1], (x - out.x_hat).pow(2).sum(-1).mean())  # full prefix = plain


def test_matryoshka_widths_as_fractions_of_the_dictionary():
    cfg = BatchTopKConfig(d_in=8, expansion_factor=4, k=2, matryoshka_widths=[0.125, 0.5, 1.0])
    assert cfg.widths == [4, 16, 32] and [w for w, _ in cfg.levels] == [4, 16, 32]
    # kept as given, so a recipe's fractions and a checkpoint's record compare equal on resume; sizes on demand
    assert cfg.matryoshka_widths == [0.125, 0.5, 1.0]
    assert BatchTopKConfig(**{**cfg.to_dict()}).widths == [4, 16, 32]
    unknown = BatchTopKConfig(expansion_factor=4, k=2, matryoshka_widths=[0.125, 0.5, 1.0])  # d_in from the data
    assert BatchTopKConfig.from_dict({**unknown.to_dict(), "d_in": 8}).widths == [4, 16, 32]
    with pytest.raises(ValueError, match="end at the dictionary size 32"):
        BatchTopKConfig(d_in=8, expansion_factor=4, k=2, matryoshka_widths=[0.125, 0.5])


def test_matryoshka_weights_default_to_equal_shares_summing_to_one():
    sae, x = hand_matryoshka([2, 5, 12], aux=False)
    out = sae(x)
    torch.testing.assert_close(out.loss, out.prefix_mse.mean())


def test_a_one_level_matryoshka_is_the_plain_sae_exactly():
    nested, x = hand_matryoshka([12])
    plain, _ = hand_matryoshka([])
    a, b = nested(x), plain(x)
    a.loss.backward(), b.loss.backward()
    assert torch.equal(a.loss, b.loss) and torch.equal(a.x_hat, b.x_hat)
    for (name, p), q in zip(nested.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_matryoshka_prefixes_with_no_selected_latent_still_work():
    sae, x = hand_matryoshka([1, 2, 12], aux=False)
    with torch.no_grad():
        sae.b_enc[:2] = -100.0  # latents 0 and 1 never fire: the first two groups are empty
    out = sae(x)
    out.loss.backward()
    torch.testing.assert_close(out.prefix_mse[0], out.prefix_mse[1])
    assert sae.W_dec.grad[:2].abs().max() == 0


@pytest.mark.parametrize("widths, weights, match", [
    ([4, 8], [], "end at the dictionary size 12"), ([8, 4, 12], [], "increase strictly"),
    ([0, 12], [], "increase strictly"), ([4, 12], [1.0], "one non-negative weight per width"),
    ([4, 12], [-1.0, 2.0], "non-negative"), ([4, 12], [0.0, 0.0], "not all zero"),
])
def test_bad_matryoshka_widths_or_weights_are_config_errors(widths, weights, match):
    with pytest.raises(ValueError, match=match):
        BatchTopKConfig(d_in=6, num_latents=12, k=3, matryoshka_widths=widths, matryoshka_weights=weights)


def test_matryoshka_widths_survive_the_export_round_trip(tmp_path):
    from lightning_modules.export import export_sae, load_sae

    sae, x = hand_matryoshka([4, 12])
    sae = sae.float()
    sae.threshold.fill_(0.05)
    export_sae(sae.eval(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())["batch_topk"]
    assert cfg["matryoshka_widths"] == [4, 12]
    loaded = load_sae(tmp_path / "m")
    assert loaded.cfg.matryoshka_widths == [4, 12]
    torch.testing.assert_close(loaded.encode(x.float()), sae.encode(x.float()))


# ------------------------------------------------------------------------------ initialisation, folding
def test_initialisation_sets_unit_mean_squared_norm_and_b_dec():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2)) * 5 + 3
    sae = BatchTopKSAE(BatchTopKConfig(d_in=6, num_latents=8, k=2, b_dec_init="mean"))
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach())  # tied initialisation
    sae.initialize(x)
    s = x.pow(2).sum(-1).mean().sqrt()
    torch.testing.assert_close(sae.input_scale, s)
    assert (x / s).pow(2).sum(-1).mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0) / s)


def test_geometric_median_minimises_the_sum_of_distances():
    x = torch.randn(101, 3, generator=torch.Generator().manual_seed(3)).double()
    x[:10] += 50  # outliers drag the mean, not the median
    m = geometric_median(x)

    def cost(y):
        return torch.linalg.vector_norm(x - y, dim=-1).sum()

    assert cost(m) < cost(x.mean(0))
    for d in torch.eye(3, dtype=torch.float64):
        assert cost(m) <= cost(m + 1e-3 * d) and cost(m) <= cost(m - 1e-3 * d)


def trained_like_sae(seed: int = 0) -> tuple[BatchTopKSAE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g) * 7 + 2
    sae = BatchTopKSAE(BatchTopKConfig(d_in=6, num_latents=8, k=2))
    sae.initialize(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
    sae.threshold.fill_(0.05)
    return sae.eval(), x


def test_folding_the_input_scale_keeps_codes_and_reconstructions():
    sae, x = trained_like_sae()
    assert sae.input_scale.item() > 5
    codes, x_hat = sae.encode(x), sae(x).x_hat
    fold_input_scale(sae)
    assert sae.input_scale.item() == 1.0
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(codes), x_hat, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ export
def test_export_round_trip_gives_identical_codes(tmp_path):
    from safetensors.torch import load_file

    sae, x = trained_like_sae()
    codes = sae.encode(x)
    loaded = load_sae(export_sae(sae, tmp_path / "a"))
    assert torch.equal(loaded.encode(x) != 0, codes != 0)  # the same active latents
    torch.testing.assert_close(loaded.encode(x), codes, rtol=1e-5, atol=1e-5)  # folding rounds in the last bit
    again = load_sae(export_sae(loaded, tmp_path / "b"))
    assert torch.equal(again.encode(x), loaded.encode(x))  # an exported SAE round-trips bit for bit
    assert set(load_file(str(tmp_path / "a" / "sae.safetensors"))) == {"encoder.weight", "encoder.bias", "W_dec",
                                                                       "b_dec"}
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["d_in"] == 6 and cfg["num_latents"] == 8 and cfg["k"] == 2 and cfg["activation"] == "topk"
    assert cfg["threshold"] == pytest.approx(0.05 * sae.input_scale.item(), rel=1e-6)
    assert not sae.training and sae.input_scale.item() > 5  # exporting did not touch the original


def test_load_sae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    sae, _ = trained_like_sae()
    export_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["batch_topk"]["num_latents"] = 16
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_sae(tmp_path)
    with pytest.raises(TypeError, match="SAEModule or a BatchTopKSAE"):
        export_sae(torch.nn.Linear(2, 2), tmp_path)


# ------------------------------------------------------------------------------------------- bad config
def test_k_larger_than_the_dictionary_is_a_clear_error():
    with pytest.raises(ValueError, match=r"k = 100 must be between 1 and the dictionary size 48"):
        BatchTopKConfig(d_in=6, expansion_factor=8, k=100)
    from lightning_modules import SAEModule

    with pytest.raises(ValueError, match="dictionary size 12"):
        SAEModule(sae=dict(d_in=6, expansion_factor=2, k=13))
    with pytest.raises(ValueError, match="threshold_beta"):
        BatchTopKConfig(d_in=6, threshold_beta=1.0)


# -------------------------------------------------------------------------------- Lightning, tiny encoder
@pytest.fixture(scope="module")
def tiny_cache(tiny_model_no_dropout, sample_data, tmp_path_factory):
    from datamodules import ActivationsDataModule

    dm = ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, source=str(sample_data / "sentences.txt"),
                               cache_dir=str(tmp_path_factory.mktemp("cache")), max_length=32)
    dm.prepare_data()
    return dm.cache_folder()


def tiny_data(model: str, sample_data: Path, cache: Path, **kw):
    from datamodules import ActivationsDataModule

    return ActivationsDataModule(model_name_or_path=model, source=str(sample_data / "sentences.txt"), max_length=32,
                                 cache_path=str(cache), **{"batch_size": 64, "val_fraction": 0.1, **kw})


def test_a_matryoshka_fit_logs_each_prefix_and_its_full_prefix_is_the_plain_fvu(tiny_model_no_dropout, sample_data,
                                                                                 tiny_cache, tmp_path):
    import pytorch_lightning as pl

    from lightning_modules import SAEModule

    pl.seed_everything(0)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, dead_after=256, threshold_start=3,
                               matryoshka_widths=[0.125, 0.5, 1.0], matryoshka_weights=[1.0, 1.0, 2.0]),
                      lr=3e-3, init_samples=512)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, val_check_interval=8, logger=False, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, tiny_data(tiny_model_no_dropout, sample_data, tiny_cache))
    m = trainer.callback_metrics
    assert model.sae.cfg.widths == [8, 32, 64]
    assert {f"sae/prefix_fvu/{w}" for w in (8, 32, 64)} <= set(m)
    torch.testing.assert_close(m["val/sae/prefix_fvu/64"], m["val/sae/fvu"], rtol=1e-5, atol=1e-6)
    assert m["val/sae/prefix_fvu/8"] > m["val/sae/prefix_fvu/64"]  # a few latents explain less than all of them


def test_smoke_fit_on_a_tiny_encoder(tiny_model_no_dropout, sample_data, tiny_cache, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from lightning_modules import SAEModule

    pl.seed_everything(0)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, dead_after=256, threshold_start=3), lr=3e-3, init_samples=512)
    trainer = pl.Trainer(accelerator="cpu", max_steps=25, val_check_interval=25, logger=CSVLogger(tmp_path),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, tiny_data(tiny_model_no_dropout, sample_data, tiny_cache))
    sae = model.sae
    assert sae.cfg.d_in == 32 and model.hparams.sae["d_in"] == 32 and bool(sae.initialized)
    torch.testing.assert_close(torch.linalg.vector_norm(sae.W_dec, dim=-1), torch.ones(64))
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    names = set().union(*[{k for k, v in r.items() if v} for r in rows])
    assert {"sae/fvu", "sae/explained_variance", "sae/l0", "sae/dead_fraction", "sae/aux_loss", "sae/threshold",
            "val/sae/fvu", "val/sae/l0", "val/sae/dead_fraction"} <= names
    fvu = [float(r["sae/fvu"]) for r in rows if r.get("sae/fvu")]
    assert fvu[-1] < fvu[0] and float(rows[-1].get("val/sae/fvu") or fvu[-1]) < 1
    assert sae.threshold.item() > 0 and sae.steps.item() == 25
    # the checkpoint restores the buffers (threshold, dead-latent counters, input scale)
    ckpt = tmp_path / "sae.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = SAEModule.load_from_checkpoint(ckpt)
    for name in ("threshold", "tokens_since_fired", "input_scale", "steps"):
        assert torch.equal(getattr(restored.sae, name), getattr(sae, name)), name
    # what it was trained on travels with it (checkpoint, cfg.json), and the suite refuses other vectors
    from datamodules.activation_cache import ActivationCache
    from evaluation.interpret.suite import run_suite
    from lightning_modules.export import export_sae, load_sae

    cache = ActivationCache(tiny_cache)
    assert sae.activations["layer"] == cache.meta["layer"] == 2 and sae.activations["level"] == "token"
    assert restored.sae.activations == sae.activations
    exported = load_sae(export_sae(model, tmp_path / "sae"))
    assert exported.activations == sae.activations
    other = tmp_path / "other_layer"
    other.mkdir()
    for f in Path(tiny_cache).iterdir():
        (other / f.name).symlink_to(f)
    (other / "meta.json").unlink()
    (other / "meta.json").write_text(json.dumps({**cache.meta, "layer": 1}))
    with pytest.raises(ValueError, match=r"sae was trained on other vectors than .*other_layer holds: layer 2 vs 1"):
        run_suite(exported, ActivationCache(other), tmp_path / "interp")


def test_d_in_mismatch_with_the_data_is_a_clear_error(tiny_model_no_dropout, sample_data, tiny_cache):
    import pytorch_lightning as pl

    from lightning_modules import SAEModule

    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"d_in=48 but the datamodule yields 32-dimensional"):
        trainer.fit(SAEModule(sae=dict(d_in=48, k=4)), tiny_data(tiny_model_no_dropout, sample_data, tiny_cache))


SAE_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("sae_*.yaml"))


@pytest.mark.parametrize("config", SAE_CONFIGS)
def test_recipe_runs_a_few_steps_on_a_tiny_encoder(config, tiny_model_no_dropout, sample_data, tmp_path):
    import train

    cli = train.main([
        "fit", "--config", str(ROOT / "configs" / config),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.max_epochs", "1",
        "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "2", "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--data.model_name_or_path", tiny_model_no_dropout, "--data.source", str(sample_data / "sentences.txt"),
        "--data.data_root", "null", "--data.subset", "null", "--data.column", "text", "--data.text_prefix", "",
        "--data.max_sentences", "null", "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "32",
        "--data.max_length", "32",  # the tiny encoder's 64 positions
        "--data.val_fraction", "0.2", "--model.init_args.sae.threshold_start", "1", "--model.init_samples", "256",
    ])
    assert cli.trainer.global_step == 3
    exported = next(tmp_path.rglob("sae/cfg.json")).parent
    sae = load_sae(exported)
    assert sae.cfg.d_in == 32 and sae.num_latents == 32 * cli.model.hparams.sae["expansion_factor"]
    metrics = json.loads((exported / "sae_metrics.json").read_text())
    assert "val/sae/fvu" in metrics and metrics["num_latents"] == sae.num_latents
    # `train.py export` on the best checkpoint writes the same SAE
    train.main(["export", "--ckpt_path", metrics["checkpoint"], "--output_dir", str(tmp_path / "cli_export")])
    x = torch.randn(16, 32)
    assert torch.equal(load_sae(tmp_path / "cli_export").encode(x), sae.encode(x))


@pytest.mark.slow
@pytest.mark.parametrize("matryoshka", [[], ["0.25", "0.5", "1.0"]], ids=["plain", "matryoshka"])
def test_ddp_two_processes_keep_identical_parameters_and_buffers(matryoshka, tiny_model_no_dropout, sample_data,
                                                                 tiny_cache, tmp_path):
    from datamodules.activation_cache import ActivationCache

    cmd = [sys.executable, str(ROOT / "tests" / "sae_ddp_steps.py"), "--model_dir", tiny_model_no_dropout,
           "--source", str(sample_data / "sentences.txt"), "--cache", str(tiny_cache), "--devices", "2",
           "--steps", "3", "--out_dir", str(tmp_path)] + (["--matryoshka_widths", *matryoshka] if matryoshka else [])
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600, capture_output=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    # counters count the global batch: 3 steps x 2 ranks x 32 vectors for a latent that never fired
    assert r0["sae.tokens_since_fired"].max().item() <= 3 * 2 * 32
    assert r0["sae.steps"].item() == 3 and r0["sae.threshold"].item() > 0
    (run,) = (tmp_path / "csv").iterdir()  # one log folder, shared by the ranks
    assert (run / "sae" / "sae.safetensors").is_file() and (run / "sae" / "sae_metrics.json").is_file()
    cfg = json.loads((run / "sae" / "cfg.json").read_text())["batch_topk"]
    assert cfg["matryoshka_widths"] == ([16, 32, 64] if matryoshka else [])
    summary = json.loads((run / "interpret" / "summary.json").read_text())
    assert summary["interpret/n_tokens"] == len(ActivationCache(tiny_cache))


def test_forward_under_bf16_autocast_computes_in_float32():
    sae = hand_sae(k=2).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = sae(X)
    assert out.x_hat.dtype == torch.float32
    torch.testing.assert_close(out.x_hat, sae(X).x_hat)


def test_a_checkpoint_written_before_the_config_was_taken_whole_still_loads(tmp_path):
    """Older SAE checkpoints keep k, expansion_factor, ... flat among the hyper-parameters: load_module nests them
    under ``sae`` (Lightning would drop the unknown keys and build a default SAE that the weights do not fit)."""
    import pytorch_lightning as pl

    from lightning_modules.loading import load_module
    from lightning_modules.sae import SAEModule

    module = SAEModule(sae=dict(d_in=8, expansion_factor=2, k=3, threshold_start=5, dead_after=77), lr=1e-3)
    with torch.no_grad():
        module.sae.W_enc.add_(torch.randn_like(module.sae.W_enc))
    flat = {**module.hparams["sae"], "lr": 1e-3, "_class_path": "lightning_modules.sae.SAEModule"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": flat,
                "pytorch-lightning_version": pl.__version__, "global_step": 0}, path)
    loaded = load_module(path)
    assert loaded.sae.cfg.k == 3 and loaded.sae.cfg.dead_after == 77 and loaded.sae.num_latents == 16
    torch.testing.assert_close(loaded.sae.W_enc, module.sae.W_enc)
    # resuming it reads the same nested settings: a recipe's different k is refused, unset fields are filled
    from jsonargparse import Namespace

    from core.errors import DataError
    from lightning_modules.checkpoints import resume_config

    def fit_config(k):
        return Namespace(ckpt_path=str(path), trainer=Namespace(default_root_dir=str(tmp_path), logger=None,
                                                                callbacks=None),
                         model=Namespace(class_path="lightning_modules.sae.SAEModule",
                                         init_args=Namespace(sae=Namespace(k=k, dead_after=None), lr=None)))
    with pytest.raises(DataError, match=r"model.init_args.sae.k \(checkpoint 3, now 32\)"):
        resume_config(fit_config(32), warn=lambda _: None)
    cfg = fit_config(None)
    resume_config(cfg, warn=lambda _: None)
    args = cfg.model.init_args
    assert args.sae.k == 3 and args.sae.dead_after == 77 and args.lr == 1e-3
