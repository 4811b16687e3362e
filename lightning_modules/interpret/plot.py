"""Small PNG charts for the study reports, drawn with numpy and written with zlib: no plotting library.

The project declares no plotting dependency (matplotlib is not installed with it), and the reports need only line
charts (a metric against L0 or against the layer) and grouped bars (shares per model). Text is a 5x7 bitmap font
(upper case, digits, common punctuation; lower case is drawn upper case), scaled by whole pixels. Axes get "nice"
ticks (1, 2, 2.5 or 5 times a power of ten; powers of ten on a log axis).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: 5x7 glyphs, one per entry ``char:rows``: seven rows of five bits as hex bytes, top row first, the most significant
#: bit on the left ("sp" is the space).
_GLYPH_SPEC = """
    sp:00000000000000 0:0e11131519110e 1:040c040404040e 2:0e11010204081f 3:1f02040201110e 4:02060a121f0202
    5:1f101e0101110e 6:0608101e11110e 7:1f010204080808 8:0e11110e11110e 9:0e11110f01020c A:0e1111111f1111
    B:1e11111e11111e C:0e11101010110e D:1c12111111121c E:1f10101e10101f F:1f10101e101010 G:0e11101711110f
    H:1111111f111111 I:0e04040404040e J:0702020202120c K:11121418141211 L:1010101010101f M:111b1515111111
    N:11111915131111 O:0e11111111110e P:1e11111e101010 Q:0e11111115120d R:1e11111e141211 S:0f10100e01011e
    T:1f040404040404 U:1111111111110e V:11111111110a04 W:1111111515150a X:11110a040a1111 Y:1111110a040404
    Z:1f01020408101f .:00000000000c0c ,:000000000c0408 -:0000001f000000 +:0004041f040400 =:00001f001f0000
    (:02040808080402 ):08040202020408 /:00010204081000 ::000c0c000c0c00 %:18190204081303 _:0000000000001f
    ?:0e110102040004 <:02040810080402 >:08040201020408 [:0e08080808080e ]:0e02020202020e |:04040404040404
    *:0004150e150400 ':04040800000000 #:0a0a1f0a1f0a0a &:0c12140815120d
"""
GLYPHS: dict[str, tuple[int, ...]] = {
    (" " if key == "sp" else key): tuple(bytes.fromhex(rows))
    for key, rows in (entry.rsplit(":", 1) for entry in _GLYPH_SPEC.split())
}
#: Series colours (RGB), in order.
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BLACK = (0, 0, 0)


def write_png(path: str | Path, image_HW3: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image as a PNG (8-bit truecolour, no filtering, zlib level 6)."""
    img = np.ascontiguousarray(image_HW3, dtype=np.uint8)
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path


