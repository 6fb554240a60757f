"""The feature browser's ``index.html``, from the template ``features_index.html.j2``."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convlens.features.receptive_field import ReceptiveField
from convlens.features.results import FeatureScan

__all__ = ["ChannelRow", "LayerPage", "Source", "index_html", "slug"]


def slug(layer: str) -> str:
    """``layer`` as a file-name stem and page anchor: letters, digits, ``.``, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer.replace("@", "_call")).strip("_") or "layer"


@dataclass(frozen=True)
class Source:
    """One top activation of a channel, as listed under its layer's grid."""

    value: float  # the activation
    name: str  # the image file, relative to the folder scanned
    unit: tuple[int, int]  # (y, x) of the unit in the layer's map
    box: tuple[int, int, int, int]  # the patch (top, left, bottom, right), bottom/right exclusive


@dataclass(frozen=True)
class ChannelRow:
    """A channel's row of the table: its top activations, strongest first."""

    channel: int
    sources: list[Source]


@dataclass
class LayerPage:
    """What the page shows of one layer."""

    layer: str  # as the user named it
    pngs: list[str]  # file names of its grid images, next to index.html
    shape: tuple[int, int, int]  # (channels, height, width) of its output
    rf: ReceptiveField  # of its units
    window: tuple[int, int]  # side of the patches shown
    notes: list[str]  # sentences shown as notes
    rows: list[ChannelRow]
    tokens: str | None = None  # how a token layer's output became the map; None: a map


def index_html(scan: FeatureScan, pages: Sequence[LayerPage], rule: str, root: Path | None) -> str:
    """The feature browser's ``index.html`` (template ``features_index.html.j2``)."""
    from convlens.render.html import render_page  # not at import: convlens.render loads matplotlib

    layers = []
    for p in pages:
        c, h, w = p.shape
        rf = p.rf
        shape = (
            f"output {c}x{h}x{w} · receptive field {rf.size[0]}x{rf.size[1]} px, "
            f"stride {rf.stride[0]}x{rf.stride[1]}"
            + (" (clipped: larger than the largest input measured)" if rf.clipped else "")
            + ("" if p.window == rf.size else f" · patches {p.window[0]}x{p.window[1]} px")
        )
        if p.tokens is not None:
            shape = (
                f"output {c}x{h}x{w} ({p.tokens}) · patches: token cells {rf.size[0]}x"
                f"{rf.size[1]} px (not receptive fields: attention reaches beyond the cell)"
            )
        layers.append(
            {
                "layer": p.layer,
                "slug": slug(p.layer),
                "shape": shape,
                "notes": p.notes,
                "pngs": p.pngs,
                "rows": p.rows,
            }
        )
    return render_page(
        "features_index.html.j2",
        title=f"convlens features · {scan.model_name}",
        model=scan.model_name,
        scanned=scan.scanned,
        root=None if root is None else str(root),
        skipped=[reason for _, reason in scan.skipped],
        k=scan.k,
        rule=rule,
        when=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        layers=layers,
    )
