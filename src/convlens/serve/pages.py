"""The explorer's HTML pages, from the report's Jinja2 templates where they overlap.

The run view is the static report's index (``report_index.html.j2``, built by
:class:`convlens.analysis.report._Report`) with every image linked to its live page; the live
image page and the folder view are templates of their own (``serve_*.html.j2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.analysis.report import _Image, _Report
from convlens.render.html import render_page

if TYPE_CHECKING:
    from convlens.analysis.store import Prediction
    from convlens.serve.explorer import Explorer

__all__ = ["features_page", "folder_page", "image_page", "run_page", "upload_page"]

_MISTAKES = 50  # mistakes in the gallery of a run view


def image_url(i: str) -> str:
    """The URL of the live page of image ``i``."""
    return f"/image/{i}.html"


class _LiveReport(_Report):
    """The report's index, every image linking to its live page (``/image/ID.html``)."""

    def image(self, p: Prediction, start: Path) -> _Image:
        shown = super().image(p, start)
        return _Image(shown.name, shown.thumb, image_url(p.id))

    def images_table(self) -> dict[str, object]:
        table = super().images_table()
        data: Any = table["data"]
        for row in data["rows"]:
            row[5] |= 2  # every image has a page
        data["pages"] = "/image/"
        return table


def run_page(explorer: Explorer) -> str:
    """The run view: what the report's index shows, with live image pages."""
    from convlens.analysis.run import AnalysisResult, select_examined

    assert explorer.root is not None and explorer.metrics is not None
    root = explorer.root
    panels = {
        p.id: f
        for p in explorer.predictions
        if (f := root / "explanations" / f"{p.id}.png").is_file()
    }
    result = AnalysisResult(
        out_dir=root,
        metrics=explorer.metrics,
        predictions=explorer.predictions,
        failures=explorer.failures,
        class_names=list(explorer.model.classes.names),
        explanations=panels,
    )
    report = _LiveReport(result, [])
    chosen = select_examined(explorer.predictions, explorer.metrics, len(explorer.predictions))
    report.examined = [p.id for p in chosen][:_MISTAKES]
    html = report.index_page()
    banner = (
        '<p class="live" style="background:#eef6ff;padding:.4em .8em">Live explorer: click an '
        "image to explain it with any method, class and layer. "
        '<a href="/upload.html">Explain an image of your own</a> · '
        '<a href="/features.html">Browse the features</a>.</p>'
    )
    return html.replace("<body>\n", "<body>\n" + banner, 1)


def folder_page(explorer: Explorer) -> str:
    """The image folder (or uploads-only) view: a gallery of the images."""
    return render_page(
        "serve_folder.html.j2",
        title="convlens explorer",
        model=explorer.model.name,
        root=None if explorer.root is None else str(explorer.root),
        images=[
            {"name": r.name, "url": image_url(r.id), "thumb": f"/api/images/{r.id}/input.png"}
            for r in list(explorer.images.values())[:500]
        ],
        count=len(explorer.images),
    )


def image_page(explorer: Explorer, i: str) -> str:
    """The live page of image ``i``."""
    info = explorer.image_info(i)
    return render_page(
        "serve_image.html.j2",
        title=f"{info['name']}: convlens explorer",
        model=explorer.model.name,
        image=info,
        config={
            "image": info,
            "methods": explorer.methods(),
            "layers": explorer.layers(),
            "maxUpload": explorer.max_upload_bytes,
        },
    )


def upload_page(explorer: Explorer) -> str:
    """A page to drop an image on."""
    return render_page(
        "serve_upload.html.j2",
        title="convlens explorer: your image",
        model=explorer.model.name,
        config={"maxUpload": explorer.max_upload_bytes},
    )


def features_page(explorer: Explorer) -> str:
    """The live feature browser: pick a layer, then a channel."""
    return render_page(
        "serve_features.html.j2",
        title="convlens explorer: features",
        model=explorer.model.name,
        count=len([i for i in explorer.images if not i.startswith("u")]),
        config={
            "features": True,
            "layers": [r for r in explorer.layers() if r["layout"] is None],
            "maxUpload": explorer.max_upload_bytes,
        },
    )
