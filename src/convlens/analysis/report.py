"""The offline HTML report of an analysis run: ``RUN_DIR/report/index.html`` and image pages.

Self-contained: CSS and vanilla JavaScript inlined from ``convlens/static``, no network resources;
every link is relative and points inside the run folder. The pages are the templates
``convlens/templates/report_*.html.j2``, rendered by :mod:`convlens.render.html` (autoescaped).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.analysis.faithfulness import RANDOM_MAP
from convlens.atomic import atomic_write_text, is_complete
from convlens.console import printable
from convlens.render.html import render_page

if TYPE_CHECKING:
    from convlens.analysis.run import AnalysisResult
    from convlens.analysis.store import Prediction

__all__ = ["write_report"]

_PAGE = 100  # default rows per page of the images table
_PAGE_SIZES = (25, 50, 100, 250, 1000)


def _rel(target: Path, start: Path) -> str:
    """URL of ``target`` relative to the folder ``start`` (forward slashes; the template
    escapes it)."""
    return Path(os.path.relpath(target, start)).as_posix()


@dataclass(frozen=True)
class _Image:
    """How one image is shown: its file name, its thumbnail and what it links to."""

    name: str  # file name
    thumb: str | None  # URL of the thumbnail, None without one
    link: str | None  # URL of its page (examined) or else its thumbnail; None without either


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
        self.modes_dir = self.dir / "failure_modes"
        self.examined = [i for i in examined if is_complete(result.explanations.get(i) or Path())]
        self.by_id = {p.id: p for p in result.predictions}
        summary = result.metrics.get("faithfulness") or {}
        self.faith: dict[str, dict[str, float | int | None]] = summary.get("methods", {})
        self.faith_images = int(summary.get("images", 0))

    def name(self, c: int | None) -> str:
        return "(no label)" if c is None else self.r.class_names[c]

    def image(self, p: Prediction, start: Path) -> _Image:
        """How ``p`` is shown on a page in the folder ``start``."""
        f = self.root / "thumbs" / f"{p.id}.jpg"
        known = self.r.thumbnails
        complete = p.id in known if known is not None else is_complete(f)
        thumb = _rel(f, start) if complete else None
        link = _rel(self.pages / f"{p.id}.html", start) if p.id in self.examined else thumb
        return _Image(Path(p.path).name, thumb, link)

    def write(self) -> Path:
        self.pages.mkdir(parents=True, exist_ok=True)
        index = self.dir / "index.html"
        atomic_write_text(index, self.index_page())
        for n, pid in enumerate(self.examined):
            prev = self.examined[n - 1] if n > 0 else None
            nxt = self.examined[n + 1] if n + 1 < len(self.examined) else None
            atomic_write_text(
                self.pages / f"{pid}.html", self.image_page(self.by_id[pid], prev, nxt)
            )
        clusters = (self.r.metrics.get("failure_modes") or {}).get("clusters", [])
        if clusters:
            self.modes_dir.mkdir(parents=True, exist_ok=True)
        for n, cluster in enumerate(clusters):
            atomic_write_text(
                self.modes_dir / _mode_file(cluster["rank"]),
                self.mode_page(
                    cluster,
                    clusters[n - 1]["rank"] if n > 0 else None,
                    clusters[n + 1]["rank"] if n + 1 < len(clusters) else None,
                ),
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

    def index_page(self) -> str:
        m = self.r.metrics
        d = self.dir
        summary = [
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
        plots = [
            (_rel(f, d), alt)
            for name, alt in (
                ("reliability", "reliability diagram"),
                ("confidence", "confidence histograms"),
                ("confusion", "confusion matrix"),
            )
            if is_complete(f := self.root / "plots" / f"{name}.png")
        ]
        mistakes = [
            {
                "image": self.image(p, d),
                "true": self.name(p.label),
                "pred": self.name(p.pred),
                "confidence": p.confidence,
            }
            for p in (self.by_id[pid] for pid in self.examined)
        ]
        return render_page(
            "report_index.html.j2",
            title="convlens error analysis",
            model=m.get("model", "model"),
            summary=summary,
            plots=plots,
            mistakes=mistakes,
            faithfulness=self.faithfulness_rows(),
            faith_images=self.faith_images,
            faith_how=_FAITH_HOW,
            faith_caveat=_FAITH_CAVEAT,
            failure_modes=self.failure_modes_rows(),
            failure_modes_info=m.get("failure_modes"),
            pairs=self.pairs_rows(),
            classes=m["per_class"],
            images=self.images_table(),
            failures=self.r.failures,
            unexplained=self.r.unexplained,
        )

    def faithfulness_rows(self) -> list[list[str]]:
        """Mean deletion / insertion AUC per method and how often each beats a random map."""
        return [
            [
                _method_label(name),
                _num(row["deletion_auc"]),
                _num(row["insertion_auc"]),
                _share(row["beats_random_deletion"]),
                _share(row["beats_random_insertion"]),
                str(row["images"]),
            ]
            for name, row in self.faith.items()
        ]

    def failure_modes_rows(self) -> list[dict[str, object]]:
        """One row per cluster of mistakes (``metrics["failure_modes"]``), best first.

        Extension point: a page per cluster would link from here (``FailureMode`` in
        :attr:`AnalysisResult.failure_modes` holds its members).
        """
        d = self.dir
        info = self.r.metrics.get("failure_modes") or {}
        return [
            {
                "rank": c["rank"],
                "page": _rel(self.modes_dir / _mode_file(c["rank"]), d),
                "size": c["size"],
                "errors": c["errors"],
                "purity": _pct(c["purity"]),
                "lift": f"{c['lift']:.2f}",
                "z": f"{c['z']:.1f}",
                "stands_out": c["stands_out"],
                "pairs": [
                    f"{p['true_name']} → {p['pred_name']} ({p['count']})" for p in c["pairs"]
                ],
                "images": [
                    self.image(self.by_id[i], d) for i in c["representatives"] if i in self.by_id
                ],
                "push": [f"c{x['channel']} {x['contribution']:+.3f}" for x in c["push_channels"]],
                "distinct": [
                    f"c{x['channel']} d={x['effect_size']:+.2f}" for x in c["distinguishing"]
                ],
            }
            for c in info.get("clusters", [])
        ]

    def mode_page(self, c: dict[str, Any], prev: int | None, nxt: int | None) -> str:
        """The page of one failure mode (``metrics["failure_modes"]["clusters"]`` entry ``c``):
        its numbers, pairs, representatives with their maps and where its wrong-way channels
        fire, and each shown channel's top patches from the run's images."""
        from convlens.analysis.failure_pages import SHOWN_CHANNELS

        d = self.modes_dir
        info = self.r.metrics.get("failure_modes") or {}
        ev = info.get("evidence") or {}
        kind = c.get("push_kind", info.get("push_kind", "exact"))
        effects = (ev.get("effect_sizes") or {}).get(str(c["rank"]), {})
        push = [int(x["channel"]) for x in c["push_channels"][:SHOWN_CHANNELS]]

        def channel(ch: int, **numbers: str) -> dict[str, object]:
            shown = (ev.get("channels") or {}).get(str(ch)) or {}
            d_value = effects.get(str(ch))
            return {
                "channel": ch,
                **numbers,
                "effect": "n/a" if d_value is None else f"{d_value:+.2f}",
                "strip": _rel(self.root / shown["image"], d) if shown.get("image") else None,
                "patches": [
                    {
                        "image": self.image(self.by_id[q["id"]], d),
                        "value": f"{q['pooled']:.3g}",
                    }
                    for q in shown.get("patches", [])
                    if q["id"] in self.by_id
                ],
            }

        reps = []
        for pid in c["representatives"]:
            p = self.by_id.get(pid)
            if p is None:
                continue
            shown_map = (ev.get("maps") or {}).get(pid) or {}
            fires = (ev.get("fires") or {}).get(pid) or {}
            reps.append(
                {
                    "image": self.image(p, d),
                    "true": self.name(p.label),
                    "pred": self.name(p.pred),
                    "confidence": p.confidence,
                    "map": _rel(self.root / shown_map["image"], d)
                    if shown_map.get("image")
                    else None,
                    "map_kind": shown_map.get("kind"),
                    "fires": [
                        (ch, _rel(self.root / fires[str(ch)], d)) for ch in push if str(ch) in fires
                    ],
                }
            )
        stats = [
            ("images", c["size"]),
            ("mistakes", c["errors"]),
            ("purity (share of mistakes)", _pct(c["purity"])),
            ("lift (purity / base error rate)", f"{c['lift']:.2f}"),
            ("z (excess of mistakes, binomial SDs)", f"{c['z']:.1f}"),
            ("score (mistakes × purity)", f"{c['score']:.2f}"),
            ("stands out", f"yes ({info.get('stands_out', '')})" if c["stands_out"] else "no"),
            ("mean margin s_pred − s_true", f"{c['margin']:.3f}"),
            ("channel attribution", kind),
        ]
        if kind == "exact":
            stats.append(("mean bias term b_pred − b_true", f"{c['bias_term']:.3f}"))
        else:
            stats.append(("mean remainder (margin − Σ channels)", f"{c['bias_term']:.3f}"))
        return render_page(
            "report_failure_mode.html.j2",
            title=f"Failure mode {c['rank']}: convlens error analysis",
            back=_rel(self.dir / "index.html", d) + "#failure-modes",
            prev=None if prev is None else _mode_file(prev),
            next=None if nxt is None else _mode_file(nxt),
            rank=c["rank"],
            stands_out=c["stands_out"],
            stats=stats,
            pairs=c["pairs"],
            representatives=reps,
            push=[
                channel(int(x["channel"]), contribution=f"{x['contribution']:+.3f}")
                for x in c["push_channels"]
            ],
            distinct=[
                channel(
                    int(x["channel"]),
                    group=f"{x['group_mean']:.3f}",
                    reference=f"{x['reference_mean']:.3f}",
                )
                for x in c["distinguishing"]
            ],
            push_how=_PUSH_HOW.get(kind, kind),
            layer=info.get("layer", ""),
            scanned=ev.get("ranked_over", 0),
            patch_px=(ev.get("patch_pixels") or ["n/a"])[0],
            field_px=(ev.get("input_pixels") or ["n/a"])[0],
            evidence_note=ev.get("skipped"),
            shown=SHOWN_CHANNELS,
        )

    def pairs_rows(self) -> list[dict[str, object]]:
        """The 50 most confused pairs, each with up to two examined examples."""
        d = self.dir
        return [
            {
                "true": pair["true_name"],
                "pred": pair["pred_name"],
                "count": pair["count"],
                "examples": [
                    self.image(self.by_id[i], d).link
                    for i in self.examined
                    if self.by_id[i].label == pair["true"] and self.by_id[i].pred == pair["pred"]
                ][:2],
            }
            for pair in self.r.metrics["confused_pairs"][:50]
        ]

    def images_table(self) -> dict[str, object]:
        """The table of every image: rows as compact JSON, rendered a page at a time by
        ``static/report.js``."""
        d = self.dir
        examined = set(self.examined)
        thumbs = self.root / "thumbs"
        present = {f.stem for f in thumbs.glob("*.jpg")} if thumbs.is_dir() else set()
        classes: dict[int, int] = {}

        def cls(c: int | None) -> int:
            return -1 if c is None else classes.setdefault(c, len(classes))

        rows = [
            [
                # printable: a file name's undecodable bytes show as \xff, as in the pages
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
        return {"data": data, "count": len(rows), "sizes": _PAGE_SIZES, "size": _PAGE}

    def image_page(self, p: Prediction, prev: str | None, nxt: str | None) -> str:
        d = self.pages
        scores = self.r.faithfulness.get(p.id) or {}
        return render_page(
            "report_image.html.j2",
            title=f"{Path(p.path).name}: convlens error analysis",
            back=_rel(self.dir / "index.html", d) + "#mistakes",
            prev=None if prev is None else f"{prev}.html",
            next=None if nxt is None else f"{nxt}.html",
            image=self.image(p, d),
            path=p.path,
            label=self.name(p.label),
            predicted=self.name(p.pred),
            confidence=p.confidence,
            loss=p.loss,
            top5=[(self.name(c), prob) for c, prob in zip(p.top5, p.probs5, strict=True)],
            panel=_rel(self.r.explanations[p.id], d),
            faithfulness=[
                (_method_label(name), _num(s.get("deletion_auc")), _num(s.get("insertion_auc")))
                for name, s in scores.items()
            ],
            faith_how=_FAITH_HOW,
        )


def _mode_file(rank: int) -> str:
    """File name of the page of the failure mode ranked ``rank``."""
    return f"mode-{int(rank)}.html"


_PUSH_HOW = {
    "exact": "exact decomposition of the GAP + linear head: s_pred − s_true = Σ_c (w_pred,c − "
    "w_true,c) · mean(A_c) + (b_pred − b_true), each term averaged over the cluster's mistakes",
    "gradient": "gradient × activation of s_pred − s_true at the last feature map, summed over "
    "its positions (a first-order estimate: the head is not GAP + linear)",
}


def write_report(result: AnalysisResult, examined: Sequence[str]) -> Path:
    """Write ``report/index.html`` and one page per examined image under the run folder.

    Args:
        result: the analysis result (its ``out_dir``, metrics, predictions, explanations).
        examined: ids of the examined images, in the order of the galleries.

    Returns:
        The path of ``index.html``.
    """
    return _Report(result, examined).write()
