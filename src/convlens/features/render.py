"""Step 3 of the feature browser: one grid PNG per layer and an offline ``index.html``
(:func:`render_features`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from convlens.atomic import atomic_write_text, save_image
from convlens.errors import InputError
from convlens.features.html import ChannelRow, LayerPage, Source, index_html, slug
from convlens.features.project import Crop, _examples, _ImageCache, _project, layer_geometry
from convlens.features.receptive_field import ReceptiveField
from convlens.features.results import FeatureScan, LayerScan, Progress, TopActivation
from convlens.features.scan import _progress_callback
from convlens.models.base import ConvlensModel
from convlens.outputs import lock_folder
from convlens.tokens import TokenLayout
from convlens.validate import positive_int

__all__ = ["render_features"]

logger = logging.getLogger(__name__)


def _root(paths: Sequence[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))
    except ValueError:
        return None


def _shown_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.absolute().relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def _image_independent(
    scan: FeatureScan, model: ConvlensModel, info: LayerScan, rule: str, cache: _ImageCache
) -> bool:
    """Whether the projection of one unit is the same for two different images (cosine
    similarity above 0.999): then the rule ignores the image (a deconvnet through a network
    without max pooling)."""
    for c in info.channels:
        acts = scan.top(info.layer, c)
        if len(acts) < 2:
            continue
        a, b = acts[0], acts[1]
        same = TopActivation(b.rank, b.value, b.image_id, b.path, a.y, a.x)
        _, _, p = _project(model, info.source, [c], {c: [a, same]}, cache, rule, 2)
        if p.shape[0] < 2:
            return False
        cos = torch.nn.functional.cosine_similarity(p[0].flatten(), p[1].flatten(), dim=0)
        return float(cos) > 0.999
    return False


def render_features(
    scan: FeatureScan,
    model: ConvlensModel,
    out_dir: str | Path,
    *,
    rule: str = "deconvnet",
    crop: Crop = "effective",
    cell: int = 64,
    columns: int = 4,
    per_image: int = 64,
    batch_size: int = 32,
    progress: bool | Progress = False,
) -> list[Path]:
    """Write the feature browser: one grid PNG per layer and an offline ``index.html``.

    Each PNG shows, for every chosen channel of the layer, the ``k`` projections of its top
    activations (a 3x3 grid for ``k = 9``) beside the ``k`` image patches under them, as in
    Zeiler & Fergus (2014), Fig. 2. Projections and patches are cropped around the unit (see
    :func:`feature_examples` for ``crop``) and projections shown with
    :func:`convlens.render.rgb_attribution`, normalised per crop (grey is zero). ``index.html``
    shows each grid and, per channel, the activation values and the source image files; it
    references only the PNGs next to it, so it works offline.

    Without max pooling the deconvnet ignores the image entirely (its only image-dependent step
    is unpooling with the max-pool switches), so every projection of a channel is the same
    pattern; this is detected and noted in the page (use ``rule="guided"`` to see image-specific
    structure).

    On a token layer of a vision transformer, the patches are the tokens' grid cells and the
    projections the input gradient of each unit cropped to its cell, whatever ``rule`` and
    ``crop`` say (see :func:`feature_examples`); the page says so, with the share of the
    gradient inside the cells.

    Args:
        scan: the result of :func:`scan_features`.
        model: the model scanned with.
        out_dir: output folder (created).
        rule: backward rule of the projection: ``"deconvnet"`` (Zeiler & Fergus) or
            ``"guided"`` (Springenberg et al. 2015).
        crop: ``"effective"`` (default) or ``"field"``; see :func:`feature_examples`.
        cell: side in pixels of one tile (patches and projections are scaled to fit).
        columns: channel blocks per row of the grid.
        per_image: channels per PNG; a layer with more chosen channels gets several PNGs
            (``features_<layer>_1.png``, ...), so that no image grows without bound.
        batch_size: projections per backward pass.
        progress: show a progress bar on stderr, or a ``(done, total)`` callback counting channels.

    Returns:
        The PNG files written, then ``index.html``.

    Raises:
        InputError: ``crop`` is invalid, or ``cell``, ``columns``, ``per_image`` or
            ``batch_size`` is not a positive integer.
        RunFolderError: another convlens process is writing ``out_dir``.
        OutputError: a file cannot be written (each is written atomically).
    """
    if crop not in ("effective", "field"):
        raise InputError(f"crop must be 'effective' or 'field', got {crop!r}")
    for name, value in (
        ("cell", cell),
        ("columns", columns),
        ("per_image", per_image),
        ("batch_size", batch_size),
    ):
        positive_int(value, name)
    out = Path(out_dir)
    with lock_folder(out, "features"):
        return _render_features(
            scan, model, out, rule, crop, cell, columns, per_image, batch_size, progress
        )


def _render_features(
    scan: FeatureScan,
    model: ConvlensModel,
    out: Path,
    rule: str,
    crop: Crop,
    cell: int,
    columns: int,
    per_image: int,
    batch_size: int,
    progress: bool | Progress,
) -> list[Path]:
    """:func:`render_features` in a folder whose lock is held."""
    from convlens.render.feature_grid import ChannelTiles, feature_grid
    from convlens.render.overlay import rgb_attribution, to_pil

    root = _root(scan.paths) if scan.paths else None
    total = sum(len(info.channels) for info in scan.layers.values())
    report, bar = _progress_callback(progress, "rendering")
    written: list[Path] = []
    pages: list[LayerPage] = []
    used: set[str] = set()
    cache = _ImageCache(scan.paths, model.preprocess)
    done = 0
    try:
        if report is not None:
            report(0, total)
        for layer, info in scan.layers.items():
            if not info.channels:
                logger.warning("layer %s: no channel has any activation; nothing to show", layer)
                continue
            rf = layer_geometry(model, info, scan.input_size)
            tokens = info.layout is not None
            independent = not tokens and _image_independent(scan, model, info, rule, cache)
            notes = _layer_notes(info, rule, independent)
            inside: list[float] = []
            for note in notes:
                logger.info("layer %s: %s", layer, note)
            base = f"features_{slug(layer)}"
            while base in used:
                base += "_"
            used.add(base)
            npages = -(-len(info.channels) // per_image)
            tiles: list[ChannelTiles] = []
            rows: list[ChannelRow] = []
            pngs: list[str] = []
            window = rf.size
            for ch in _examples(scan, model, layer, None, rule, crop, 0.9, batch_size, rf, cache):
                window = ch.window
                inside += [e.inside for e in ch.examples if e.inside is not None]
                projections = [rgb_attribution(_shrink(e.projection, cell)) for e in ch.examples]
                patches = [to_pil(e.patch) for e in ch.examples]
                best = f"max {ch.examples[0].activation.value:.3g}" if ch.examples else "no data"
                tiles.append(ChannelTiles(f"channel {ch.channel}", projections, patches, best))
                sources = [
                    Source(
                        e.activation.value,
                        _shown_name(e.activation.path, root),
                        (e.activation.y, e.activation.x),
                        e.box,
                    )
                    for e in ch.examples
                ]
                rows.append(ChannelRow(ch.channel, sources))
                done += 1
                if report is not None:
                    report(done, total)
                if len(tiles) < per_image and len(rows) < len(info.channels):
                    continue
                part = "" if npages == 1 else f" ({len(pngs) + 1}/{npages})"
                fig = feature_grid(
                    tiles,
                    k=scan.k,
                    cell=cell,
                    columns=columns,
                    title=f"{scan.model_name} · layer {layer}{part}",
                    subtitle=(
                        _token_subtitle(scan, info, rf, inside)
                        if tokens
                        else _subtitle(scan, info, rf, window, rule, independent)
                    ),
                )
                png = out / (f"{base}.png" if npages == 1 else f"{base}_{len(pngs) + 1}.png")
                save_image(fig, png, optimize=True)
                written.append(png)
                pngs.append(png.name)
                tiles = []
            if tokens:
                notes.append(_token_note(info, rf, inside))
            cells = None if info.layout is None else _layout_text(info.layout)
            pages.append(LayerPage(layer, pngs, info.shape, rf, window, notes, rows, cells))
    finally:
        if bar is not None:
            bar.stop()
    index = out / "index.html"
    atomic_write_text(index, index_html(scan, pages, rule, root))
    written.append(index)
    return written


def _shrink(projection: torch.Tensor, cell: int) -> torch.Tensor:
    """Average a (3, h, w) projection down to fit ``cell`` pixels (``area`` interpolation), so
    that it is normalised for display at the resolution it is shown at: thin structures of a
    large crop keep their contrast instead of fading into grey when the image is shrunk."""
    h, w = projection.shape[-2:]
    if max(h, w) <= cell:
        return projection
    scale = cell / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(projection[None], size=size, mode="area")[0]


def _subtitle(
    scan: FeatureScan,
    info: LayerScan,
    rf: ReceptiveField,
    window: tuple[int, int],
    rule: str,
    independent: bool,
) -> str:
    c, h, w = info.shape
    field_text = f"receptive field {rf.size[0]}x{rf.size[1]} px, stride {rf.stride[0]}"
    patch = "" if window == rf.size else f" · patches {window[0]}x{window[1]} px"
    ranked = "" if info.clip is None else f" · ranked before the clip at {info.clip:g}"
    return (
        f"{c} channels, {h}x{w} map · {field_text}{patch}{ranked} · top {scan.k} of "
        f"{scan.scanned} images · left: {rule} projections"
        + (" (the same for every image: no max pooling)" if independent else "")
        + ", right: image patches"
    )


def _layout_text(layout: TokenLayout) -> str:
    """How a token layer's output became the ranked map, in words."""
    h, w = layout.grid
    if layout.kind == "nhwc":
        return f"channels-last, a {h}x{w} grid"
    dropped = "" if not layout.prefix else f", {layout.prefix} prefix token(s) dropped"
    return f"a sequence of tokens, {h}x{w} patch tokens{dropped}"


