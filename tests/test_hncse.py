"""HNCSE-PM and HNCSE-HNM candidate builders: against plain loops written from docs/methods.md section 2, edge
cases, DDP equivalence, configs."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, WORDS

from lightning_modules.losses import (
    HardNegativeMixing,
    InBatchNegatives,
    PositiveMixing,
    Views,
    contrastive_logits,
    info_nce,
)

TAU = 0.05


# --------------------------------------------------------------------------- references written from the formulas
def cos_over_tau(a, b, tau=TAU):
    return F.cosine_similarity(a, b, dim=0) / tau


def loop_loss(z1, columns, tau, offset, B, extras=None, alpha=1.0, G=None):
    """Cross-entropy of rows offset..offset+B-1: logits = [cos(z1_i, c)/tau for c in columns] + extras[i];
    log(alpha) on column G + i (the row's own hard negative); label column i."""
    total = 0.0
    for i in range(offset, offset + B):
        logits = [cos_over_tau(z1[i], c, tau) for c in columns]
        if G is not None and alpha != 1.0:
            logits[G + i] = logits[G + i] + math.log(alpha)
        logits += [cos_over_tau(z1[i], g, tau) for g in (extras[i] if extras else [])]
        logits = torch.stack(logits)
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / B


def loop_pm(z1, z2, z3, tau=TAU, margin=0.1, w1=1.0, w2=0.0, mix_grad=True, eps=1e-4, alpha=1.0, offset=0,
            B=None):
    """HNCSE-PM row by row; returns (loss, cases) with cases[i] in {1, 2, 3}."""
    G = z1.shape[0]
    B = G if B is None else B
    pool = list(z2) + (list(z3) if z3 is not None else [])
    mixed, cases = [], []
    for i in range(G):
        s_ii, s_ih, h = cos_over_tau(z1[i], z2[i], tau), None, None
        for j in range(len(pool)):
            s_ij = cos_over_tau(z1[i], pool[j], tau)
            if j != i and (s_ih is None or s_ij.item() > s_ih.item()):  # strict: the first maximum wins ties
                s_ih, h = s_ij, j
        if h is None:  # no negative at all
            mixed.append(z2[i]), cases.append(3)
            continue
        if not mix_grad:
            s_ii, s_ih = s_ii.detach(), s_ih.detach()
        if s_ii.item() <= s_ih.item():
            den = s_ii + s_ih
            if abs(den.item()) < eps:  # the documented guard: |S_ii + S_ih| >= eps, sign kept, 0 positive
                den = torch.tensor(eps if den.item() >= 0 else -eps)
            mixed.append((s_ii * z2[i] + s_ih * pool[h]) / den), cases.append(1)
        elif s_ii.item() != 0 and (s_ii.item() - s_ih.item()) / s_ii.item() <= margin:
            mixed.append(w1 * z2[i] + w2 * pool[h]), cases.append(2)
        else:
            mixed.append(z2[i]), cases.append(3)
    columns = mixed + (list(z3) if z3 is not None else [])
    return loop_loss(z1, columns, tau, offset, B, alpha=alpha, G=G), cases


def loop_hnm(z1, z2, z3, pairs, alphas, k, tau=TAU, detach=False, alpha=1.0, offset=0, B=None):
    """HNCSE-HNM row by row with given draws: pairs (G, s, 2) positions in the top-k list, alphas (G, s)."""
    G = z1.shape[0]
    B = G if B is None else B
    pool = list(z2) + (list(z3) if z3 is not None else [])
    k = min(k, len(pool) - 1)
    extras = {}
    for i in range(offset, offset + B):
        negatives = [j for j in range(len(pool)) if j != i]
        negatives.sort(key=lambda j: -cos_over_tau(z1[i], pool[j], tau).item())  # stable: ties by lower index
        top = negatives[:k]
        extras[i] = []
        for t in range(pairs.shape[1]):
            a, b = top[pairs[i, t, 0]], top[pairs[i, t, 1]]
            g = alphas[i, t] * pool[a] + (1 - alphas[i, t]) * pool[b]
            g = g / g.norm()
            extras[i].append(g.detach() if detach else g)
    return loop_loss(z1, pool, tau, offset, B, extras, alpha=alpha, G=G)


def draws(seed, G, s, k_eff, uniform, alpha=0.5):
    """The documented RNG contract of HardNegativeMixing: pair positions, then (optionally) U(0, 1) alphas."""
    torch.manual_seed(seed)
    pairs = torch.randint(k_eff, (G, s, 2))
    alphas = torch.rand(G, s) if uniform else torch.full((G, s), alpha)
    return pairs, alphas


def leaves(*shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale).requires_grad_() for shape in shapes]