def read_png(path: str | Path) -> np.ndarray:
    """The (H, W, 3) pixels of a PNG written by :func:`write_png` (for tests)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    return rows[:, 1:].reshape(h, w, 3)


class Canvas:
    """An RGB image with the few drawing operations the charts need (pixel coordinates, y down)."""

    def __init__(self, width: int, height: int) -> None:
        self.img = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        h, w, _ = self.img.shape
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        self.img[max(ya, 0) : min(yb + 1, h), max(xa, 0) : min(xb + 1, w)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int], width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        r = (width - 1) / 2
        for t in np.linspace(0.0, 1.0, n + 1):
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            self.rect(x - r, y - r, x + r, y + r, color)

    def text(self, x: float, y: float, s: str, color: tuple[int, int, int] = BLACK, scale: int = 2,
             anchor: str = "left") -> None:
        """Draw ``s`` with its top at ``y``; ``anchor`` left / center / right at ``x``."""
        width = text_width(s, scale)
        x0 = x - (width / 2 if anchor == "center" else width if anchor == "right" else 0)
        for i, ch in enumerate(s.upper()):
            rows = GLYPHS.get(ch, GLYPHS["?"])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits >> (4 - c) & 1:
                        px, py = x0 + (i * 6 + c) * scale, y + r * scale
                        self.rect(px, py, px + scale - 1, py + scale - 1, color)


def text_width(s: str, scale: int = 2) -> int:
    return max(len(s) * 6 - 1, 0) * scale


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]


@dataclass
class Frame:
    """The plot area in pixels and the data ranges it maps."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_x: bool = False

    def px(self, x: float) -> float:
        lo, hi = self.x_range
        if self.log_x:
            x, lo, hi = math.log10(x), math.log10(lo), math.log10(hi)
        return self.left + (x - lo) / (hi - lo) * (self.right - self.left)

    def py(self, y: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (y - lo) / (hi - lo) * (self.bottom - self.top)


def _axes(canvas: Canvas, frame: Frame, title: str, xlabel: str, ylabel: str, x_ticks: list[tuple[float, str]],
          y_ticks: list[float], tick_scale: int = 2) -> None:
    canvas.text((frame.left + frame.right) / 2, 12, title, anchor="center")
    canvas.text(frame.left, frame.top - 22, ylabel, (80, 80, 80))
    for y in y_ticks:
        py = frame.py(y)
        canvas.line(frame.left, py, frame.right, py, (235, 235, 235))
        canvas.text(frame.left - 8, py - 7, fmt(y), anchor="right")
    for x, label in x_ticks:
        px = frame.px(x)
        canvas.line(px, frame.bottom, px, frame.bottom + 5, BLACK)
        canvas.text(px, frame.bottom + 10, label, scale=tick_scale, anchor="center")
    canvas.line(frame.left, frame.top, frame.left, frame.bottom, BLACK, 2)
    canvas.line(frame.left, frame.bottom, frame.right, frame.bottom, BLACK, 2)
    canvas.text((frame.left + frame.right) / 2, frame.bottom + 34, xlabel, anchor="center")


def _legend(canvas: Canvas, frame: Frame, labels: Sequence[str]) -> None:
    x = frame.right + 16
    for i, label in enumerate(labels):
        y = frame.top + 6 + 24 * i
        canvas.rect(x, y, x + 14, y + 12, PALETTE[i % len(PALETTE)])
        canvas.text(x + 22, y, label)


def _range(values: list[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


def line_chart(path: str | Path, series: Sequence[Series], title: str, xlabel: str, ylabel: str,
               log_x: bool = False, y_range: tuple[float, float] | None = None, width: int = 900,
               height: int = 520) -> Path:
    """Lines with square markers, one colour per series, a legend on the right (the image is widened for a long
    one). NaN points are skipped."""
    points = [(x, y) for s in series for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
    if not points:
        raise ValueError(f"{title}: nothing to plot")
    legend_w = max(text_width(s.label) for s in series) + 50
    width = max(width, legend_w + 600)  # a long legend widens the image, never narrows the plot
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if log_x:
        if min(xs) <= 0:
            raise ValueError(f"{title}: a log axis needs positive x")
        x_range = (min(xs) / 1.3, max(xs) * 1.3)
        x_ticks = [(v, fmt(v)) for v in sorted(set(xs))] if len(set(xs)) <= 8 else [  # the data's, or decades
            (10.0**e, fmt(10.0**e)) for e in range(math.floor(math.log10(x_range[0])),
                                                   math.ceil(math.log10(x_range[1])) + 1)
            if x_range[0] <= 10.0**e <= x_range[1]]
    else:
        x_range = _range(xs)
        x_ticks = [(v, fmt(v)) for v in nice_ticks(*x_range) if x_range[0] <= v <= x_range[1]]
    y_range = y_range or _range(ys)
    y_ticks = [v for v in nice_ticks(*y_range) if y_range[0] <= v <= y_range[1]]
    frame = Frame(90, 60, width - legend_w - 20, height - 70, x_range, y_range, log_x)
    canvas = Canvas(width, height)
    _axes(canvas, frame, title, xlabel, ylabel, sorted(set(x_ticks)), y_ticks)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = [(frame.px(x), frame.py(y)) for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            canvas.line(x0, y0, x1, y1, color, 2)
        for x, y in pts:
            canvas.rect(x - 4, y - 4, x + 4, y + 4, color)
    _legend(canvas, frame, [s.label for s in series])
    return write_png(path, canvas.img)


def bar_chart(path: str | Path, groups: Sequence[str], bars: dict[str, Sequence[float]], title: str, ylabel: str,
              y_range: tuple[float, float] | None = None, width: int = 900, height: int = 520) -> Path:
    """Grouped bars: for each group (x position), one bar per entry of ``bars`` (``{label: value per group}``)."""
    values = [v for vs in bars.values() for v in vs if math.isfinite(v)]
    if not values or not groups:
        raise ValueError(f"{title}: nothing to plot")
    legend_w = max(text_width(label) for label in bars) + 50
    widest = max(text_width(g) for g in groups) + 12  # group labels at scale 2, else 1 with a wider image
    tick_scale = 2 if widest * len(groups) <= width - legend_w - 110 else 1
    width = max(width, legend_w + 600, legend_w + 110 + len(groups) * (text_width(max(groups, key=len), 1) + 12))
    y_range = y_range or (min(0.0, min(values)), max(values) * 1.1 or 1.0)
    y_ticks = [v for v in nice_ticks(*y_range) if y_range[0] <= v <= y_range[1]]
    frame = Frame(90, 60, width - legend_w - 20, height - 70, (0.0, float(len(groups))), y_range)
    canvas = Canvas(width, height)
    _axes(canvas, frame, title, "", ylabel, [(g + 0.5, label) for g, label in enumerate(groups)], y_ticks, tick_scale)
    n = len(bars)
    for b, (label, vs) in enumerate(bars.items()):
        for g, v in enumerate(vs):
            if not math.isfinite(v):
                continue
            x0 = frame.px(g + 0.1 + 0.8 * b / n)
            x1 = frame.px(g + 0.1 + 0.8 * (b + 1) / n) - 2
            canvas.rect(x0, frame.py(max(y_range[0], 0.0)), x1, frame.py(v), PALETTE[b % len(PALETTE)])
    _legend(canvas, frame, list(bars))
    return write_png(path, canvas.img)


__all__ = ["GLYPHS", "PALETTE", "Canvas", "Frame", "Series", "bar_chart", "line_chart", "nice_ticks", "read_png",
           "write_png"]