def _median(values: Sequence[float]) -> float | None:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else None


def _token_subtitle(
    scan: FeatureScan, info: LayerScan, rf: ReceptiveField, inside: Sequence[float]
) -> str:
    c, h, w = info.shape
    share = _median(inside)
    held = "" if share is None else f", median {share:.0%} of it inside"
    return (
        f"{c} channels, {h}x{w} token grid · patches: each token's {rf.size[0]}x{rf.size[1]} px "
        f"cell (attention reaches beyond it) · top {scan.k} of {scan.scanned} "
        f"images · left: input gradient of the unit in the cell{held}, right: image patches"
    )


def _token_note(info: LayerScan, rf: ReceptiveField, inside: Sequence[float]) -> str:
    """The note of a token layer: what its patches and projections are."""
    assert info.layout is not None
    share = _median(inside)
    ranked = "" if info.source.name == info.ref.name else f", as {info.source.name}'s tokens"
    held = (
        ""
        if share is None
        else f"; the cells hold a median {share:.0%} of the gradient's L1 norm, the rest "
        "lies elsewhere in the image"
    )
    return (
        f"{info.layer} is a token layer ({_layout_text(info.layout)}{ranked}): each unit is one "
        f"channel of one patch token, and its patch is the token's own {rf.size[0]}x"
        f"{rf.size[1]} px grid cell. That is where the token sits, not a receptive field: "
        "attention lets a token depend on pixels far outside its cell (for a ViT, on the whole "
        "image). Projections are the plain "
        "gradient of the unit with respect to the input, cropped to the cell (the deconvnet "
        "and guided rules only change ReLU and max-pooling backward passes and mean nothing "
        f"through attention){held}"
    )


def _layer_notes(info: LayerScan, rule: str, image_independent: bool) -> list[str]:
    notes = []
    if info.clip is not None:
        notes.append(
            f"{info.layer} clips its input to [0, {info.clip:g}], which ties every saturated "
            f"unit; units are ranked and projected by their value before clipping (the output "
            f"of {info.source.name}, call {info.source.call})"
        )
    if image_independent:
        notes.append(
            f"the {rule} projections of each channel are the same pattern for every image: "
            "without max pooling the deconvnet does not depend on the image (its only "
            "image-dependent step is unpooling with the max-pool switches); use the guided "
            "rule (--rule guided) to see what in each image drives the unit"
        )
    return notes
