"""The frontier's scores against their formula, its density against a count, and the Pareto front against a
hand-made answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_interpret import random_sae

from evaluation.interpret.frontier import pareto_front, score_sae


def test_score_sae_equals_its_formula():
    sae = random_sae(d=6, n=8)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).numpy() * 2
    got = score_sae(sae, x, chunk_rows=7, density=True)
    with torch.no_grad():
        codes = sae.encode(torch.as_tensor(x)).double().numpy()
        x_hat = codes @ sae.W_dec.double().numpy() + float(sae.input_scale) * sae.b_dec.double().numpy()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(fvu, rel=1e-6) and got["explained_variance"] == pytest.approx(1 - fvu)
    assert got["l0"] == pytest.approx((codes > 0).sum() / 50) and got["n"] == 50
    assert got["never_active"] == pytest.approx(((codes > 0).sum(0) == 0).mean())
    decade = np.clip(np.floor(np.log10((codes > 0).mean(0) + 1e-10)), -10, -1)  # per latent, by hand
    assert got["log10_density_hist"] == {str(b): int((decade == b).sum()) for b in range(-10, 0)}


def test_pareto_front():
    l0 = [5, 10, 10, 20, 40, 8]
    ev = [0.5, 0.7, 0.6, 0.65, 0.9, 0.5]
    # (10, 0.6) loses to (10, 0.7); (20, 0.65) to (10, 0.7); (8, 0.5) to (5, 0.5)
    np.testing.assert_array_equal(pareto_front(l0, ev), [True, True, False, False, True, False])
