"""A study's report folder: every number in ``study.json``, the same tables in ``report.md`` and in ``report.html``
(one static page that opens from disk: figures embedded as SVG, links to each feature browser). Figures are drawn
by :mod:`evaluation.interpret.figures` (a PNG, which the markdown links, and an SVG beside it).

A report is a list of :class:`Section`; both files are written from it, so the markdown and the page never differ.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Cell = str | int | float | None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    """PNG files of the report folder (relative names), each with its SVG beside it."""
    links: list[tuple[str, str]] = field(default_factory=list)
    """``(label, relative path)``, e.g. a feature browser."""


def cell(v: Cell, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, None and NaN as an empty cell."""
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for t in s.text:
            out += [t, ""]
        for t in s.tables:
            out.append("| " + " | ".join(t.headers) + " |")
            out.append("|" + "---|" * len(t.headers))
            out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.rows]
            out.append("")
        out += [f"![{f}]({f})" for f in s.figures] + ([""] if s.figures else [])
        out += [f"- [{label}]({path})" for label, path in s.links] + ([""] if s.links else [])
    return "\n".join(out)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"""


def page(title: str, sections: Sequence[Section], folder: Path) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style>"
           f"</head><body><h1>{e(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        out += [f"<p>{e(t)}</p>" for t in s.text]
        for t in s.tables:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(cell(v))}</td>" for v in row) + "</tr>" for row in t.rows]
            out.append("</table>")
        for f in s.figures:
            svg = (folder / f).with_suffix(".svg")
            kind, raw = ("svg+xml", svg.read_bytes()) if svg.is_file() else ("png", (folder / f).read_bytes())
            out.append(f"<p><img alt='{e(f)}' src='data:image/{kind};base64,{base64.b64encode(raw).decode()}'></p>")
        if s.links:
            out.append("<ul>" + "".join(f"<li><a href='{e(p)}'>{e(label)}</a></li>" for label, p in s.links)
                       + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(folder: str | Path, title: str, sections: Sequence[Section], data: dict) -> dict[str, Path]:
    """Write ``study.json`` (``data``), ``report.md`` and ``report.html`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / "study.json", "markdown": folder / "report.md", "html": folder / "report.html"}
    files["json"].write_text(json.dumps(data, indent=1, default=str))
    files["markdown"].write_text(markdown(title, sections))
    files["html"].write_text(page(title, sections, folder), encoding="utf-8")
    return files


__all__ = ["Section", "Table", "cell", "markdown", "page", "write_report"]
