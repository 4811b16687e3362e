"""The study figures, drawn with matplotlib (the ``plots`` extra: ``pip install -e '.[plots]'``).

Each chart is built as a ``matplotlib.figure.Figure`` (no pyplot: no global figure state, safe in a library) by a
``*_figure`` function, then written by :func:`save_figure` as a PNG (the report's markdown and W&B's ``wandb.Image``)
and an SVG beside it (the HTML report embeds that). Legends sit outside the axes, on the right, so they never cover a
point; titles and axis labels are sentences in normal case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import DataError

INSTALL = "pip install -e '.[plots]'"


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]


def require_matplotlib() -> None:
    """A one-line DataError naming the extra when matplotlib is not installed (studies check before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DataError(f"the study figures are drawn with matplotlib, which is not installed: {INSTALL}") from None


def _figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (9.0, 5.2)):
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.92")
    ax.set_axisbelow(True)
    return fig, ax


def _legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) and the same name with ``.svg``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.savefig(path.with_suffix(".svg"), format="svg")
    return path


def line_figure(series: Sequence[Series], title: str, xlabel: str, ylabel: str, log_x: bool = False,
                y_range: tuple[float, float] | None = None):
    """Lines with markers, one colour per series (a one-point series is a marker); NaN points are left out. A log x
    axis is labelled 1, 2, 5, 10, 20, ... in plain numbers."""
    points = [(x, y) for s in series for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
    if not points:
        raise ValueError(f"{title}: nothing to plot")
    fig, ax = _figure(title, xlabel, ylabel)
    for s in series:
        xy = [(x, y) for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
        if xy:
            ax.plot(*zip(*xy), marker="o" if len(xy) > 1 else "D", markersize=5 if len(xy) > 1 else 8,
                    linewidth=1.8, label=s.label)
    if log_x:
        if min(p[0] for p in points) <= 0:
            raise ValueError(f"{title}: a log axis needs positive x")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ... in plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif all(float(p[0]).is_integer() for p in points):  # layers, deciles: whole-number ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y_range is not None:
        ax.set_ylim(*y_range)
    _legend_outside(ax)
    return fig


def bar_figure(groups: Sequence[str], bars: Mapping[str, Sequence[float]], title: str, ylabel: str,
               y_range: tuple[float, float] | None = None):
    """Grouped bars: for each group (x position), one bar per entry of ``bars`` (``{label: value per group}``)."""
    values = [v for vs in bars.values() for v in vs if math.isfinite(v)]
    if not values or not groups:
        raise ValueError(f"{title}: nothing to plot")
    fig, ax = _figure(title, "", ylabel, size=(max(9.0, 3.0 + 0.5 * len(groups)), 5.2))
    width = 0.8 / len(bars)
    for b, (label, vs) in enumerate(bars.items()):
        ax.bar([g - 0.4 + width * (b + 0.5) for g in range(len(groups))], [v if math.isfinite(v) else 0.0 for v in vs],
               width=width, label=label)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 8 else 0)
    ax.grid(False, axis="x")
    if y_range is not None:
        ax.set_ylim(*y_range)
    _legend_outside(ax)
    return fig


def density_figure(hist: Mapping[int, float], title: str, num_latents: int | None = None):
    """The feature-density histogram: latents per decade of log10 firing frequency (``{lower edge: count}``, as
    :func:`core.metrics.density_histogram`; the -10 bar is the latents that never fired)."""
    if not hist:
        raise ValueError(f"{title}: nothing to plot")
    fig, ax = _figure(title, "log10 firing frequency (share of the vectors a latent fires on)", "Latents")
    edges, counts = list(hist), [float(v) for v in hist.values()]
    colors = ["#b33" if e == min(edges) else "#4477aa" for e in edges]
    ax.bar([e + 0.5 for e in edges], counts, width=0.9, color=colors)
    ax.set_xticks(range(min(edges), max(edges) + 2))
    labels = [f"{e}" for e in range(min(edges), max(edges) + 2)]
    labels[0] = f"never ({min(edges)})"
    ax.set_xticklabels(labels)
    if num_latents:
        ax.set_ylim(0, max(max(counts) * 1.1, 1))
        ax.text(0.99, 0.97, f"{num_latents:,} latents", transform=ax.transAxes, ha="right", va="top", color="0.3")
    return fig


def line_chart(path: str | Path, series: Sequence[Series], title: str, xlabel: str, ylabel: str,
               log_x: bool = False, y_range: tuple[float, float] | None = None) -> Path:
    """:func:`line_figure` written to ``path`` (and its SVG)."""
    return save_figure(line_figure(series, title, xlabel, ylabel, log_x, y_range), path)


def bar_chart(path: str | Path, groups: Sequence[str], bars: Mapping[str, Sequence[float]], title: str, ylabel: str,
              y_range: tuple[float, float] | None = None) -> Path:
    """:func:`bar_figure` written to ``path`` (and its SVG)."""
    return save_figure(bar_figure(groups, bars, title, ylabel, y_range), path)


def density_chart(path: str | Path, hist: Mapping[int, float], title: str, num_latents: int | None = None) -> Path:
    """:func:`density_figure` written to ``path`` (and its SVG)."""
    return save_figure(density_figure(hist, title, num_latents), path)


__all__ = ["Series", "bar_chart", "bar_figure", "density_chart", "density_figure", "line_chart", "line_figure",
           "require_matplotlib", "save_figure"]
