import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses.contrastive import Candidates, InBatchNegatives, Views, contrastive_logits, info_nce


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
