"""The study figures (evaluation/interpret/figures.py): the data drawn are the data given, labels in normal
case, the legend outside the axes, PNG and SVG written, and a one-line error naming the extra without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[plots]'")

from core.errors import DataError  # noqa: E402
from evaluation.interpret.figures import Series, bar_figure, density_figure, line_chart, line_figure, require_matplotlib
from evaluation.interpret.study_report import Section, write_report  # noqa: E402


def test_a_line_figure_draws_its_series_with_the_legend_outside():
    s = [Series("F = 1536", [8, 32, 16], [0.5, 0.8, 0.6]), Series("recipe SAE", [20], [0.7]),
         Series("with a gap", [1, 2, 3], [0.1, float("nan"), 0.3])]
    fig = line_figure(s, "MiniLM layer 6: explained variance vs L0", "L0: active features", "Explained variance",
                      log_x=True, y_range=(0, 1))
    ax = fig.axes[0]
    assert ax.get_title() == "MiniLM layer 6: explained variance vs L0" and ax.get_xlabel() == "L0: active features"
    assert ax.get_xscale() == "log" and ax.get_ylim() == (0, 1)
    np.testing.assert_array_equal(ax.lines[0].get_xydata(), [[8, 0.5], [32, 0.8], [16, 0.6]])
    np.testing.assert_array_equal(ax.lines[2].get_xydata(), [[1, 0.1], [3, 0.3]])  # NaN left out
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["F = 1536", "recipe SAE", "with a gap"]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, not on the data
    ticks = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels()]
    assert {(1.0, "1"), (2.0, "2"), (5.0, "5"), (10.0, "10"), (20.0, "20")} <= set(ticks)
    with pytest.raises(ValueError, match="nothing to plot"):
        line_figure([Series("a", [], [])], "empty", "x", "y")


def test_bars_and_density():
    fig = bar_figure(["NOUN", "VERB", "ADJ"], {"a shared": [0.5, 0.2, 0.1], "a specific": [0.3, 0.4, 0.0]},
                     "Dominant POS", "Share of the group's features")
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.5, 0.2, 0.1, 0.3, 0.4, 0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NOUN", "VERB", "ADJ"]
    hist = {b: (b + 10) * 3 for b in range(-10, 0)}
    ax = density_figure(hist, "Feature density", num_latents=135).axes[0]
    assert [p.get_height() for p in ax.patches] == list(hist.values())
    assert [p.get_x() + p.get_width() / 2 for p in ax.patches] == [b + 0.5 for b in hist]
    assert ax.get_xticklabels()[0].get_text() == "never (-10)"


def test_files_and_the_report_page(tmp_path):
    path = line_chart(tmp_path / "f.png", [Series("a", [1, 2], [3, 4])], "T", "x", "y")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    files = write_report(tmp_path, "Study", [Section("S", figures=["f.png"])], {})
    assert "data:image/svg+xml;base64," in files["html"].read_text() and "![f.png](f.png)" in files[
        "markdown"].read_text()


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(DataError, match=r"matplotlib, which is not installed: pip install -e '\.\[plots\]'"):
        require_matplotlib()