def close_pm_views(G=6, D=4, seed=3):
    """z2 = z1 + noise: positives and hardest negatives close enough that all three PM cases occur."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(G, D, generator=g)
    z2 = z1 + 0.9 * torch.randn(G, D, generator=g)
    z3 = z1 + 1.2 * torch.randn(G, D, generator=g)
    return [t.clone().requires_grad_() for t in (z1, z2, z3)]


def assert_same_value_and_grads(loss, ref, inputs):
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref.reshape(loss.shape), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, allow_unused=True)
    for x, y in zip(got, want):
        x = torch.zeros_like(inputs[0]) if x is None else x
        y = torch.zeros_like(inputs[0]) if y is None else y
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- positive mixing
@pytest.mark.parametrize("mix_grad", [True, False])
@pytest.mark.parametrize("w1,w2", [(1.0, 0.0), (0.7, 0.6)])
def test_positive_mixing_matches_loop_unsupervised(mix_grad, w1, w2):
    z1, z2, _ = close_pm_views()
    builder = PositiveMixing(margin=0.3, w1=w1, w2=w2, mix_grad=mix_grad)
    loss = info_nce(builder(Views(z1, z2, None, 0, 6), TAU), TAU)
    ref, cases = loop_pm(z1, z2, None, margin=0.3, w1=w1, w2=w2, mix_grad=mix_grad)
    assert set(cases) == {1, 2, 3}, cases  # the data exercises every branch
    assert builder.cases(Views(z1, z2, None, 0, 6), TAU).tolist() == cases
    assert_same_value_and_grads(loss, ref, [z1, z2])


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_positive_mixing_matches_loop_supervised(alpha):
    """Supervised: the hardest negative comes from z2 (other rows) and z3 (all rows); z3 columns stay."""
    z1, z2, z3 = close_pm_views(seed=5)
    builder = PositiveMixing(margin=0.3, w1=0.9, w2=0.3, hard_negative_weight=alpha)
    c = builder(Views(z1, z2, z3, 0, 6), TAU)
    assert c.shared_MD.shape == (12, 4)
    torch.testing.assert_close(c.shared_MD[6:], z3)
    ref, cases = loop_pm(z1, z2, z3, margin=0.3, w1=0.9, w2=0.3, alpha=alpha)
    assert len(set(cases)) >= 2, cases
    assert_same_value_and_grads(info_nce(c, TAU), ref, [z1, z2, z3])


def test_positive_mixing_takes_a_z3_as_hardest_negative_in_the_supervised_setting():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # row 0: cos 0.707 to its positive
    z3 = torch.tensor([[-1.0, 0.0], [1.0, 0.1]])  # z3_1 is closer to z1_0 than z2_0 is: case 1 with h = z3_1
    mixed = PositiveMixing().mixed_positives(Views(z1, z2, z3, 0, 2), TAU)
    s_ii, s_ih = F.cosine_similarity(z1[0], z2[0], 0) / TAU, F.cosine_similarity(z1[0], z3[1], 0) / TAU
    torch.testing.assert_close(mixed[0], (s_ii * z2[0] + s_ih * z3[1]) / (s_ii + s_ih))
    torch.testing.assert_close(mixed[1], z2[1])  # row 1: positive identical to the anchor, far from the rest


def test_positive_mixing_batch_of_two_with_a_tie_and_opposite_signs_closed_form():
    """Row 0: S_00 = -12, S_01 = +12 (case 1, denominator exactly 0: guarded). Row 1: S_11 = S_10 = 16 (a tie,
    case 1 since S_ii <= S_ih): z2~_1 = (16 z2_1 + 16 z2_0) / 32."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[-0.6, 0.8], [0.6, 0.8]], requires_grad=True)
    builder = PositiveMixing(eps=1e-4)
    mixed = builder.mixed_positives(Views(z1, z2, None, 0, 2), TAU)
    # (-12 z2_0 + 12 z2_1) / 1e-4 = (14.4 / 1e-4, 0): the guard keeps the sign and a finite scale
    torch.testing.assert_close(mixed[0], torch.tensor([14.4 / 1e-4, 0.0]), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(mixed[1], torch.tensor([0.0, 0.8]))
    loss = info_nce(builder(Views(z1, z2, None, 0, 2), TAU), TAU)
    ref, cases = loop_pm(z1, z2, None)
    assert cases == [1, 1]
    assert_same_value_and_grads(loss, ref, [z1, z2])


def test_positive_mixing_batch_of_one_is_simcse():
    z1, z2 = leaves((1, 4), (1, 4))
    c = PositiveMixing()(Views(z1, z2, None, 0, 1), TAU)
    torch.testing.assert_close(c.shared_MD, z2)
    assert info_nce(c, TAU).item() == 0.0


@pytest.mark.parametrize("w1,w2", [(1.0, 0.0), (0.3, 0.9)])
def test_positive_mixing_equals_simcse_when_every_positive_is_already_far_ahead(w1, w2):
    """z2 = z1 and the other rows nearly orthogonal: case 3 everywhere, so PM is SimCSE (values and grads)."""
    z1 = (torch.eye(5, 6) + 0.05 * torch.randn(5, 6, generator=torch.Generator().manual_seed(0))).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    pm = info_nce(PositiveMixing(w1=w1, w2=w2)(Views(z1, z2, None, 0, 5), TAU), TAU)
    simcse = info_nce(InBatchNegatives()(Views(z1, z2, None, 0, 5), TAU), TAU)
    assert loop_pm(z1, z2, None)[1] == [3] * 5
    assert_same_value_and_grads(pm, simcse, [z1, z2])


def test_positive_mixing_defaults_reproduce_simcse_in_the_near_tie_case():
    z1, z2, _ = close_pm_views()
    _, cases = loop_pm(z1, z2, None, margin=0.3)
    mixed = PositiveMixing(margin=0.3).mixed_positives(Views(z1, z2, None, 0, 6), TAU)
    for i, case in enumerate(cases):
        if case != 1:
            assert torch.equal(mixed[i], z2[i])


def test_positive_mixing_mix_grad_switch_changes_only_the_gradient():
    z1, z2, _ = close_pm_views()
    with_grad = info_nce(PositiveMixing(margin=0.3, mix_grad=True)(Views(z1, z2, None, 0, 6), TAU), TAU)
    without = info_nce(PositiveMixing(margin=0.3, mix_grad=False)(Views(z1, z2, None, 0, 6), TAU), TAU)
    assert with_grad.item() == pytest.approx(without.item(), rel=1e-6)
    g_with, g_without = torch.autograd.grad(with_grad, z1), torch.autograd.grad(without, z1)
    assert (g_with[0] - g_without[0]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ hard negative mixing
@pytest.mark.parametrize("supervised", [False, True])
@pytest.mark.parametrize("uniform,detach", [(False, False), (True, False), (True, True)])
def test_hard_negative_mixing_matches_loop(supervised, uniform, detach):
    z1, z2, z3 = leaves((6, 4), (6, 4), (6, 4), seed=1)
    z3_or_none = z3 if supervised else None
    inputs = [z1, z2, z3] if supervised else [z1, z2]
    alpha = 2.0 if supervised else 1.0
    builder = HardNegativeMixing(k=3, s=5, alpha=0.3, alpha_uniform=uniform, detach_synthetic=detach,
                                 hard_negative_weight=alpha)
    torch.manual_seed(7)
    c = builder(Views(z1, z2, z3_or_none, 0, 6), TAU)
    assert c.extra_BSD.shape == (6, 5, 4)
    assert contrastive_logits(c, TAU).shape == (6, (12 if supervised else 6) + 5)
    pairs, alphas = draws(7, 6, 5, 3, uniform, alpha=0.3)
    ref = loop_hnm(z1, z2, z3_or_none, pairs, alphas, k=3, detach=detach, alpha=alpha)
    assert_same_value_and_grads(info_nce(c, TAU), ref, inputs)


def test_hard_negative_mixing_k_larger_than_the_batch_is_clamped():
    z1, z2 = leaves((5, 4), (5, 4), seed=2)
    torch.manual_seed(3)
    loss = info_nce(HardNegativeMixing(k=10, s=7)(Views(z1, z2, None, 0, 5), TAU), TAU)
    pairs, alphas = draws(3, 5, 7, 4, False)  # k' = 4 other rows
    assert pairs.max() == 3
    assert_same_value_and_grads(loss, loop_hnm(z1, z2, None, pairs, alphas, k=10), [z1, z2])


def test_hard_negative_mixing_batch_of_two_closed_form():
    """One negative: every synthetic negative is that negative itself, so the row's loss has 1 + s copies of it."""
    z1, z2 = leaves((2, 3), (2, 3), seed=4)
    s = 4
    loss = info_nce(HardNegativeMixing(k=10, s=s)(Views(z1, z2, None, 0, 2), TAU), TAU)
    S = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / TAU
    want = sum(-S[i, i] + torch.log(S[i, i].exp() + (1 + s) * S[i, 1 - i].exp()) for i in range(2)) / 2
    torch.testing.assert_close(loss, want)


def test_hard_negative_mixing_batch_of_one_adds_nothing():
    z1, z2 = leaves((1, 3), (1, 3))
    c = HardNegativeMixing()(Views(z1, z2, None, 0, 1), TAU)
    assert c.extra_BSD is None
    assert info_nce(c, TAU).item() == 0.0


def test_hard_negative_mixing_ties_go_to_the_lower_column():
    """z2_1 == z2_2 == z2_3: which copy is picked changes no value but decides where the gradient goes."""
    z1, z2 = leaves((5, 3), (5, 3), seed=6)
    with torch.no_grad():
        z2[2] = z2[1]
        z2[3] = z2[1]
    torch.manual_seed(0)
    loss = info_nce(HardNegativeMixing(k=2, s=6)(Views(z1, z2, None, 0, 5), TAU), TAU)
    pairs, alphas = draws(0, 5, 6, 2, False)
    assert_same_value_and_grads(loss, loop_hnm(z1, z2, None, pairs, alphas, k=2), [z1, z2])


def test_hard_negative_mixing_is_deterministic_under_a_seed():
    z1, z2 = leaves((6, 4), (6, 4), seed=8)
    builder = HardNegativeMixing(k=4, s=6, alpha_uniform=True)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(builder(Views(z1, z2, None, 0, 6), TAU).extra_BSD)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("supervised", [False, True])
@pytest.mark.parametrize("make", [
    lambda: PositiveMixing(margin=0.3, w1=0.8, w2=0.5),
    lambda: HardNegativeMixing(k=3, s=4, alpha_uniform=True),
])
def test_local_slices_of_a_gathered_batch_reproduce_the_single_process_loss(supervised, make):
    """What rank r of 2 computes (its rows, the global pool, the same seeded draws) averages to the 1-process
    loss with the same gradients: the maths behind the DDP equivalence test below."""
    z1, z2, z3 = close_pm_views(G=6, seed=2)
    z3 = z3 if supervised else None
    inputs = [t for t in (z1, z2, z3) if t is not None]
    builder = make()
    torch.manual_seed(0)
    full = info_nce(builder(Views(z1, z2, z3, 0, 6), TAU), TAU)
    halves = []
    for offset in (0, 3):
        torch.manual_seed(0)  # every rank has the same RNG state (seed_everything)
        halves.append(info_nce(builder(Views(z1, z2, z3, offset, 3), TAU), TAU))
    assert_same_value_and_grads(full, (halves[0] + halves[1]) / 2, inputs)


@pytest.mark.parametrize("make,match", [
    (lambda: PositiveMixing(margin=-0.1), "margin"),
    (lambda: PositiveMixing(w1=float("nan")), "w1"),
    (lambda: PositiveMixing(eps=0.0), "eps"),
    (lambda: PositiveMixing(hard_negative_weight=0.0), "hard_negative_weight"),
    (lambda: HardNegativeMixing(k=0), "k must"),
    (lambda: HardNegativeMixing(k=2.5), "k must"),
    (lambda: HardNegativeMixing(s=0), "s must"),
    (lambda: HardNegativeMixing(alpha=1.5), "alpha"),
])
def test_bad_options_are_rejected_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------------------ DDP
def run_one_step(tmp_path, model_dir, data, devices, batch_size, builder, tag):
    """tests/ddp_one_step.py: in this process for 1 device, as a script for DDP (it re-launches itself)."""
    out = tmp_path / f"{tag}_{devices}.pt"
    args = ["--model_dir", model_dir, "--data", str(data), "--devices", str(devices), "--batch_size",
            str(batch_size), "--builder", json.dumps(builder), "--out", str(out)]
    if devices == 1:
        import ddp_one_step

        ddp_one_step.main(args)
    else:
        cmd = [sys.executable, str(ROOT / "tests" / "ddp_one_step.py"), *args]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def write_data(tmp_path, supervised: bool, rows: int = 8, world: int = 2) -> tuple[Path, Path]:
    """Sentences (or triplets) of words the tiny tokenizer knows, as two files: in order for the 2-process run,
    and in the order the 2 ranks' batches are gathered for the 1-process run. DistributedSampler deals rows
    out round-robin (rank r gets r, r + 2, ...), so the gathered batch is rows 0, 2, 4, ..., 1, 3, 5, ...;
    HNM's draws belong to positions in the gathered batch, so the single process must see that order too."""
    g = torch.Generator().manual_seed(0)
    words = [w for w in WORDS if w != ","]

    def sentence():
        return " ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g))

    if supervised:
        header, lines = "sent0,sent1,hard_neg\n", [f"{sentence()},{sentence()},{sentence()}\n" for _ in range(rows)]
    else:
        header, lines = "", [sentence() + "\n" for _ in range(rows)]
    suffix = ".csv" if supervised else ".txt"
    ordered, gathered = tmp_path / f"ordered{suffix}", tmp_path / f"gathered{suffix}"
    ordered.write_text(header + "".join(lines))
    gathered.write_text(header + "".join(lines[i] for r in range(world) for i in range(r, rows, world)))
    return ordered, gathered


@pytest.mark.slow
@pytest.mark.parametrize("builder,supervised", [
    ({"class_path": "lightning_modules.losses.PositiveMixing",
      "init_args": {"margin": 0.5, "w1": 0.8, "w2": 0.4}}, False),
    ({"class_path": "lightning_modules.losses.HardNegativeMixing",
      "init_args": {"k": 3, "s": 5, "alpha_uniform": True}}, True),
], ids=["pm-unsup", "hnm-sup"])
def test_ddp_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_no_dropout, builder,
                                                                 supervised):
    ordered, gathered = write_data(tmp_path, supervised)
    one = run_one_step(tmp_path, tiny_model_no_dropout, gathered, 1, 8, builder, "one")
    two = run_one_step(tmp_path, tiny_model_no_dropout, ordered, 2, 4, builder, "two")
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    grad_diff = max((one["grads"][k] - two["grads"][k]).abs().max().item() for k in one["grads"])
    param_diff = max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"])
    assert grad_diff < 1e-5 and param_diff < 1e-5, (grad_diff, param_diff)


# -------------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config,builder", [("hncse_pm_quick.yaml", PositiveMixing),
                                            ("hncse_hnm_quick.yaml", HardNegativeMixing)])
