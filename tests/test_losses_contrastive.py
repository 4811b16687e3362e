import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses.contrastive import (
    Candidates,
    InBatchNegatives,
    Views,
    contrastive_logits,
    info_nce,
    matryoshka_info_nce,
)
from lightning_modules.losses.hard_negatives import HardNegativeMixing, PositiveMixing


def loop_simcse_loss(z1, z2, z3, tau, alpha=1.0):
    """SimCSE loss written row by row from docs/methods.md section 1."""
    n = z1.shape[0]
    total = 0.0
    for i in range(n):
        logits = [F.cosine_similarity(z1[i], z2[j], dim=0) / tau for j in range(n)]
        if z3 is not None:
            for j in range(n):
                s = F.cosine_similarity(z1[i], z3[j], dim=0) / tau
                logits.append(s + (math.log(alpha) if j == i else 0.0))
        logits = torch.stack(logits)
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / n


def test_info_nce_closed_form():
    # anchors and candidates on the unit circle: cos is exact, loss by hand
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    loss = info_nce(Candidates(a, c, torch.tensor([0, 1])), tau)
    # each row: logits [2, 0] with label at the 2 -> -log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_extra_candidates_and_bias_columns():
    a = torch.tensor([[1.0, 0.0]])
    shared = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    extra = torch.tensor([[[-1.0, 0.0], [1.0, 1.0]]])  # (B=1, S=2, D)
    bias = torch.tensor([[0.0, 0.0, 0.0, math.log(2.0)]])
    logits = contrastive_logits(Candidates(a, shared, torch.tensor([0]), extra, bias), 1.0)
    expected = torch.tensor([[1.0, 0.0, -1.0, 1 / math.sqrt(2) + math.log(2.0)]])
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("supervised,alpha", [(False, 1.0), (True, 1.0), (True, 3.0), (True, 0.25)])
def test_in_batch_negatives_matches_loop(supervised, alpha):
    g = torch.Generator().manual_seed(0)
    z1, z2, z3 = (torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(3))
    views = Views(z1, z2, z3 if supervised else None, 0, 5)
    loss = info_nce(InBatchNegatives(alpha)(views, 0.05), 0.05)
    ref = loop_simcse_loss(z1, z2, z3 if supervised else None, 0.05, alpha)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, [z1, z2, z3] if supervised else [z1, z2])
    ref_grads = torch.autograd.grad(ref, [z1, z2, z3] if supervised else [z1, z2])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_local_rows_of_a_gathered_batch_average_to_the_global_loss():
    """What each DDP rank computes (its own anchors vs all candidates) averages to the single-process loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2, z3 = (torch.randn(6, 4, generator=g) for _ in range(3))
    builder = InBatchNegatives(2.0)
    full = info_nce(builder(Views(z1, z2, z3, 0, 6), 0.1), 0.1)
    halves = [info_nce(builder(Views(z1, z2, z3, off, 3), 0.1), 0.1) for off in (0, 3)]
    assert full.item() == pytest.approx(sum(h.item() for h in halves) / 2, rel=1e-6)


def test_hard_negative_weight_must_be_positive():
    with pytest.raises(ValueError, match="hard_negative_weight"):
        InBatchNegatives(0.0)


def loop_candidates_loss(c: Candidates, tau: float) -> torch.Tensor:
    """Cross-entropy over any candidates, row by row: shared columns, then the row's own extra ones, plus bias."""
    total = 0.0
    for i in range(c.anchors_BD.shape[0]):
        cols = list(c.shared_MD) + (list(c.extra_BSD[i]) if c.extra_BSD is not None else [])
        logits = torch.stack([F.cosine_similarity(c.anchors_BD[i], x, dim=0) / tau for x in cols])
        if c.bias_BC is not None:
            logits = logits + c.bias_BC[i]
        total = total - (logits[c.labels_B[i]] - torch.logsumexp(logits, 0))
    return total / c.anchors_BD.shape[0]


@pytest.mark.parametrize("supervised", [False, True])
def test_matryoshka_simcse_is_the_weighted_sum_of_the_loss_of_each_prefix(supervised):
    g = torch.Generator().manual_seed(2)
    z1, z2, z3 = (torch.randn(5, 8, generator=g, requires_grad=True) for _ in range(3))
    views = Views(z1, z2, z3 if supervised else None, 0, 5)
    dims, weights = [2, 4, 8], [0.5, 1.0, 2.0]
    loss = matryoshka_info_nce(InBatchNegatives(3.0)(views, 0.05), 0.05, dims, weights)
    ref = sum(w * loop_simcse_loss(z1[:, :k], z2[:, :k], z3[:, :k] if supervised else None, 0.05, 3.0)
              for k, w in zip(dims, weights))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(loss, [z1, z2]), torch.autograd.grad(ref, [z1, z2])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the prefixes matter: the whole embedding alone is another number; weights default to 1 each
    whole = info_nce(InBatchNegatives(3.0)(views, 0.05), 0.05)
    assert abs(loss.item() - 3.5 * whole.item()) > 1e-3
    assert matryoshka_info_nce(InBatchNegatives(3.0)(views, 0.05), 0.05, [8]).item() == pytest.approx(whole.item())


@pytest.mark.parametrize("builder", [PositiveMixing(margin=0.5, w1=0.7, w2=0.3), HardNegativeMixing(k=2, s=3)],
                         ids=["hncse_pm", "hncse_hnm"])
def test_matryoshka_hncse_scores_each_prefix_of_the_same_candidates(builder):
    """The candidates are built once from the whole embeddings (mixed positives, synthetic negatives); each prefix
    is scored on the first k dims of those same vectors."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(6, 8, generator=g) for _ in range(2))
    torch.manual_seed(0)  # HNM's draws
    c = builder(Views(z1, z2, None, 0, 6), 0.05)
    loss = matryoshka_info_nce(c, 0.05, [3, 8])
    prefix = lambda k: Candidates(c.anchors_BD[:, :k], c.shared_MD[:, :k], c.labels_B,  # noqa: E731
                                  None if c.extra_BSD is None else c.extra_BSD[:, :, :k], c.bias_BC)
    ref = loop_candidates_loss(prefix(3), 0.05) + loop_candidates_loss(prefix(8), 0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_matryoshka_dims_and_weights_are_checked():
    c = InBatchNegatives()(Views(torch.randn(3, 4), torch.randn(3, 4), None, 0, 3), 0.1)
    with pytest.raises(ValueError, match=r"must lie in \[1, 4\]"):
        matryoshka_info_nce(c, 0.1, [2, 8])
    with pytest.raises(ValueError, match="2 Matryoshka weights for 1 dims"):
        matryoshka_info_nce(c, 0.1, [2], [1.0, 1.0])
