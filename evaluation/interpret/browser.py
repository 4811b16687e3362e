"""A static feature browser (docs/methods.md 5d): ONE self-contained HTML file, opened from disk, no server or network.

Each feature is a row: id, label, purity, energy, firing count, pooling contribution / survival, seed stability,
POS profile, activation histogram (inline SVG) and top contexts with the activating token highlighted. A search box
filters rows by id (exact), label or activating word (substring, case-insensitive); clicking a column header sorts
(numbers descending first, nulls last). Rows are rendered a page (200) at a time, so 16k features stay responsive.

The data travel as JSON inside ``<script type="application/json">`` (``<``, ``>``, ``&`` escaped as ``\\u003c``
etc., so no token can close the tag) and every text reaches the page through ``textContent``, never ``innerHTML``.
"""

from __future__ import annotations

import html
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from evaluation.interpret.browser_page import CSS, JS

#: Keys every feature dict must have (produced by the interpretability report).
FEATURE_KEYS = ("id", "label", "purity", "energy", "fires", "pos_dist", "hist", "contexts", "contribution",
                "survival", "stability_cos")


def _clean(value):
    """JSON-safe copy: numpy / torch scalars and arrays to Python, non-finite floats to None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return str(value)


def validate_features(features: Sequence[Mapping]) -> list[dict]:
    """JSON-safe copies of ``features``, checked against the schema (see :func:`write_feature_browser`).

    Raises:
        ValueError: naming the feature (position and id) and what is wrong with it.
    """
    out = []
    for n, feature in enumerate(features):
        where = f"feature #{n} (id {feature.get('id') if isinstance(feature, Mapping) else '?'})"
        if not isinstance(feature, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(feature).__name__}")
        missing = [k for k in FEATURE_KEYS if k not in feature]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; expected {list(FEATURE_KEYS)}")
        f = _clean(feature)
        if not isinstance(f["id"], int):
            raise ValueError(f"{where}: id must be an int, got {feature['id']!r}")
        hist = f["hist"]
        if not isinstance(hist, dict) or len(hist.get("edges", [])) != len(hist.get("counts", [])) + 1:
            raise ValueError(f"{where}: hist must be {{'edges': [...], 'counts': [...]}} with one more edge than "
                             "counts")
        for c, ctx in enumerate(f["contexts"]):
            if not isinstance(ctx, dict) or not {"tokens", "index", "value"} <= set(ctx):
                raise ValueError(f"{where}: context {c} must be {{'tokens': [...], 'index': int, 'value': float}}")
            if not isinstance(ctx["index"], int) or not -1 <= ctx["index"] < len(ctx["tokens"]):
                raise ValueError(f"{where}: context {c} index {ctx['index']!r} is outside its "
                                 f"{len(ctx['tokens'])} tokens (-1: no token to highlight)")
        out.append(f)
    return out


def _script_json(payload: object) -> str:
    """JSON that is safe inside a ``<script>`` element (cannot close it or open a comment)."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def render_feature_browser(features: Sequence[Mapping], title: str = "SAE features",
                           summary: Mapping | None = None, density: Mapping | None = None) -> str:
    """The browser page as one HTML string (see :func:`write_feature_browser`)."""
    payload = {"title": str(title), "summary": _clean(dict(summary or {})), "features": validate_features(features),
               "density": _clean(dict(density)) if density else None}
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(str(title))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(str(title))}</h1><dl id=\"summary\"></dl></header>\n"
        "<div id=\"controls\"><input id=\"search\" type=\"search\" placeholder=\"Search label, word or id\" "
        "autocomplete=\"off\" aria-label=\"Search features\">\n"
        "<button id=\"prev\" type=\"button\">&larr; Prev</button><button id=\"next\" type=\"button\">Next "
        "&rarr;</button><span id=\"status\" aria-live=\"polite\"></span></div>\n"
        "<table id=\"features\"><thead><tr id=\"header\"></tr></thead><tbody id=\"rows\"></tbody></table>\n"
        f"<script type=\"application/json\" id=\"feature-data\">{_script_json(payload)}</script>\n"
        f"<script>{JS}</script>\n</body>\n</html>\n"
    )


def write_feature_browser(features: Sequence[Mapping], path: str | Path, title: str = "SAE features",
                          summary: Mapping | None = None, density: Mapping | None = None) -> Path:
    """Write the feature browser to ``path`` (parents created) and return the path.

    Args:
        features: one dict per feature: ``{"id": int, "label": str, "purity": float, "energy": float, "fires": int,
            "pos_dist": {tag: share}, "hist": {"edges": [float, ...], "counts": [int, ...]}, "contexts":
            [{"tokens": [str, ...], "index": int, "value": float}], "contribution": float | None, "survival":
            float | None, "stability_cos": float | None}``. ``index`` is the activating token (-1: none; the start
            of the context is shown); non-finite floats become None (shown as a dash); extra keys are carried but not
            shown.
        path: the ``.html`` file to write.
        title: page title and heading.
        summary: key/value pairs shown at the top (numbers, strings; other values are shown as JSON).
        density: ``{"edges": [...], "counts": [...]}``, the latents per decade of log10 firing frequency, drawn at
            the top beside the summary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_feature_browser(features, title, summary, density), encoding="utf-8")
    return path
