"""The inline CSS and vanilla JavaScript of the feature browser (``browser.py``), kept as Python strings so that the
page needs no package data and no network. The script reads the JSON in ``#feature-data`` and builds every node
with ``createElement`` / ``textContent`` (no ``innerHTML``), a page of rows at a time."""

CSS = r"""
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --head: #f5f7fa; --mark: #ffd54f; --bar: #4f7bd9; }
* { box-sizing: border-box; }
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0; }
header { padding: 12px 16px 4px; }
h1 { font-size: 20px; margin: 0 0 8px; }
#summary { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 0; }
#summary div { display: flex; gap: 4px; }
#summary dt { color: var(--muted); }
#summary dd { margin: 0; font-weight: 600; }
#controls { display: flex; align-items: center; gap: 8px; padding: 8px 16px; position: sticky; top: 0;
  background: #fff; border-bottom: 1px solid var(--line); z-index: 2; }
#search { width: 320px; padding: 5px 8px; border: 1px solid #c8ccd4; border-radius: 4px; font: inherit; }
button { font: inherit; padding: 4px 10px; border: 1px solid #c8ccd4; background: #fff; border-radius: 4px;
  cursor: pointer; }
button:disabled { opacity: .4; cursor: default; }
#status { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; vertical-align: top; text-align: left; }
th { background: var(--head); position: sticky; top: 45px; z-index: 1; white-space: nowrap; user-select: none; }
th.sortable { cursor: pointer; }
th.sortable:hover { background: #e8edf5; }
th[aria-sort="ascending"]::after { content: " \25B2"; }
th[aria-sort="descending"]::after { content: " \25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.label { font-weight: 600; max-width: 180px; }
.pos { display: flex; width: 120px; height: 10px; border-radius: 2px; overflow: hidden; background: var(--line); }
.pos span { display: block; height: 100%; }
.pos-text { color: var(--muted); font-size: 11px; white-space: nowrap; }
svg.hist rect { fill: var(--bar); }
svg.hist text { font-size: 9px; fill: var(--muted); }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; margin: 1px 0;
  max-width: 640px; }
.ctx mark { background: var(--mark); padding: 0 2px; border-radius: 2px; font-weight: 700; }
.ctx .val { color: var(--muted); margin-left: 6px; }
details summary { color: var(--muted); cursor: pointer; font-size: 11px; }
"""

JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("feature-data").textContent);
  var FEATURES = DATA.features, PAGE = 200, WINDOW = 12, SHOWN = 3;
  var COLUMNS = [
    {key: "id", label: "ID", num: true}, {key: "label", label: "Label", num: false},
    {key: "purity", label: "Purity", num: true}, {key: "energy", label: "Energy", num: true},
    {key: "fires", label: "Fires", num: true}, {key: "contribution", label: "Contribution", num: true},
    {key: "survival", label: "Survival", num: true}, {key: "stability_cos", label: "Stability cos", num: true},
    {key: null, label: "POS"}, {key: null, label: "Activations"}, {key: null, label: "Top contexts"}
  ];
  var TAG_COLORS = {NOUN: "#4f7bd9", VERB: "#e0674f", ADJ: "#49a86b", ADV: "#b36bd1", ADP: "#d9a441",
    DET: "#8a9bb0", PRON: "#46b3b8", CONJ: "#c7569b", NUM: "#7b6f4a", PRT: "#9cbf3b", ".": "#b0b7c3",
    X: "#555e6c", SPECIAL: "#2f3747"};
  var view = FEATURES.slice(), page = 0, sortKey = null, sortDir = 0;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    return (a >= 1e4 || (a > 0 && a < 1e-3)) ? v.toExponential(2) : String(+v.toPrecision(3));
  }
  function piece(tok) { return tok.indexOf("##") === 0 ? tok.slice(2) : tok; }
  FEATURES.forEach(function (f) {
    var words = f.contexts.map(function (c) { return c.index < 0 ? "" : piece(String(c.tokens[c.index])); });
    f._search = (String(f.label) + "\n" + words.join("\n")).toLowerCase();
  });

  var summary = document.getElementById("summary");
  Object.keys(DATA.summary).forEach(function (k) {
    var v = DATA.summary[k], row = el("div");
    row.appendChild(el("dt", null, k));
    row.appendChild(el("dd", null, (v !== null && typeof v === "object") ? JSON.stringify(v) : fmt(v)));
    summary.appendChild(row);
  });

  var header = document.getElementById("header");
  COLUMNS.forEach(function (col) {
    var th = el("th", col.key ? "sortable" : null, col.label);
    if (col.key) {
      th.dataset.key = col.key;
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(col); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(col); });
    }
    header.appendChild(th);
  });

  function compare(a, b) {
    var x = a[sortKey], y = b[sortKey];
    if (x === null || x === undefined) return (y === null || y === undefined) ? a.id - b.id : 1;
    if (y === null || y === undefined) return -1;
    if (typeof x === "string") return sortDir * x.localeCompare(y) || a.id - b.id;
    return sortDir * (x - y) || a.id - b.id;
  }
  function sortBy(col) {
    sortDir = sortKey === col.key ? -sortDir : (col.num && col.key !== "id" ? -1 : 1);
    sortKey = col.key;
    Array.prototype.forEach.call(header.children, function (th) {
      if (th.dataset.key) th.setAttribute("aria-sort", th.dataset.key === sortKey
        ? (sortDir > 0 ? "ascending" : "descending") : "none");
    });
    applyFilter();
  }

  function posCell(dist) {
    var td = el("td"), bar = el("div", "pos"), tags = Object.keys(dist || {});
    tags.sort(function (a, b) { return dist[b] - dist[a]; });
    tags.forEach(function (t) {
      var s = el("span");
      s.style.width = (100 * Math.max(0, dist[t] || 0)) + "%";
      s.style.background = TAG_COLORS[t] || "#999";
      s.title = t + " " + (100 * dist[t]).toFixed(1) + "%";
      bar.appendChild(s);
    });
    td.appendChild(bar);
    td.appendChild(el("div", "pos-text", tags.slice(0, 3).map(function (t) {
      return t + " " + Math.round(100 * dist[t]) + "%"; }).join(" \u00b7 ")));
    return td;
  }
  var SVG = "http://www.w3.org/2000/svg";
  function histCell(hist) {
    var td = el("td"), counts = hist.counts || [], edges = hist.edges || [], W = 160, H = 40;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", W); svg.setAttribute("height", H + 12);
    var max = Math.max.apply(null, counts.concat([1])), bw = counts.length ? W / counts.length : W;
    counts.forEach(function (c, i) {
      var h = c > 0 ? Math.max(1, H * c / max) : 0, r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", i * bw); r.setAttribute("y", H - h);
      r.setAttribute("width", Math.max(bw - 1, 0.5)); r.setAttribute("height", h);
      var t = document.createElementNS(SVG, "title");
      t.textContent = "[" + fmt(edges[i]) + ", " + fmt(edges[i + 1]) + "): " + c;
      r.appendChild(t); svg.appendChild(r);
    });
    [[0, "start", edges[0]], [W, "end", edges[edges.length - 1]]].forEach(function (a) {
      var t = document.createElementNS(SVG, "text");
      t.setAttribute("x", a[0]); t.setAttribute("y", H + 10); t.setAttribute("text-anchor", a[1]);
      t.textContent = fmt(a[2]); svg.appendChild(t);
    });
    td.appendChild(svg);
    return td;
  }
  if (DATA.density) {  // the dictionary's feature density, beside the summary
    var dens = el("div");
    dens.appendChild(el("dt", null, "latents by log10 firing frequency"));
    var dd = el("dd"), svgDens = histCell(DATA.density).firstChild;
    svgDens.setAttribute("id", "density");
    dd.appendChild(svgDens);
    dens.appendChild(dd);
    summary.appendChild(dens);
  }
  function contextLine(ctx) {
    var centre = Math.max(ctx.index, WINDOW), div = el("div", "ctx"), lo = Math.max(0, centre - WINDOW);
    var hi = Math.min(ctx.tokens.length, centre + WINDOW + 1);
    if (lo > 0) div.appendChild(document.createTextNode("\u2026 "));
    for (var i = lo; i < hi; i++) {
      var tok = String(ctx.tokens[i]);
      if (i > lo && tok.indexOf("##") !== 0) div.appendChild(document.createTextNode(" "));
      if (i === ctx.index) {
        var m = el("mark", null, piece(tok));
        m.title = "activation " + fmt(ctx.value);
        div.appendChild(m);
      } else {
        div.appendChild(document.createTextNode(piece(tok)));
      }
    }
    if (hi < ctx.tokens.length) div.appendChild(document.createTextNode(" \u2026"));
    div.appendChild(el("span", "val", fmt(ctx.value)));
    return div;
  }
  function contextsCell(contexts) {
    var td = el("td");
    contexts.slice(0, SHOWN).forEach(function (c) { td.appendChild(contextLine(c)); });
    if (contexts.length > SHOWN) {
      var det = el("details");
      det.appendChild(el("summary", null, (contexts.length - SHOWN) + " more"));
      contexts.slice(SHOWN).forEach(function (c) { det.appendChild(contextLine(c)); });
      td.appendChild(det);
    }
    return td;
  }
  function row(f) {
    var tr = el("tr");
    tr.dataset.id = f.id;
    COLUMNS.slice(0, 8).forEach(function (col) {
      var td = el("td", col.num ? "num" : "label", fmt(f[col.key]));
      td.dataset.key = col.key;
      tr.appendChild(td);
    });
    tr.appendChild(posCell(f.pos_dist));
    tr.appendChild(histCell(f.hist));
    tr.appendChild(contextsCell(f.contexts));
    return tr;
  }

  var tbody = document.getElementById("rows"), status = document.getElementById("status");
  var prev = document.getElementById("prev"), next = document.getElementById("next");
  function render() {
    var pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.min(page, pages - 1);
    var frag = document.createDocumentFragment();
    view.slice(page * PAGE, (page + 1) * PAGE).forEach(function (f) { frag.appendChild(row(f)); });
    tbody.replaceChildren(frag);
    status.textContent = view.length + " of " + FEATURES.length + " features \u00b7 page " + (page + 1) + " / " + pages;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }
  var search = document.getElementById("search");
  function applyFilter() {
    var q = search.value.trim().toLowerCase();
    view = !q ? FEATURES.slice() : FEATURES.filter(function (f) {
      return (/^\d+$/.test(q) && String(f.id) === q) || f._search.indexOf(q) >= 0;
    });
    if (sortKey) view.sort(compare);
    page = 0;
    render();
  }
  var timer = null;
  search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(applyFilter, 120); });
  prev.addEventListener("click", function () { page -= 1; render(); window.scrollTo(0, 0); });
  next.addEventListener("click", function () { page += 1; render(); window.scrollTo(0, 0); });
  render();
})();
"""