def test_quick_recipes_train_a_few_steps_on_the_tiny_model(tmp_path, monkeypatch, tiny_model, sample_data, config,
                                                           builder):
    """The offline recipes, model and data swapped for tiny local ones, train 2 steps with all their callbacks
    (STS evaluation, checkpointing, export)."""
    import train

    monkeypatch.chdir(ROOT)  # the quick recipes name configs/quickstart_data/... relative to the checkout
    cli = train.main([
        "fit", "--config", f"configs/{config}", "--model.init_args.model_name_or_path", tiny_model,
        "--data.init_args.source", str(sample_data / "sentences.txt"), "--data.init_args.batch_size", "8",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])
    assert isinstance(cli.model.candidates, builder)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@functools.cache
def printed_config(name: str) -> dict:
    """The config LightningCLI resolves from configs/<name> (``--print_config``), as a dict."""
    import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("config,builder,simcse", [
    ("hncse_pm_bert_base.yaml", "PositiveMixing", "simcse_unsup_bert_base.yaml"),
    ("hncse_hnm_bert_base.yaml", "HardNegativeMixing", "simcse_unsup_bert_base.yaml"),
    ("hncse_pm_quick.yaml", "PositiveMixing", "quickstart.yaml"),
    ("hncse_hnm_quick.yaml", "HardNegativeMixing", "quickstart.yaml"),
])
def test_recipes_parse_and_differ_from_their_simcse_recipe_only_in_the_builder(config, builder, simcse):
    mine, base = copy.deepcopy(printed_config(config)), copy.deepcopy(printed_config(simcse))
    assert mine["model"]["init_args"].pop("candidates")["class_path"] == f"lightning_modules.losses.{builder}"
    assert base["model"]["init_args"].pop("candidates") is None
    assert mine["model"] == base["model"] and mine["data"] == base["data"]
    assert mine["seed_everything"] == base["seed_everything"]
    for key in ("max_epochs", "max_steps", "precision", "accelerator"):
        assert mine["trainer"][key] == base["trainer"][key]
    assert [c["class_path"] for c in mine["trainer"]["callbacks"]] == [
        c["class_path"] for c in base["trainer"]["callbacks"]]
