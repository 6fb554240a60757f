"""The offline HTML report of an analysis run: ``RUN_DIR/report/index.html`` and image pages.

Self-contained: inline CSS and vanilla JavaScript, no network resources; every link is relative
and points inside the run folder. All text from the data set is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from convlens.analysis.faithfulness import RANDOM_MAP
from convlens.atomic import atomic_write_text, is_complete
from convlens.console import printable

if TYPE_CHECKING:
    from convlens.analysis.run import AnalysisResult
    from convlens.analysis.store import Prediction

__all__ = ["write_report"]

_PAGE = 100  # default rows per page of the images table

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 1em;color:#222}
nav{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th[data-key]{cursor:pointer;background:#f4f4f4;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.wrong{color:#b00}.right{color:#070}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;padding:6px;width:150px;font-size:12px}
.card img{max-width:140px;max-height:140px;display:block}
.stats td:first-child{font-weight:600}
img.thumb{max-height:48px}
.plots img{max-width:32%;min-width:300px}
.panel img{max-width:100%}
"""

_JS = """
(function () {
  "use strict";
  var table = document.getElementById("images-table");
  var source = document.getElementById("images-data");
  if (!table || !source) { return; }
  var data = JSON.parse(source.textContent);
  var names = data.names, rows = data.rows;  // row: [file, id, true, pred, conf, flags]
  var STATUS = ["wrong", "right", "unlabelled"];
  var tbody = table.tBodies[0];
  var text = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var shown = document.getElementById("shown-count");
  var size = document.getElementById("page-size");
  var info = document.getElementById("page-info");
  var collator = new Intl.Collator(undefined, {sensitivity: "base", numeric: true});
  var rank = names.map(function (_, i) { return i; });
  rank.sort(function (a, b) { return collator.compare(names[a], names[b]); });
  var nameRank = new Array(names.length + 1);
  rank.forEach(function (c, r) { nameRank[c + 1] = r + 1; });
  nameRank[0] = 0;  // no label sorts first
  var lower = names.map(function (n) { return n.toLowerCase(); });
  function label(c) { return c < 0 ? "(no label)" : names[c]; }
  function state(r) { return r[2] < 0 ? 2 : (r[2] === r[3] ? 1 : 0); }
  var KEYS = {
    "true": function (r) { return nameRank[r[2] + 1]; },
    "pred": function (r) { return nameRank[r[3] + 1]; },
    "conf": function (r) { return r[4] === null ? -1 : r[4]; },
    "status": function (r) { return STATUS[state(r)]; }
  };
  var order = rows.map(function (_, i) { return i; });  // sorted order of all rows
  var view = order;  // filtered rows, in sorted order
  var page = 0;
  function esc(v) {
    return String(v).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\"": "&quot;", "'": "&#39;"}[ch];
    });
  }
  function cell(r) {
    var flags = r[5], inner = esc(r[0]);
    if (flags & 1) {
      inner = '<img class="thumb" loading="lazy" src="' + data.thumbs + esc(r[1]) +
        '.jpg" alt="' + esc(r[0]) + '">';
    }
    if (flags & 2) { return '<a href="' + data.pages + esc(r[1]) + '.html">' + inner + "</a>"; }
    if (flags & 1) { return '<a href="' + data.thumbs + esc(r[1]) + '.jpg">' + inner + "</a>"; }
    return inner;
  }
  function render() {
    var per = parseInt(size.value, 10);
    var pages = Math.max(1, Math.ceil(view.length / per));
    page = Math.min(Math.max(page, 0), pages - 1);
    var html = [];
    var end = Math.min(view.length, (page + 1) * per);
    for (var k = page * per; k < end; k += 1) {
      var r = rows[view[k]], st = STATUS[state(r)];
      html.push('<tr data-status="' + st + '"><td>' + cell(r) + "</td>" +
        '<td data-value="' + esc(label(r[2])) + '">' + esc(label(r[2])) + "</td>" +
        '<td data-value="' + esc(label(r[3])) + '">' + esc(label(r[3])) + "</td>" +
        '<td class="num" data-value="' + r[4] + '">' +
          (r[4] === null ? "nan" : r[4].toFixed(3)) + "</td>" +
        '<td data-value="' + st + '" class="' + st + '">' + st + "</td></tr>");
    }
    tbody.innerHTML = html.join("");
    shown.textContent = String(view.length);
    info.textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("page-first").disabled = page === 0;
    document.getElementById("page-prev").disabled = page === 0;
    document.getElementById("page-next").disabled = page >= pages - 1;
    document.getElementById("page-last").disabled = page >= pages - 1;
  }
  function apply() {
    var q = text.value.trim().toLowerCase();
    var s = status.value;
    var hit = names.map(function (n, c) { return !q || lower[c].indexOf(q) >= 0; });
    var noLabel = !q || "(no label)".indexOf(q) >= 0;
    view = order.filter(function (i) {
      var r = rows[i];
      if (s !== "all" && STATUS[state(r)] !== s) { return false; }
      return !q || (r[2] < 0 ? noLabel : hit[r[2]]) || hit[r[3]] ||
        r[0].toLowerCase().indexOf(q) >= 0;
    });
    page = 0;
    render();
  }
  function sortBy(th) {
    var key = KEYS[th.dataset.key];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var sign = asc ? 1 : -1;
    var values = rows.map(key);
    order = rows.map(function (_, i) { return i; });
    order.sort(function (a, b) {
      var x = values[a], y = values[b];
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return c !== 0 ? sign * c : a - b;
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    apply();
  }
  Array.prototype.forEach.call(table.tHead.querySelectorAll("th[data-key]"), function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  function go(id, to) {
    document.getElementById(id).addEventListener("click", function () {
      page = to(page);
      render();
    });
  }
  go("page-first", function () { return 0; });
  go("page-prev", function (p) { return p - 1; });
  go("page-next", function (p) { return p + 1; });
  go("page-last", function () { return 1e9; });
  text.addEventListener("input", apply);
  status.addEventListener("change", apply);
  size.addEventListener("change", function () { page = 0; render(); });
  apply();
})();
"""


