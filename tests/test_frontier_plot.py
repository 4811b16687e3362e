"""The frontier's scores against their formula, the Pareto front against a hand-made answer, and the PNG charts:
bytes that decode to the pixels drawn, markers where the data put them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_interpret import random_sae

from lightning_modules.interpret.frontier import pareto_front, score_sae
from lightning_modules.interpret.plot import (
    PALETTE,
    Frame,
    Series,
    bar_chart,
    line_chart,
    nice_ticks,
    read_png,
    write_png,
)


def test_score_sae_equals_its_formula():
    sae = random_sae(d=6, n=8)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).numpy() * 2
    got = score_sae(sae, x, chunk_rows=7)
    with torch.no_grad():
        codes = sae.encode(torch.as_tensor(x)).double().numpy()
        x_hat = codes @ sae.W_dec.double().numpy() + float(sae.input_scale) * sae.b_dec.double().numpy()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(fvu, rel=1e-6) and got["explained_variance"] == pytest.approx(1 - fvu)
    assert got["l0"] == pytest.approx((codes > 0).sum() / 50) and got["n"] == 50
    assert got["never_active"] == pytest.approx(((codes > 0).sum(0) == 0).mean())


def test_pareto_front():
    l0 = [5, 10, 10, 20, 40, 8]
    ev = [0.5, 0.7, 0.6, 0.65, 0.9, 0.5]
    # (10, 0.6) loses to (10, 0.7); (20, 0.65) to (10, 0.7); (8, 0.5) to (5, 0.5)
    np.testing.assert_array_equal(pareto_front(l0, ev), [True, True, False, False, True, False])


def test_png_round_trip_and_markers_where_the_data_are(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(write_png(tmp_path / "x.png", img)), img)
    s = [Series("a", [8, 32], [0.5, 0.8]), Series("b", [16], [0.6])]
    path = line_chart(tmp_path / "l.png", s, "T", "L0", "EV", log_x=True, y_range=(0.4, 0.9), width=600, height=400)
    pix = read_png(path)
    legend_w = max(len(x.label) * 6 - 1 for x in s) * 2 + 50
    width = legend_w + 600  # widened: the plot keeps its 600 pixels beside the legend
    assert pix.shape == (400, width, 3)
    frame = Frame(90, 60, width - legend_w - 20, 400 - 70, (8 / 1.3, 32 * 1.3), (0.4, 0.9), log_x=True)
    for i, series in enumerate(s):
        for x, y in zip(series.x, series.y):  # the marker's centre pixel has the series' colour
            assert tuple(pix[round(frame.py(y)), round(frame.px(x))]) == PALETTE[i]
    bars = read_png(bar_chart(tmp_path / "b.png", ["NOUN", "VERB"], {"x": [0.5, 0.2]}, "T", "share"))
    assert (bars == PALETTE[0]).all(-1).sum() > 1000
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    with pytest.raises(ValueError, match="nothing to plot"):
        line_chart(tmp_path / "e.png", [Series("a", [], [])], "empty", "x", "y")
