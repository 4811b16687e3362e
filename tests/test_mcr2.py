"""MCR2: the loss against the formulas, the module over a frozen teacher, groupings, export, bad input, DDP.

Also a script: ``python tests/test_mcr2.py --ddp_step ...`` runs one optimiser step (see :func:`ddp_step_main`).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from core.errors import DataError
from core.metrics import spearman100
from datamodules import GroupedTextDataModule, STSDataModule, load_sts
from datamodules.groups import read_extra_sentences
from lightning_modules import MCR2Module
from lightning_modules.components.guard import DivergenceError
from lightning_modules.components.heads import ProjectionHead
from lightning_modules.export import export_sentence_transformer
from lightning_modules.losses.mcr2 import (
    coding_rate,
    cosine_distillation,
    group_blocks,
    grouped_coding_rate,
    listwise_distillation,
    logdet_identity_plus_gram,
    matryoshka_mcr2_loss,
    mcr2_loss,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the formulas, written plainly
def direct_rate(z, eps2):
    m, d = z.shape
    return 0.5 * torch.logdet(torch.eye(d, dtype=z.dtype) + d / (m * eps2) * z.T @ z)


def direct_rate_c(z, groups, eps2):
    m, d = z.shape
    total = torch.zeros((), dtype=z.dtype)
    for j in groups.unique().tolist():
        z_j = z[groups == j]
        m_j = z_j.shape[0]
        total = total + m_j / (2 * m) * torch.logdet(torch.eye(d, dtype=z.dtype) + d / (m_j * eps2) * z_j.T @ z_j)
    return total


def direct_distill(s, t):
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    m = s.shape[0]
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                total = total + (s[i] @ s[j] - t[i] @ t[j]) ** 2
    return total / (m * (m - 1))


def direct_listwise(s, t, tau_s, tau_t):
    """Mean over rows i of sum_{j != i} p_ij log(p_ij / q_ij), softmaxes over j != i, written as loops."""
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    m = s.shape[0]
    total = 0.0
    for i in range(m):
        others = [j for j in range(m) if j != i]
        zt = sum(torch.exp(t[i] @ t[j] / tau_t) for j in others)
        zs = sum(torch.exp(s[i] @ s[j] / tau_s) for j in others)
        for j in others:
            p = torch.exp(t[i] @ t[j] / tau_t) / zt
            q = torch.exp(s[i] @ s[j] / tau_s) / zs
            total = total + p * torch.log(p / q)
    return total / m


def unit_rows(m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, d, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("m,d", [(6, 10), (12, 5), (8, 8)])  # smaller side: m < d, m > d, equal
def test_coding_rate_matches_the_formula_values_and_gradients(m, d):
    z = unit_rows(m, d).requires_grad_()
    z64 = z.detach().double().requires_grad_()
    got, want = coding_rate(z, eps2=0.3), direct_rate(z64, 0.3)
    got.backward(), want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=1e-4)


def test_coding_rate_closed_form_on_orthonormal_rows():
    # Z = I_d: Z^T Z = I, so R = d/2 log(1 + d / (d eps2)) = d/2 log(1 + 1/eps2)
    d, eps2 = 7, 0.5
    assert coding_rate(torch.eye(d), eps2).item() == pytest.approx(d / 2 * math.log(1 + 1 / eps2), rel=1e-6)


def test_grouped_rate_matches_the_formula_with_unsorted_labels_and_a_singleton():
    z = unit_rows(11, 6, seed=1).requires_grad_()
    groups = torch.tensor([5, 2, 5, 9, 2, 2, 5, 7, 9, 2, 5])  # group 7 has one sample
    z64 = z.detach().double().requires_grad_()
    got, want = grouped_coding_rate(z, groups, 0.5), direct_rate_c(z64, groups, 0.5)
    got.backward(), want.backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=1e-4)


def test_grouped_rate_with_groups_larger_than_the_dimension():
    z = unit_rows(40, 3, seed=2).double()
    groups = torch.arange(40) % 3  # 13-14 rows per group > d = 3: the D side is used
    torch.testing.assert_close(grouped_coding_rate(z, groups, 0.5).double(), direct_rate_c(z, groups, 0.5),
                               atol=1e-5, rtol=1e-5)


def test_grouped_rate_closed_form_on_repeated_vectors():
    # each group = m_j copies of one unit vector u: logdet(I + d/(m_j eps2) m_j u u^T) = log(1 + d/eps2)
    # so R_c = sum_j m_j/(2m) log(1 + d/eps2) = 1/2 log(1 + d/eps2)
    d, eps2 = 5, 0.5
    u = unit_rows(3, d, seed=3)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    assert grouped_coding_rate(u[groups], groups, eps2).item() == pytest.approx(0.5 * math.log(1 + d / eps2),
                                                                                rel=1e-5)


def test_fixed_group_size_equals_explicit_groups():
    z = unit_rows(12, 7, seed=4)
    torch.testing.assert_close(grouped_coding_rate(z, 3, 0.5), grouped_coding_rate(z, torch.arange(12) // 3, 0.5))
    with pytest.raises(ValueError, match="does not divide"):
        grouped_coding_rate(z, 5, 0.5)


def test_invariant_to_permuting_rows_within_and_across_groups():
    z = unit_rows(10, 6, seed=5)
    groups = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2, 2, 0])
    ref = mcr2_loss(z, groups)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    moved = mcr2_loss(z[perm], groups[perm])
    torch.testing.assert_close(moved.rate, ref.rate)
    torch.testing.assert_close(moved.rate_c, ref.rate_c)
    relabelled = mcr2_loss(z, groups * 10 + 3)  # group ids are names, not positions
    torch.testing.assert_close(relabelled.loss, ref.loss)


@pytest.mark.parametrize("s,d", [(3, 8), (9, 4)])
def test_logdet_identity_on_both_sides_and_zero_padding(s, d):
    z = torch.randn(2, s, d, generator=torch.Generator().manual_seed(6)).double()
    scale = torch.tensor([0.7, 2.0])
    small_side = torch.logdet(torch.eye(s, dtype=z.dtype) + scale[:, None, None] * z @ z.mT)
    big_side = torch.logdet(torch.eye(d, dtype=z.dtype) + scale[:, None, None] * z.mT @ z)
    torch.testing.assert_close(small_side, big_side)
    torch.testing.assert_close(logdet_identity_plus_gram(z, scale).double(), big_side, atol=1e-4, rtol=1e-5)
    padded = torch.cat([z, torch.zeros(2, 4, d, dtype=z.dtype)], dim=1)  # zero rows change nothing
    torch.testing.assert_close(logdet_identity_plus_gram(padded, scale).double(), big_side, atol=1e-4, rtol=1e-5)


def test_group_blocks_slice_sorted_groups():
    z = torch.arange(5.0)[:, None].expand(5, 2)
    blocks, counts = group_blocks(z, torch.tensor([3, 1, 3, 3, 1]))
    assert counts.tolist() == [2, 3]
    assert blocks[:, :, 0].tolist() == [[1, 4, 0], [0, 2, 3]]  # group 1 padded with a zero row


def test_mcr2_loss_normalises_rows_and_weights_the_terms():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    groups = torch.arange(8) // 2
    out = mcr2_loss(z, groups, eps2=0.4, gamma=1.5)
    scaled = mcr2_loss(z * torch.linspace(0.1, 10, 8)[:, None], groups, eps2=0.4, gamma=1.5)
    torch.testing.assert_close(scaled.loss, out.loss)
    zn = F.normalize(z.double(), dim=-1)
    want = -1.5 * direct_rate(zn, 0.4) + direct_rate_c(zn, groups, 0.4)
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert out.delta_r.item() == pytest.approx((direct_rate(zn, 0.4) - direct_rate_c(zn, groups, 0.4)).item(),
                                               abs=1e-5)
    assert out.smallest_group.item() == 2


def test_distillation_matches_the_loop_and_only_the_student_gets_gradient():
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(8)).requires_grad_()
    t = torch.randn(6, 9, generator=torch.Generator().manual_seed(9)).requires_grad_()
    got = cosine_distillation(s, t)
    want = direct_distill(s.detach().double(), t.detach().double())
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert s.grad is not None and t.grad is None
    s64 = s.detach().double().requires_grad_()
    direct_distill(s64, t.detach().double()).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-4)
    assert cosine_distillation(t.detach() * 3, t.detach()).item() == pytest.approx(0.0, abs=1e-6)
    out = mcr2_loss(s.detach(), 2, teacher_MD=t.detach(), distill_weight=10.0)
    assert out.loss.item() == pytest.approx((-out.rate + out.rate_c + 10 * out.distill).item(), rel=1e-6)


def test_listwise_distillation_closed_form_on_hand_made_rows():
    # teacher: rows 0 and 1 equal, row 2 orthogonal; student: rows 1 and 2 equal, row 0 orthogonal.
    # With tau = 1 / ln 3, exp(cos / tau) is 3 for cos = 1 and 1 for cos = 0, so each softmax over the two other
    # rows is (3/4, 1/4), (1/4, 3/4) or (1/2, 1/2):
    #   row 0: p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    #   row 1: p = (3/4, 1/4), q = (1/4, 3/4): KL = 3/4 ln 3 + 1/4 ln(1/3) = 1/2 ln 3
    #   row 2: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 5.0]])  # any scale: rows are normalised
    want = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.5 * math.log(3) + 0.5 * math.log(2)
            + 0.5 * math.log(2 / 3)) / 3
    assert listwise_distillation(student, teacher, 1 / math.log(3)).item() == pytest.approx(want, rel=1e-6)
    assert listwise_distillation(teacher, teacher, 1 / math.log(3)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("tau_s,tau_t", [(0.05, None), (0.1, 0.05)])
def test_listwise_distillation_matches_the_loop_and_only_the_student_gets_gradient(tau_s, tau_t):
    s = torch.randn(7, 4, generator=torch.Generator().manual_seed(12)).requires_grad_()
    t = torch.randn(7, 9, generator=torch.Generator().manual_seed(13)).requires_grad_()
    got = listwise_distillation(s, t, tau_s, tau_t)
    s64 = s.detach().double().requires_grad_()
    want = direct_listwise(s64, t.detach().double(), tau_s, tau_t or tau_s)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    got.backward()
    want.backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        listwise_distillation(s[:1], t[:1])


def test_mcr2_loss_sums_the_weighted_terms_and_skips_the_off_ones():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(14))
    t = torch.randn(8, 11, generator=torch.Generator().manual_seed(15))
    groups = torch.arange(8) // 2
    out = mcr2_loss(z, groups, eps2=0.5, gamma=1.2, teacher_MD=t, distill_weight=3.0, listwise_weight=2.0,
                    temperature=0.2, mcr2_weight=0.5)
    zn = F.normalize(z.double(), dim=-1)
    rate, rate_c = direct_rate(zn, 0.5), direct_rate_c(zn, groups, 0.5)
    listwise = direct_listwise(z.double(), t.double(), 0.2, 0.2)
    want = 0.5 * (-1.2 * rate + rate_c) + 3.0 * direct_distill(z.double(), t.double()) + 2.0 * listwise
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.listwise.item() == pytest.approx(listwise.item(), rel=1e-5)
    # without the MCR2 term the groups are not read (3 does not divide the 8 rows)
    only = mcr2_loss(z, 3, teacher_MD=t, listwise_weight=1.0, temperature=0.2, mcr2_weight=0.0)
    assert only.rate.item() == only.rate_c.item() == only.smallest_group.item() == 0  # no rates were computed
    assert only.loss.item() == pytest.approx(listwise.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs teacher_MD"):
        mcr2_loss(z, groups, listwise_weight=1.0)


def test_matryoshka_loss_is_the_sum_over_the_prefixes():
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(16))
    t = torch.randn(10, 12, generator=torch.Generator().manual_seed(17))
    kw = dict(eps2=0.5, gamma=1.0, teacher_MD=t, distill_weight=2.0, listwise_weight=1.0, temperature=0.1,
              mcr2_weight=0.3)
    out = matryoshka_mcr2_loss(z, 2, [2, 4, 8], **kw)
    parts = [mcr2_loss(z[:, :k], 2, **kw) for k in (2, 4, 8)]
    for field in ("loss", "rate", "rate_c", "distill", "listwise"):
        assert getattr(out, field).item() == pytest.approx(sum(getattr(p, field).item() for p in parts), rel=1e-6)
    want = sum(0.3 * (-direct_rate(F.normalize(z[:, :k].double(), dim=-1), 0.5)
                      + direct_rate_c(F.normalize(z[:, :k].double(), dim=-1), torch.arange(10) // 2, 0.5))
               + 2.0 * direct_distill(z[:, :k].double(), t.double()) + direct_listwise(z[:, :k].double(), t.double(),
                                                                                    0.1, 0.1)
               for k in (2, 4, 8))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert matryoshka_mcr2_loss(z, 2, [8], **kw).loss.item() == pytest.approx(parts[-1].loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"lie in \[1, 8\]"):
        matryoshka_mcr2_loss(z, 2, [4, 16], **kw)


def test_matryoshka_loss_with_group_ids_sorts_them_once(monkeypatch):
    """Group ids (k-means clusters, labels) are sorted with one host sync per step, not one per prefix, and give
    the same loss as each prefix grouped on its own."""
    from lightning_modules.losses import mcr2 as losses

    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(18))
    groups = torch.tensor([3, 0, 3, 1, 0, 0, 1, 3, 1, 1, 0, 1])  # groups of 3, 4 and 5 rows
    parts = [mcr2_loss(z[:, :k], groups, eps2=0.5) for k in (2, 4, 8)]
    calls = []
    real = losses.group_layout
    monkeypatch.setattr(losses, "group_layout", lambda g, *a: calls.append(1) or real(g, *a))
    out = matryoshka_mcr2_loss(z, groups, [2, 4, 8], eps2=0.5)
    assert len(calls) == 1
    assert out.rate_c.item() == pytest.approx(sum(p.rate_c.item() for p in parts), rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(p.loss.item() for p in parts), rel=1e-6)
    assert out.smallest_group.item() == 3
    with pytest.raises(ValueError, match="one group id per row"):
        matryoshka_mcr2_loss(z, groups[:5], [2, 4])


def test_float32_logdet_under_bf16_autocast():
    z = unit_rows(16, 8, seed=10)
    groups = torch.arange(16) % 4
    ref = mcr2_loss(z, groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mcr2_loss(z.bfloat16(), groups)
    assert out.loss.dtype == torch.float32
    # only the bf16 rounding of the input remains (~3 significant digits)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)


def test_failed_cholesky_gives_nan_not_a_wrong_number():
    z = unit_rows(1, 4).expand(6, 4)  # identical rows: Z Z^T has rank 1
    assert torch.isnan(logdet_identity_plus_gram(z, 1e12))  # I + 1e12 * rank-1 is not PD in float32
    assert torch.isfinite(logdet_identity_plus_gram(z, 1.0))


# --------------------------------------------------------------------------------------------------- the head
def test_projection_head_shapes_pca_and_dense_layers():
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(11))
    head = ProjectionHead(12, 3)
    explained = head.init_pca(x)
    xn = F.normalize(x, dim=-1)
    centered = xn - xn.mean(0)
    u, s, vh = torch.linalg.svd(centered, full_matrices=False)
    torch.testing.assert_close(head(x).abs(), (centered @ vh[:3].T).abs(), atol=1e-5, rtol=1e-4)
    assert explained.item() == pytest.approx((s[:3] ** 2).sum().item() / (s ** 2).sum().item(), rel=1e-5)
    assert [type(a).__name__ for _, a in head.dense_layers()] == ["Identity"]
    mlp = ProjectionHead(12, 3, hidden_dim=8, activation="relu")
    assert [(lin.in_features, lin.out_features, type(a).__name__) for lin, a in mlp.dense_layers()] == [
        (12, 8, "ReLU"), (8, 3, "Identity")]
    with pytest.raises(ValueError, match="linear head"):
        mlp.init_pca(x)
    with pytest.raises(ValueError, match="expects 12-d"):
        head(torch.randn(2, 7))


def test_truncation_init_is_exactly_the_truncation_baseline():
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(18))
    head = ProjectionHead(12, 5)
    head.init_truncation()
    assert torch.equal(head(x), F.normalize(x, dim=-1)[:, :5])
    raw = ProjectionHead(12, 5, normalize_input=False)
    raw.init_truncation()
    assert torch.equal(raw(x), x[:, :5])
    with pytest.raises(ValueError, match="linear head"):
        ProjectionHead(12, 5, hidden_dim=8).init_truncation()
    with pytest.raises(ValueError, match="at most in_dim = 12"):
        ProjectionHead(12, 13).init_truncation()


# ------------------------------------------------------------------------------------------- data and module
SENTENCES = [f"{a} {v} {o} {p} ." for a in ("a man", "the dog", "a lady", "two students")
             for v in ("is playing", "reads", "carries", "is cleaning")
             for o in ("a guitar", "the car", "some pasta") for p in ("in the park", "at school")]


@pytest.fixture(scope="module")
def group_files(tmp_path_factory) -> Path:
    """sentences.txt (96 lines), pairs.csv (48 rows: sent0, sent1, label)."""
    out = tmp_path_factory.mktemp("mcr2_data")
    (out / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    with (out / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "sent1", "label"])
        for i in range(0, len(SENTENCES), 2):
            w.writerow([SENTENCES[i], SENTENCES[i + 1], SENTENCES[i].split()[1]])
    return out


def datamodule(files: Path, grouping: str, batch_size: int = 16, **kw) -> GroupedTextDataModule:
    if grouping == "kmeans":
        return GroupedTextDataModule(str(files / "sentences.txt"), batch_size=batch_size, **kw)
    if grouping == "pairs":
        return GroupedTextDataModule(str(files / "pairs.csv"), columns=["sent0", "sent1"], batch_size=batch_size,
                                     **kw)
    return GroupedTextDataModule(str(files / "pairs.csv"), columns=["sent0"], label_column="label",
                                 batch_size=batch_size, **kw)


def trainer(steps: int = 3, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_datamodule_batches_carry_index_group_and_whole_pairs(tiny_model, group_files):
    module = MCR2Module(tiny_model, out_dim=4, max_length=16)
    dm = datamodule(group_files, "labels", shuffle=False, batch_size=5)
    dm.connect(module.tokenizer, 16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[:2] == (5, 1)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    names = [SENTENCES[2 * i].split()[1] for i in range(5)]
    assert [dm.label_names[g] for g in batch["group"].tolist()] == names
    pairs = datamodule(group_files, "pairs", shuffle=False, batch_size=4)
    pairs.connect(module.tokenizer, 16)
    assert next(iter(pairs.train_dataloader()))["input_ids"].shape[:2] == (4, 2)
    assert len(pairs.sentence_ids()) == len(SENTENCES)
    assert pairs.sentence_ids()[3] == module.encoder.tokenize([SENTENCES[3]])[0]  # row 1, view 1 -> 1 * 2 + 1


@pytest.mark.parametrize("grouping", ["pairs", "kmeans", "labels"])
def test_fit_trains_only_the_head_and_keeps_the_teacher_frozen(tiny_model, group_files, grouping):
    module = MCR2Module(tiny_model, out_dim=6, grouping=grouping, num_clusters=4, distill_weight=1.0,
                        listwise_weight=0.5, lr=1e-2, max_length=16)
    teacher_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["teacher_training"] = pl_module.encoder.training or pl_module.encoder.model.training
            seen["head_training"] = pl_module.head.training
            seen["params"] = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]

    trainer(callbacks=[Probe()]).fit(module, datamodule(group_files, grouping))
    assert seen["teacher_training"] is False and seen["head_training"] is True
    assert {id(p) for p in seen["params"]} == {id(p) for p in module.head.parameters()}
    assert not any(p.requires_grad for p in module.encoder.parameters())
    for k, v in module.encoder.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert any(not torch.equal(v, head_before[k]) for k, v in module.head.state_dict().items())
    if grouping == "kmeans":
        assert module._clusters_N.shape == (len(SENTENCES),) and module._clusters_N.unique().numel() == 4


def test_cached_teacher_equals_running_the_teacher(tiny_model, group_files, tmp_path, umask_022):
    cache = tmp_path / "teacher.safetensors"
    cached = MCR2Module(tiny_model, out_dim=5, lr=1e-2, max_length=16, cache_path=str(cache))
    live = MCR2Module(tiny_model, out_dim=5, lr=1e-2, max_length=16, cache_teacher=False)
    live.head.load_state_dict(cached.head.state_dict())
    trainer(steps=2).fit(cached, datamodule(group_files, "pairs", shuffle=False))
    trainer(steps=2).fit(live, datamodule(group_files, "pairs", shuffle=False))
    assert live._cache_ND is None and cached._cache_ND.shape == (len(SENTENCES), 32)
    for k, v in cached.head.state_dict().items():
        torch.testing.assert_close(v, live.head.state_dict()[k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached._cache_ND, cached.encoder.encode(SENTENCES))
    assert cache.stat().st_mode & 0o777 == 0o644  # as the umask allows, though save_file makes it 0600
    # the file is reused for the same sentences; other sentences rewrite it
    stamp = cache.stat().st_mtime_ns
    again = MCR2Module(tiny_model, out_dim=5, max_length=16, cache_path=str(cache))
    trainer(steps=1).fit(again, datamodule(group_files, "pairs"))
    assert cache.stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning, match="recomputing"):
        trainer(steps=1).fit(MCR2Module(tiny_model, out_dim=5, max_length=16, cache_path=str(cache)),
                             datamodule(group_files, "pairs", max_rows=20))
    assert cache.stat().st_mtime_ns != stamp


def test_pca_init_starts_at_the_pca_of_the_training_sentences(tiny_model, group_files):
    module = MCR2Module(tiny_model, out_dim=4, grouping="kmeans", num_clusters=3, init="pca", lr=0.0, max_length=16)
    trainer(steps=1).fit(module, datamodule(group_files, "kmeans"))
    ref = ProjectionHead(32, 4)
    ref.init_pca(module.encoder.encode(SENTENCES))
    torch.testing.assert_close(module.head.layers[0].weight.abs(), ref.layers[0].weight.abs(), atol=1e-4, rtol=1e-3)


def test_truncation_init_starts_at_the_truncated_teacher_without_listing_sentences(tiny_model, group_files):
    # mcr2_weight 0: no k-means clustering, so with cache_teacher off nothing needs the sentences up front
    module = MCR2Module(tiny_model, out_dim=4, grouping="kmeans", init="truncation", mcr2_weight=0.0,
                        listwise_weight=1.0, cache_teacher=False, lr=0.0, max_length=16)
    trainer(steps=1).fit(module, datamodule(group_files, "kmeans"))
    assert module._cache_ND is None and module._clusters_N is None
    teacher = module.encoder.encode(SENTENCES[:6])
    torch.testing.assert_close(module.encode(SENTENCES[:6]), F.normalize(teacher, dim=-1)[:, :4], atol=0, rtol=0)


def sts_of(z1, z2, scores, dims):
    return sum(spearman100(F.cosine_similarity(z1[:, :k], z2[:, :k]), scores) for k in dims) / len(dims)


@pytest.mark.parametrize("dims", [None, [2, 4]])
def test_best_init_keeps_the_candidate_scoring_higher_on_dev(tiny_model, group_files, sample_data, dims):
    dev = str(sample_data / "sts_dev.tsv")
    module = MCR2Module(tiny_model, out_dim=4, grouping="kmeans", num_clusters=3, init="best", init_dev=dev,
                        matryoshka_dims=dims, lr=0.0, max_length=16)
    trainer(steps=1).fit(module, datamodule(group_files, "kmeans"))
    pairs = load_sts(dev)
    t1, t2 = module.encoder.encode(pairs.sentences1), module.encoder.encode(pairs.sentences2)
    pca = ProjectionHead(32, 4)
    pca.init_pca(module.encoder.encode(SENTENCES))
    with torch.no_grad():
        want = {"truncation": sts_of(F.normalize(t1, dim=-1), F.normalize(t2, dim=-1), pairs.scores, dims or [4]),
                "pca": sts_of(pca(t1), pca(t2), pairs.scores, dims or [4])}
    assert module.init_scores == pytest.approx(want, abs=1e-3)
    assert abs(want["truncation"] - want["pca"]) > 0.1  # the choice below is not a tie
    weight = module.head.layers[0].weight
    if want["truncation"] > want["pca"]:
        torch.testing.assert_close(weight, torch.eye(4, 32), atol=0, rtol=0)
    else:
        torch.testing.assert_close(weight.abs(), pca.layers[0].weight.abs(), atol=1e-4, rtol=1e-3)


def test_best_init_names_an_unreadable_dev_set(tiny_model, group_files):
    module = MCR2Module(tiny_model, out_dim=4, grouping="kmeans", num_clusters=3, init="best",
                        init_dev="missing_dev.tsv", max_length=16)
    with pytest.raises(ValueError, match="model.init_dev 'missing_dev.tsv'.*not found"):
        trainer(steps=1).fit(module, datamodule(group_files, "kmeans"))


def test_matryoshka_listwise_step_is_the_loss_summed_over_the_prefixes(tiny_model, group_files):
    # grouping 'pairs' on one-sentence rows would be an error, but without the MCR2 term the groups are not read
    module = MCR2Module(tiny_model, out_dim=6, grouping="pairs", matryoshka_dims=[2, 4, 6], mcr2_weight=0.0,
                        listwise_weight=1.0, listwise_temperature=0.1, lr=1e-2, max_length=16)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                t = pl_module.teacher_embeddings(batch)
                z = pl_module.head(t)
                seen.setdefault("want", []).append(sum(direct_listwise(z[:, :k].double(), t.double(), 0.1, 0.1)
                                                       for k in (2, 4, 6)).item())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("got", []).append(outputs["loss"].item())

    trainer(steps=2, callbacks=[Probe()]).fit(module, datamodule(group_files, "kmeans"))
    assert len(seen["got"]) == 2
    assert seen["got"] == pytest.approx(seen["want"], rel=1e-4)
    assert seen["want"][1] != pytest.approx(seen["want"][0])  # the head moved


def test_encode_and_validation_use_the_compressed_embedding(tiny_model, group_files, sample_data):
    module = MCR2Module(tiny_model, out_dim=3, max_length=16)
    z = module.encode(SENTENCES[:5])
    assert z.shape == (5, 3)
    torch.testing.assert_close(z, module.head(module.encoder.encode(SENTENCES[:5])))
    dm = STSDataModule([str(sample_data / "sts_dev.tsv")])
    metrics = trainer().validate(module, dm, verbose=False)[0]
    pairs = load_sts(str(sample_data / "sts_dev.tsv"))
    cos = F.cosine_similarity(module.encode(pairs.sentences1), module.encode(pairs.sentences2))
    from torchmetrics.functional import spearman_corrcoef

    want = spearman_corrcoef(cos, torch.tensor(pairs.scores)).item() * 100
    assert metrics["val/sts_dev_spearman"] == pytest.approx(want, abs=1e-3)
    from callbacks import STSEvaluator

    cb = STSEvaluator(str(sample_data / "sts_dev.tsv"))
    cb.setup(None, module, "validate")
    assert cb.evaluate(module) == pytest.approx(want, abs=1e-3)


def test_repeated_evaluation_runs_the_frozen_teacher_once(tiny_model):
    module = MCR2Module(tiny_model, out_dim=3, max_length=16)
    calls = []
    real = module.encoder.encode_ids
    module.encoder.encode_ids = lambda ids, batch_size=128: calls.append(len(ids)) or real(ids, batch_size)
    ids = module.encoder.tokenize(SENTENCES[:6])
    first = module.encode_ids(ids)
    with torch.no_grad():
        module.head.layers[0].weight.mul_(2)  # the head changes between evaluations; the teacher does not
    second = module.encode_ids(ids)
    assert calls == [6]
    torch.testing.assert_close(second, module.head(real(ids)))
    assert not torch.allclose(first, second)
    for i in range(MCR2Module.MEMO_SIZE):  # older id lists are dropped
        module.encode_ids(ids[: i + 1])
    module.encode_ids(ids)
    assert calls == [6, 1, 2, 3, 4, 6]


@pytest.mark.parametrize("hidden_dim", [None, 16])
def test_export_encodes_like_the_module(tiny_model, tmp_path, hidden_dim):
    from sentence_transformers import SentenceTransformer

    module = MCR2Module(tiny_model, out_dim=5, hidden_dim=hidden_dim, max_length=16)
    with torch.no_grad():
        for p in module.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = export_sentence_transformer(module, tmp_path / "st")
    names = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    dense = ["Dense"] if hidden_dim is None else ["Dense", "Dense"]
    assert names == ["Transformer", "Pooling", "Normalize", *dense, "Normalize"]
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(SENTENCES, convert_to_tensor=True, batch_size=7)
    assert got.shape == (len(SENTENCES), 5)
    torch.testing.assert_close(got, F.normalize(module.encode(SENTENCES), dim=-1), atol=1e-5, rtol=1e-4)
    assert not module.encoder.training  # the teacher stays in eval mode


def perturbed_matryoshka_head(tiny_model: str) -> MCR2Module:
    """A 6-d Matryoshka head (prefixes 2 / 4 / 6) moved off its initialisation, so its prefixes score differently."""
    module = MCR2Module(tiny_model, out_dim=6, matryoshka_dims=[2, 4, 6], mcr2_weight=0.0, listwise_weight=1.0,
                        max_length=16)
    with torch.no_grad():
        for p in module.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def test_sts_evaluator_scores_a_matryoshka_head_by_the_mean_over_its_prefixes(tiny_model, sample_data):
    from callbacks import STSEvaluator

    module = perturbed_matryoshka_head(tiny_model)
    dev = str(sample_data / "sts_dev.tsv")
    cb = STSEvaluator(dev)
    cb.setup(None, module, "validate")
    pairs = load_sts(dev)
    z1, z2 = module.encode(pairs.sentences1), module.encode(pairs.sentences2)
    per_prefix = [sts_of(z1, z2, pairs.scores, [k]) for k in (2, 4, 6)]
    assert cb.evaluate(module) == pytest.approx(sum(per_prefix) / 3, abs=1e-3)
    assert max(per_prefix) - min(per_prefix) > 0.1  # the mean is not the full width's score


def test_matryoshka_export_truncates_to_the_module_prefix(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    module = perturbed_matryoshka_head(tiny_model)
    out = export_sentence_transformer(module, tmp_path / "st")
    z = module.encode(SENTENCES)
    for k in (2, 4, 6):
        st = SentenceTransformer(str(out), device="cpu", truncate_dim=k)
        prefix = F.normalize(z[:, :k], dim=-1)  # the module's own k-d embedding
        # sentence-transformers truncates after the model's final Normalize: unit vectors only with
        # normalize_embeddings=True, and the raw prefixes compare by cosine (the model's similarity function)
        normed = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
        torch.testing.assert_close(normed, prefix, atol=1e-5, rtol=1e-4)
        raw = st.encode(SENTENCES, convert_to_tensor=True)
        assert raw.shape == (len(SENTENCES), k)
        torch.testing.assert_close(raw, F.normalize(z, dim=-1)[:, :k], atol=1e-5, rtol=1e-4)
        assert st.similarity_fn_name == "cosine"
        torch.testing.assert_close(st.similarity(raw, raw), prefix @ prefix.T, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip(tiny_model, group_files, tmp_path):
    module = MCR2Module(tiny_model, out_dim=4, lr=1e-2, max_length=16)
    t = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path,
                   enable_progress_bar=False, enable_model_summary=False)
    t.fit(module, datamodule(group_files, "pairs"))
    # a plain-Trainer checkpoint (no LightningCLI) still names its class: load_module rebuilds an MCR2Module
    ckpt = t.checkpoint_callback.best_model_path
    from lightning_modules.export import load_module

    loaded = load_module(ckpt)
    assert type(loaded) is MCR2Module
    assert isinstance(loaded, MCR2Module)
    torch.testing.assert_close(loaded.encode(SENTENCES[:4]), module.encode(SENTENCES[:4]))
    # resuming keeps the trained head: the PCA initialisation applies to fresh runs only
    resumed = MCR2Module(tiny_model, out_dim=4, lr=0.0, max_length=16, init="pca")
    pl.Trainer(accelerator="cpu", max_steps=3, logger=False, default_root_dir=tmp_path / "resume",
               enable_progress_bar=False, enable_model_summary=False).fit(resumed, datamodule(group_files, "pairs"),
                                                                          ckpt_path=ckpt)
    for k, v in module.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[k], v)


# ------------------------------------------------------------------------------------------------- bad input
def test_teacher_head_dimension_mismatch_is_a_config_error(tiny_model):
    with pytest.raises(ValueError, match=r"configuration error: model.in_dim is 384 .* gives 32-d"):
        MCR2Module(tiny_model, in_dim=384, max_length=16)
    MCR2Module(tiny_model, in_dim=32, max_length=16)  # matching is fine


@pytest.mark.parametrize("kwargs,match", [({"eps2": 0.0}, "eps2"), ({"grouping": "clusters"}, "grouping"),
                                          ({"init": "pca", "hidden_dim": 8}, "linear head"),
                                          ({"init": "pca", "out_dim": 64}, "at most 32 dims"),
                                          ({"init": "svd"}, "model.init must be one of"),
                                          ({"init": "truncation", "hidden_dim": 8}, "linear head"),
                                          ({"init": "best", "out_dim": 64}, "model.init 'best' gives at most 32"),
                                          ({"mcr2_weight": -1.0}, "model.mcr2_weight must be >= 0"),
                                          ({"listwise_weight": -0.5}, "model.listwise_weight must be >= 0"),
                                          ({"mcr2_weight": 0.0}, "are all 0"),
                                          ({"listwise_weight": 1.0, "listwise_temperature": 0.0},
                                           "model.listwise_temperature must be > 0"),
                                          ({"out_dim": 8, "matryoshka_dims": [4, 2, 8]}, "model.matryoshka_dims"),
                                          ({"out_dim": 8, "matryoshka_dims": [2, 4]}, "ending at model.out_dim"),
                                          ({"out_dim": 8, "matryoshka_dims": [0, 8]}, "model.matryoshka_dims"),
                                          ({"check_finite_every_n_steps": 0}, "check_finite")])
def test_bad_options_are_named(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCR2Module(tiny_model, **kwargs, max_length=16)


def test_extra_sources_append_unlabelled_sentences_once(group_files, tmp_path):
    (tmp_path / "more.txt").write_text(f"a new sentence .\n{SENTENCES[0]}\n")
    stsb = tmp_path / "root" / "stsb"
    stsb.mkdir(parents=True)
    (stsb / "sts-train.csv").write_text(f"g\tf\t2012\t1\t4.0\t{SENTENCES[1]}\tan sts sentence .\n")
    dm = GroupedTextDataModule(str(group_files / "sentences.txt"), data_root=str(tmp_path / "root"),
                               extra_sources=[str(tmp_path / "more.txt"), f"{group_files / 'pairs.csv'}:sent0,sent1",
                                              "stsb:train"])
    assert dm.load_rows() == [(s,) for s in SENTENCES + ["a new sentence .", "an sts sentence ."]]
    assert read_extra_sentences("stsb", str(tmp_path / "root")) == [SENTENCES[1], "an sts sentence ."]
    for spec, match in (("stsb:test", "only an STS train split"), ("sickr:dev", "only an STS train split"),
                        ("sts12:test", "only a test split"), (f"{group_files / 'pairs.csv'}:", "no column names")):
        with pytest.raises(DataError, match=match):
            read_extra_sentences(spec, str(tmp_path / "root"))
    with pytest.raises(DataError, match="data.extra_sources adds single sentences"):
        GroupedTextDataModule(str(group_files / "pairs.csv"), columns=["sent0", "sent1"], extra_sources=["x.txt"])


def test_pairs_grouping_on_single_sentences_is_named(tiny_model, group_files):
    with pytest.raises(ValueError, match="data.columns"):
        trainer().fit(MCR2Module(tiny_model, grouping="pairs", max_length=16), datamodule(group_files, "kmeans"))
    with pytest.raises(ValueError, match="data.label_column"):
        trainer().fit(MCR2Module(tiny_model, grouping="labels", max_length=16), datamodule(group_files, "kmeans"))


def test_nan_teacher_embedding_names_the_batch_and_the_cause(tiny_model, group_files):
    module = MCR2Module(tiny_model, out_dim=4, max_length=16, check_finite_every_n_steps=5)
    real = module.teacher_embeddings

    def poisoned(batch):
        t = real(batch)
        return t.index_fill(0, torch.tensor([0]), float("nan")) if module.global_step == 2 else t

    module.teacher_embeddings = poisoned
    with pytest.raises(DivergenceError, match=r"at step 2: the training loss is nan.*at batch 2 of epoch 0.*teacher"):
        trainer(steps=8).fit(module, datamodule(group_files, "pairs"))
    assert module.global_step < 8  # stopped at the next check (step 5), not at the end


def labelled_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "label"])
        w.writerows(rows)
    return path


def test_tiny_eps_on_repeated_sentences_is_caught_with_its_likely_cause(tiny_model, tmp_path):
    # a group holding the same sentence twice: I + c Z_j^T Z_j is singular in float32 once c is huge (1e10 was not
    # enough on every CPU: some LAPACK builds still factorised it; 1e20 swamps the identity entirely)
    rows = [(SENTENCES[i // 2], str(i // 2)) for i in range(16)]
    data = GroupedTextDataModule(str(labelled_csv(tmp_path / "dup.csv", rows)), columns=["sent0"],
                                 label_column="label", batch_size=8, shuffle=False)
    module = MCR2Module(tiny_model, out_dim=4, max_length=16, grouping="labels", eps2=1e-20,
                        check_finite_every_n_steps=1)
    with pytest.raises(DivergenceError, match=r"at batch 0 .*smallest group 2 .*eps2 = 1e-20 may be too small"):
        trainer().fit(module, data)
    assert module.global_step == 0  # n = 1: stopped before the update


def test_groups_of_one_sample_are_named_as_a_cause(tiny_model, tmp_path):
    rows = [(s, str(i)) for i, s in enumerate(SENTENCES[:16])]  # every sentence its own group
    data = GroupedTextDataModule(str(labelled_csv(tmp_path / "single.csv", rows)), columns=["sent0"],
                                 label_column="label", batch_size=8)
    module = MCR2Module(tiny_model, out_dim=4, max_length=16, grouping="labels", eps2=1e-38,
                        check_finite_every_n_steps=1)  # d / (1 * eps2) overflows float32
    with pytest.raises(DivergenceError, match=r"smallest group 1 sample.*groups of one sample"):
        trainer().fit(module, data)


# ----------------------------------------------------------------------------------------------------- configs
CONFIGS = sorted((ROOT / "configs").glob("mcr2_minilm_*.yaml"))


def test_there_are_mcr2_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_two_steps_on_a_tiny_model(config, tiny_model, group_files, sample_data, tmp_path):
    import yaml

    import train

    cfg = yaml.safe_load(config.read_text())
    init = cfg["model"]["init_args"]
    data = cfg["data"]["init_args"]
    grouping = init.get("grouping", "pairs")
    small = datamodule(group_files, grouping)
    overrides = ["--model.model_name_or_path", tiny_model, "--model.max_length", "16",
                 "--model.cache_path", "null", "--model.num_clusters", "3", "--model.out_dim", "8",
                 "--data.source", small.source, "--data.columns", json.dumps(small.columns),
                 "--data.label_column", json.dumps(small.label_column), "--data.batch_size", "16",
                 "--data.data_root", "null", "--data.max_rows", "null"]
    if "in_dim" in init:
        overrides += ["--model.in_dim", "null"]
    if init.get("init") == "best":
        overrides += ["--model.init_dev", str(sample_data / "sts_dev.tsv")]
    if init.get("matryoshka_dims"):
        overrides += ["--model.matryoshka_dims", "[4, 8]"]
    if data.get("extra_sources"):
        overrides += ["--data.extra_sources", json.dumps([str(group_files / "sentences.txt")])]
    common = ["--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"]
    assert data["source"]
    cli = train.main(["fit", "--config", str(config), *overrides, *common])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model, MCR2Module) and cli.model.grouping == grouping
    if config.stem.endswith("quick"):  # the CLI's export finds MCR2Module through the checkpoint's _class_path
        from sentence_transformers import SentenceTransformer

        train.main(["export", "--ckpt_path", cli.trainer.checkpoint_callback.best_model_path,
                    "--output_dir", str(tmp_path / "st")])
        got = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(SENTENCES[:4], convert_to_tensor=True)
        torch.testing.assert_close(got, F.normalize(cli.model.encode(SENTENCES[:4]), dim=-1), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------- DDP
def ddp_step_main(argv: list[str]) -> None:
    """One optimiser step of an MCR2Module on N CPU processes; rank 0 saves the head's state after it."""
    import argparse

    ap = argparse.ArgumentParser()
    for name in ("--model_dir", "--data", "--out", "--grouping"):
        ap.add_argument(name, required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=4)
    args = ap.parse_args(argv)
    pl.seed_everything(0)
    # kmeans also covers what rank 0 computes and broadcasts at fit start: the clusters and the PCA init
    module = MCR2Module(args.model_dir, out_dim=4, max_length=16, grouping=args.grouping, distill_weight=2.0,
                        lr=0.1, num_clusters=3, init="pca" if args.grouping == "kmeans" else "random")
    kw = {"pairs": dict(columns=["sent0", "sent1"]), "kmeans": dict(columns=["sent0"]),
          "labels": dict(columns=["sent0"], label_column="label")}[args.grouping]
    dm = GroupedTextDataModule(args.data, batch_size=args.batch_size, shuffle=False, **kw)
    grads = {}

    class CaptureGrads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({f"grad.{n}": p.grad.detach().clone() for n, p in pl_module.head.named_parameters()})

    t = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                   max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[CaptureGrads()])
    t.fit(module, dm)
    if t.global_rank == 0:
        torch.save({**{k: v.detach().clone() for k, v in module.head.state_dict().items()}, **grads}, args.out)


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["pairs", "labels", "kmeans"])
def test_two_processes_equal_one_with_twice_the_batch(tiny_model_no_dropout, group_files, tmp_path, grouping):
    def run(devices, batch_size, out):
        cmd = [sys.executable, __file__, "--ddp_step", "--model_dir", tiny_model_no_dropout, "--data",
               str(group_files / "pairs.csv"), "--grouping", grouping, "--devices", str(devices),
               "--batch_size", str(batch_size), "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        return torch.load(out)

    one = run(1, 8, tmp_path / "one.pt")
    two = run(2, 4, tmp_path / "two.pt")
    assert set(one) == set(two) and "grad.layers.0.weight" in one
    # (gathering nothing instead gives a relative gradient error of 3.5e-2 here, 350x the tolerance)
    for k, v in one.items():  # gradients (before the step) and weights (after it), relative to their size
        scale = v.abs().max()
        assert scale > 0, k
        assert (two[k] - v).abs().max() <= 1e-4 * scale, k


# -------------------------------------------------------------------------------------------- real model, data
@pytest.mark.data
def test_minilm_head_on_real_nli_pairs_exports_faithfully(minilm, shared_data, tmp_path):
    from sentence_transformers import SentenceTransformer

    module = MCR2Module("sentence-transformers/all-MiniLM-L6-v2", out_dim=32, max_length=64, in_dim=384,
                        distill_weight=10.0, lr=1e-2)
    dm = GroupedTextDataModule("nli/snli_devtest_for_simcse.csv", columns=["sent0", "sent1"],
                               data_root=str(shared_data), batch_size=16, max_rows=48)
    trainer(steps=3).fit(module, dm)
    pairs = load_sts("stsb", "test", str(shared_data))
    sentences = pairs.sentences1[:8]
    st = SentenceTransformer(str(export_sentence_transformer(module, tmp_path / "st")), device="cpu")
    got = st.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(got, F.normalize(module.encode(sentences), dim=-1), atol=1e-5, rtol=1e-4)


if __name__ == "__main__" and "--ddp_step" in sys.argv:  # strategy="ddp" re-launches this script, same argv
    ddp_step_main([a for a in sys.argv[1:] if a != "--ddp_step"])


def test_masked_group_layout_equals_the_sorted_one_without_a_host_sync():
    """The accelerator's layout (each group's rows masked in blocks of all m rows) gives the sorted layout's loss and
    gradient, with groups absent from the batch (K = 6, ids 0, 2, 5 present), and reads nothing on the host."""
    from cli_probes import SyncCounter

    from lightning_modules.losses.mcr2 import group_layout

    groups = torch.tensor([5, 0, 5, 2, 0, 0, 2, 5, 2, 2, 0, 2])
    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for on_host in (True, False):
        z_ = z.clone().requires_grad_()
        found: list = []
        with SyncCounter(found):
            layout = group_layout(groups, num_groups=6, on_host=on_host)
            out = matryoshka_mcr2_loss(z_, layout, [4, 8], eps2=0.5)
        assert bool(found) == on_host, found  # the sorted layout reads the sizes once; the masked one never
        out.loss.backward()
        grads.append((out.loss.detach(), out.rate_c.detach(), out.smallest_group, z_.grad))
    (loss_s, rate_s, small_s, grad_s), (loss_m, rate_m, small_m, grad_m) = grads
    torch.testing.assert_close(loss_m, loss_s)
    torch.testing.assert_close(rate_m, rate_s)
    torch.testing.assert_close(grad_m, grad_s)
    assert small_m.item() == small_s.item() == 3  # the smallest group present, not an absent one's 0
    direct = sum(direct_rate_c(z[:, :k] / z[:, :k].norm(dim=-1, keepdim=True), groups, 0.5) for k in (4, 8))
    assert rate_m.item() == pytest.approx(float(direct), rel=1e-6)  # the log-determinants run in float32
    with pytest.raises(ValueError, match="num_groups"):
        group_layout(groups, on_host=False)