def _e(value: object) -> str:
    # printable: a file name's undecodable bytes show as \xff (they cannot be written as UTF-8)
    return html.escape(printable(str(value)), quote=True)


def _rel(target: Path, start: Path) -> str:
    """URL of ``target`` relative to the folder ``start`` (forward slashes, escaped)."""
    return _e(Path(os.path.relpath(target, start)).as_posix())


def _page(title: str, body: str, *, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}{js}</body></html>\n"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


_FAITH_HOW = (
    "Deletion removes the pixels a map ranks highest first and records the predicted class's "
    "probability; insertion adds them back, in the same order, to a blurred image. The area "
    "under the curve is low for deletion and high for insertion when the map shows what the "
    "model uses (Petsiuk et al. 2018, RISE, §4). The (random map) row scores a map of random "
    "noise the same way, for reference."
)
_FAITH_CAVEAT = (
    "Around 50% is chance. Deleting scattered pixels destroys the score quickly, so deletion "
    "favours fine-grained maps and even the random map often beats coarse ones (CAM methods, "
    "occlusion); insertion favours compact regions: read the two together."
)


def _num(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"


def _share(x: object) -> str:
    return _pct(x) if isinstance(x, (int, float)) else "n/a"


def _method_label(name: str) -> str:
    return "(random map)" if name == RANDOM_MAP else name


class _Report:
    def __init__(self, result: AnalysisResult, examined: Sequence[str]) -> None:
        self.r = result
        self.root = result.out_dir
        self.dir = self.root / "report"
        self.pages = self.dir / "images"
        self.examined = [i for i in examined if is_complete(result.explanations.get(i) or Path())]
        self.by_id = {p.id: p for p in result.predictions}
        summary = result.metrics.get("faithfulness") or {}
        self.faith: dict[str, dict[str, float | int | None]] = summary.get("methods", {})
        self.faith_images = int(summary.get("images", 0))

    def name(self, c: int | None) -> str:
        return "(no label)" if c is None else self.r.class_names[c]

    def thumb(self, p: Prediction, start: Path, css: str = "thumb") -> str:
        f = self.root / "thumbs" / f"{p.id}.jpg"
        if not is_complete(f):
            return _e(Path(p.path).name)
        return f'<img class="{css}" src="{_rel(f, start)}" alt="{_e(Path(p.path).name)}">'

    def page_link(self, p: Prediction, start: Path, inner: str) -> str:
        if p.id in self.examined:
            return f'<a href="{_rel(self.pages / f"{p.id}.html", start)}">{inner}</a>'
        f = self.root / "thumbs" / f"{p.id}.jpg"
        if is_complete(f):
            return f'<a href="{_rel(f, start)}">{inner}</a>'
        return inner

    def write(self) -> Path:
        self.pages.mkdir(parents=True, exist_ok=True)
        index = self.dir / "index.html"
        atomic_write_text(index, _page("convlens error analysis", self.index_body(), script=_JS))
        for n, pid in enumerate(self.examined):
            prev = self.examined[n - 1] if n > 0 else None
            nxt = self.examined[n + 1] if n + 1 < len(self.examined) else None
            atomic_write_text(
                self.pages / f"{pid}.html", self.image_page(self.by_id[pid], prev, nxt)
            )
        return index

    def methods_text(self) -> str:
        m = self.r.metrics
        options = m.get("method_options", {})
        return ", ".join(
            name + (f" ({', '.join(f'{k}={v}' for k, v in options[name].items())})")
            if options.get(name)
            else name
            for name in m.get("methods", [])
        )

    def index_body(self) -> str:
        m = self.r.metrics
        d = self.dir
        parts = [
            '<nav><a href="#summary">Summary</a><a href="#plots">Plots</a>'
            '<a href="#mistakes">Worst mistakes</a>'
            + ('<a href="#faithfulness">Faithfulness</a>' if self.faith else "")
            + '<a href="#pairs">Most confused</a>'
            '<a href="#classes">Per class</a><a href="#images">All images</a>'
            '<a href="#failures">Skipped files</a></nav>',
            f"<h1>Error analysis: {_e(m.get('model', 'model'))}</h1>",
            '<section id="summary"><h2>Summary</h2><table class="stats">',
        ]
        rows = [
            ("images predicted", m["images"]),
            ("labelled", m["labelled"]),
            ("correct", m["correct"]),
            ("top-1 accuracy", _pct(m["top1"])),
            ("top-5 accuracy", _pct(m["top5"])),
            ("expected calibration error (15 bins)", f"{m['ece']:.4f}"),
            ("mean cross-entropy", f"{m['mean_loss']:.4f}"),
            ("skipped files (unreadable, or non-finite model output)", m["failures"]),
            ("examined but unreadable when explained", len(self.r.unexplained)),
            ("explanation methods", self.methods_text()),
        ]
        parts += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
        parts.append("</table>")
        if self.examined:
            parts.append(
                f'<p><a href="#mistakes">See the {len(self.examined)} examined mistakes</a>, '
                "each with explanations for the predicted and the true class.</p>"
            )
        parts.append("</section>")
        plots = self.root / "plots"
        parts.append('<section id="plots" class="plots"><h2>Plots</h2>')
        for name, alt in (
            ("reliability", "reliability diagram"),
            ("confidence", "confidence histograms"),
            ("confusion", "confusion matrix"),
        ):
            f = plots / f"{name}.png"
            if is_complete(f):
                parts.append(f'<a href="{_rel(f, d)}"><img src="{_rel(f, d)}" alt="{alt}"></a>')
        parts.append("</section>")
        parts.append('<section id="mistakes"><h2>Worst mistakes</h2>')
        parts.append(
            "<p>The most confident mistakes and examples of the most confused pairs; "
            "click one for its explanations.</p><div class='gallery'>"
        )
        for pid in self.examined:
            p = self.by_id[pid]
            parts.append(
                '<div class="card">'
                + self.page_link(p, d, self.thumb(p, d, css="big"))
                + f"<div>true: {_e(self.name(p.label))}</div>"
                + f"<div class='wrong'>predicted: {_e(self.name(p.pred))} "
                + f"({p.confidence:.2f})</div></div>"
            )
        parts.append("</div></section>")
        if self.faith:
            parts.append(self.faithfulness_section())
        parts.append(self.pairs_section())
        parts.append(self.classes_section())
        parts.append(self.images_section())
        parts.append('<section id="failures"><h2>Skipped files</h2>')
        if self.r.failures:
            parts.append(
                "<p>Skipped in the prediction pass: the file could not be read, or the model's "
                "output for it was not finite (NaN/Inf).</p><ul>"
            )
            parts += [f"<li>{_e(p)}: {_e(reason)}</li>" for p, reason in self.r.failures]
            parts.append("</ul>")
        else:
            parts.append("<p>None.</p>")
        if self.r.unexplained:
            parts.append(
                '<h3 id="unexplained">Not explained: unreadable after the prediction pass</h3>'
                "<p>Predicted (and counted in every figure above), but the file could not be "
                "read any more when its explanations were due:</p><ul>"
            )
            parts += [f"<li>{_e(p)}: {_e(reason)}</li>" for p, reason in self.r.unexplained]
            parts.append("</ul>")
        parts.append("</section>")
        return "\n".join(parts)

    def faithfulness_section(self) -> str:
        """Mean deletion / insertion AUC per method and how often each beats a random map."""
        n = self.faith_images
        out = [
            '<section id="faithfulness"><h2>How faithful are the maps? '
            f"(deletion/insertion on the {n} explained mistake{'s' if n != 1 else ''}, "
            "predicted class)</h2>",
            f"<p>{_e(_FAITH_HOW)} The “beats random” columns give the share of images where the "
            f"method does better than the random map of the same image. {_e(_FAITH_CAVEAT)}</p>",
            "<table><tr><th>method</th><th>mean deletion AUC ↓</th>"
            "<th>mean insertion AUC ↑</th><th>beats random on deletion</th>"
            "<th>beats random on insertion</th><th>images</th></tr>",
        ]
        for name, row in self.faith.items():
            out.append(
                f"<tr><td>{_e(_method_label(name))}</td>"
                f"<td class='num'>{_num(row['deletion_auc'])}</td>"
                f"<td class='num'>{_num(row['insertion_auc'])}</td>"
                f"<td class='num'>{_share(row['beats_random_deletion'])}</td>"
                f"<td class='num'>{_share(row['beats_random_insertion'])}</td>"
                f"<td class='num'>{_e(row['images'])}</td></tr>"
            )
        out.append("</table></section>")
        return "\n".join(out)

    def image_faithfulness(self, p: Prediction) -> str:
        """This image's deletion / insertion AUC per method (empty without scores)."""
        scores = self.r.faithfulness.get(p.id)
        if not scores:
            return ""
        rows = "".join(
            f"<tr><td>{_e(_method_label(name))}</td>"
            f"<td class='num'>{_num(s.get('deletion_auc'))}</td>"
            f"<td class='num'>{_num(s.get('insertion_auc'))}</td></tr>"
            for name, s in scores.items()
        )
        return (
            '<h2 id="faithfulness">Faithfulness of the maps for the predicted class '
            f"({_e(self.name(p.pred))})</h2>"
            f"<p>{_e(_FAITH_HOW)}</p><table><tr><th>method</th><th>deletion AUC ↓</th>"
            f"<th>insertion AUC ↑</th></tr>{rows}</table>"
        )

    def pairs_section(self) -> str:
        d = self.dir
        out = [
            '<section id="pairs"><h2>Most confused pairs</h2><table>'
            "<tr><th>true class</th><th>predicted class</th><th>count</th><th>examples</th></tr>"
        ]
        for pair in self.r.metrics["confused_pairs"][:50]:
            links = [
                self.page_link(self.by_id[i], d, "example")
                for i in self.examined
                if self.by_id[i].label == pair["true"] and self.by_id[i].pred == pair["pred"]
            ][:2]
            out.append(
                f"<tr><td>{_e(pair['true_name'])}</td><td>{_e(pair['pred_name'])}</td>"
                f"<td class='num'>{pair['count']}</td><td>{' '.join(links)}</td></tr>"
            )
        out.append("</table></section>")
        return "\n".join(out)

    def classes_section(self) -> str:
        out = [
            '<section id="classes"><h2>Per class</h2><table>'
            "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
        ]
        for row in self.r.metrics["per_class"]:
            out.append(
                f"<tr><td>{_e(row['name'])}</td><td class='num'>{row['precision']:.3f}</td>"
                f"<td class='num'>{row['recall']:.3f}</td><td class='num'>{row['f1']:.3f}</td>"
                f"<td class='num'>{row['support']}</td></tr>"
            )
        out.append("</table></section>")
        return "\n".join(out)

    def images_section(self) -> str:
        """The table of every image: rows are compact JSON rendered a page at a time by _JS."""
        d = self.dir
        examined = set(self.examined)
        thumbs = self.root / "thumbs"
        present = {f.stem for f in thumbs.glob("*.jpg")} if thumbs.is_dir() else set()
        classes: dict[int, int] = {}

        def cls(c: int | None) -> int:
            return -1 if c is None else classes.setdefault(c, len(classes))

        rows = [
            [
                printable(Path(p.path).name),
                p.id,
                cls(p.label),
                cls(p.pred),
                round(p.confidence, 5) if math.isfinite(p.confidence) else None,  # JSON: null
                (1 if p.id in present else 0) | (2 if p.id in examined else 0),
            ]
            for p in self.r.predictions
        ]
        data = {
            "names": [self.r.class_names[c] for c in classes],
            "rows": rows,
            "thumbs": _rel(thumbs, d) + "/",
            "pages": _rel(self.pages, d) + "/",
        }
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        payload = payload.replace("<", "\\u003c").replace(">", "\\u003e")
        sizes = "".join(
            f'<option value="{n}"{" selected" if n == _PAGE else ""}>{n}</option>'
            for n in (25, 50, 100, 250, 1000)
        )
        return (
            '<section id="images"><h2>All images</h2><p>'
            '<label>class or file contains <input id="filter-text" type="search"></label> '
            '<label>show <select id="filter-status"><option value="all">all</option>'
            '<option value="right">right</option><option value="wrong">wrong</option>'
            '<option value="unlabelled">unlabelled</option></select></label> '
            f'<span id="shown-count"></span> of {len(rows)} shown; click a header to sort '
            "(sorting and filtering cover every image, not only the page shown).</p>"
            '<p class="pager"><button id="page-first" type="button">first</button> '
            '<button id="page-prev" type="button">previous</button> '
            '<span id="page-info"></span> '
            '<button id="page-next" type="button">next</button> '
            '<button id="page-last" type="button">last</button> '
            f'<label>rows per page <select id="page-size">{sizes}</select></label></p>'
            '<table id="images-table"><thead><tr><th>image</th>'
            '<th data-key="true">true class</th><th data-key="pred">predicted class</th>'
            '<th data-key="conf" data-type="num">confidence</th>'
            '<th data-key="status">right/wrong</th></tr></thead><tbody></tbody></table>'
            f'<script type="application/json" id="images-data">{payload}</script>'
            "</section>"
        )

    def image_page(self, p: Prediction, prev: str | None, nxt: str | None) -> str:
        d = self.pages
        nav = [f'<a href="{_rel(self.dir / "index.html", d)}#mistakes">back to the report</a>']
        if prev:
            nav.append(f'<a href="{_e(prev)}.html">previous</a>')
        if nxt:
            nav.append(f'<a href="{_e(nxt)}.html">next</a>')
        top5 = "".join(
            f"<tr><td>{_e(self.name(c))}</td><td class='num'>{prob:.3f}</td></tr>"
            for c, prob in zip(p.top5, p.probs5, strict=True)
        )
        panel = self.r.explanations[p.id]
        loss = "" if p.loss is None else f"<tr><td>loss</td><td>{p.loss:.4f}</td></tr>"
        body = (
            f"<nav>{''.join(nav)}</nav><h1>{_e(Path(p.path).name)}</h1>"
            f"<p>{_e(p.path)}</p>{self.thumb(p, d, css='big')}"
            f'<table class="stats"><tr><td>true class</td><td>{_e(self.name(p.label))}</td></tr>'
            f"<tr><td>predicted class</td><td class='wrong'>{_e(self.name(p.pred))}</td></tr>"
            f"<tr><td>confidence</td><td>{p.confidence:.3f}</td></tr>{loss}</table>"
            f"<h2>Top-5</h2><table>{top5}</table>"
            "<h2>Explanations: predicted class vs true class</h2>"
            f'<div class="panel"><img src="{_rel(panel, d)}" alt="explanations"></div>'
            f"{self.image_faithfulness(p)}"
        )
        return _page(f"{Path(p.path).name}: convlens error analysis", body)


def write_report(result: AnalysisResult, examined: Sequence[str]) -> Path:
    """Write ``report/index.html`` and one page per examined image under the run folder.

    Args:
        result: the analysis result (its ``out_dir``, metrics, predictions, explanations).
        examined: ids of the examined images, in the order of the galleries.

    Returns:
        The path of ``index.html``.
    """
    return _Report(result, examined).write()
