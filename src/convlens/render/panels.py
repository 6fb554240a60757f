"""Matplotlib panels of explanations: one method's targets, methods side by side, multi-class view.

Figures are built with the object API (``matplotlib.figure.Figure`` on an Agg canvas), never with
``pyplot``: nothing is registered globally, so they work headless and are freed like any object.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from convlens.console import plot_label
from convlens.errors import InputError
from convlens.render.overlay import (
    SIGNED_CMAP,
    class_colors,
    dominant_class,
    multiclass_composite,
    overlay_map,
    overlay_signed,
    to_pil,
)

if TYPE_CHECKING:
    from convlens.result import Explanation

__all__ = [
    "explanation_figure",
    "multiclass_figure",
    "save_figure",
    "short_name",
    "side_by_side_figure",
]

PANEL_INCHES = 3.0
"""Width and height of one image panel."""
_TITLE_SIZE = 10
_SUBTITLE_SIZE = 9
_HIGHLIGHT = "tab:orange"
_MUTED = "0.72"


def short_name(name: str, max_len: int = 24) -> str:
    """Shorten a class name for a plot label.

    Keeps the text before the first comma (``"tabby, tabby cat"`` -> ``"tabby"``) and truncates
    it to ``max_len`` characters with an ellipsis; ``$`` signs are escaped so that matplotlib
    draws them instead of reading math (:func:`convlens.console.plot_label`).

    Args:
        name: class name.
        max_len: longest result, >= 2.

    Returns:
        The short name.
    """
    head = name.split(",", 1)[0].strip() or name.strip()
    if len(head) > max_len:
        head = head[: max_len - 1].rstrip() + "…"
    return plot_label(head)


def _new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _image_axes(ax: Axes) -> None:
    """No ticks and no frame on an axes that shows a picture."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _check_index(exp: Explanation, i: int, what: str = "explanation") -> None:
    if not -exp.batch_size <= i < exp.batch_size:
        raise InputError(
            f"image index {i} is out of range for the {what}, which holds "
            f"{exp.batch_size} image(s)."
        )


def _rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)


def _prob(t: torch.Tensor) -> float:
    return float(t.detach().float().cpu())


def _colorbar(
    fig: Figure,
    cmap: str,
    *,
    axes: list[Axes] | None = None,
    cax: Axes | None = None,
    signed: bool = False,
) -> None:
    """One 'low -> high' colour bar (``signed``: 'against -> 0 -> for' in the signed colour
    map): beside ``axes``, or horizontal in ``cax``."""
    if signed:
        cmap = SIGNED_CMAP if cmap == "jet" else cmap
        mappable = ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=cmap)
    else:
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    if cax is not None:
        bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    else:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.75, aspect=25, pad=0.02)
    if signed:
        bar.set_ticks([-1.0, 0.0, 1.0], labels=["against", "0", "for"])
    else:
        bar.set_ticks([0.0, 1.0], labels=["low", "high"])
    bar.ax.tick_params(labelsize=8)
    bar.outline.set_visible(False)


def explanation_figure(
    exp: Explanation, i: int = 0, *, cmap: str = "jet", alpha: float = 0.5
) -> Figure:
    """The input image, then one overlay per target of image ``i``.

    Each overlay is titled ``"name (p=0.87)"``; the figure title names the method and layer.
    Without ``exp.images`` the input column is left out and the heatmaps are shown alone.

    Args:
        exp: the explanation.
        i: index of the image in the batch.
        cmap: matplotlib colour map of the heatmaps.
        alpha: opacity of the heatmaps over the image, in [0, 1].

    Returns:
        A matplotlib ``Figure`` (object API, not registered with pyplot).

    Raises:
        InputError: (a ``ValueError``) if ``i`` is out of range or ``alpha`` invalid.
    """
    _check_index(exp, i)
    image = None if exp.images is None else exp.images[i]
    num_targets = exp.num_targets
    ncols = num_targets + (image is not None)
    fig = _new_figure(PANEL_INCHES * ncols + 0.6, PANEL_INCHES + 0.6)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        _image_axes(ax)
    if image is not None:
        axes[0].imshow(np.asarray(to_pil(image)))
        axes[0].set_title("input", fontsize=_TITLE_SIZE)
    overlay_axes = axes[-num_targets:]
    for k, ax in enumerate(overlay_axes):
        # Drawn by exp.overlay, which knows each method's display (heatmap or RGB).
        ax.imshow(np.asarray(exp.overlay(i, k, cmap=cmap, alpha=alpha)))
        name = short_name(exp.target_name(i, k))
        ax.set_title(f"{name} (p={_prob(exp.probs[i, k]):.2f})", fontsize=_TITLE_SIZE)
    _colorbar(fig, cmap, axes=overlay_axes, signed=exp.is_signed)
    suptitle = exp.method if exp.layer is None else f"{exp.method} · layer {exp.layer}"
    suptitle = plot_label(suptitle)
    fig.suptitle(suptitle, fontsize=_TITLE_SIZE + 1, fontweight="bold")
    return fig


def _top5_axes(ax: Axes, exp: Explanation, i: int, highlight: set[int]) -> None:
    """Horizontal bars of the model's top predictions for image ``i``; targets highlighted."""
    indices = [int(v) for v in exp.top_indices[i].detach().cpu().tolist()]
    probs = [float(v) for v in exp.top_probs[i].detach().float().cpu().tolist()]
    if exp.top_names is not None:
        names = [short_name(n) for n in exp.top_names[i]]
    else:
        names = [f"class {idx}" for idx in indices]
    colors = [_HIGHLIGHT if idx in highlight else _MUTED for idx in indices]
    rows = np.arange(len(indices))
    ax.barh(rows, probs, color=colors, height=0.7)
    ax.set_yticks(rows, labels=names, fontsize=_SUBTITLE_SIZE)
    for label, idx in zip(ax.get_yticklabels(), indices, strict=True):
        if idx in highlight:
            label.set_fontweight("bold")
    ax.invert_yaxis()
    for row, p in zip(rows, probs, strict=True):
        ax.text(p + 0.02, row, f"{p:.2f}", va="center", fontsize=8)
    ax.set_xlim(0.0, 1.2)
    ax.set_xticks([0.0, 0.5, 1.0])
    ax.tick_params(axis="x", labelsize=8)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"top-{len(indices)} predictions", fontsize=_TITLE_SIZE)


def side_by_side_figure(
    explanations: Mapping[str, Explanation],
    i: int = 0,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """Several methods on one image in a row, with the model's top-5 predictions.

    Columns: the input image (from the first explanation that has ``images``), one overlay per
    method (title the method, subtitle the name of target ``k = 0``), and a bar chart of the first
    explanation's top-5 predictions with the explained target(s) highlighted.

    Args:
        explanations: method label -> explanation of the same batch of images.
        i: index of the image in the batch.
        cmap: matplotlib colour map of the heatmaps.
        alpha: opacity of the heatmaps over the image, in [0, 1].

    Returns:
        A matplotlib ``Figure`` (object API, not registered with pyplot).

    Raises:
        InputError: (a ``ValueError``) if ``explanations`` is empty, ``i`` is out of range or
            ``alpha`` invalid.
    """
    if not explanations:
        raise InputError("side_by_side_figure needs at least one explanation, got none.")
    items = list(explanations.items())
    for label, exp in items:
        _check_index(exp, i, f"explanation {label!r}")
    first = items[0][1]
    image = next((e.images[i] for _, e in items if e.images is not None), None)

    ncols = len(items) + (image is not None) + 1
    first_method = ncols - 1 - len(items)
    fig = _new_figure(PANEL_INCHES * (ncols - 1) + 3.6, PANEL_INCHES + 1.0)
    # Row 0: pictures and the bar chart, aligned; row 1: the colour bar under the methods.
    grid = fig.add_gridspec(
        2, ncols, width_ratios=[1.0] * (ncols - 1) + [1.1], height_ratios=[1.0, 0.04]
    )
    axes = [fig.add_subplot(grid[0, c]) for c in range(ncols)]
    for ax in axes[:-1]:
        _image_axes(ax)
    if image is not None:
        axes[0].imshow(np.asarray(to_pil(image)))
        axes[0].set_title("input", fontsize=_TITLE_SIZE, pad=16)
    method_axes = axes[first_method:-1]
    signed = [exp.is_signed for _, exp in items]
    for ax, (label, exp) in zip(method_axes, items, strict=True):
        if exp.images is None and image is not None:
            if exp.is_signed:
                signed_cmap = SIGNED_CMAP if cmap == "jet" else cmap
                pic = overlay_signed(exp.signed()[i, 0], image, cmap=signed_cmap, alpha=alpha)
            else:
                pic = overlay_map(exp.normalized()[i, 0], image, cmap=cmap, alpha=alpha)
            ax.imshow(np.asarray(pic))
        else:
            ax.imshow(np.asarray(exp.overlay(i, 0, cmap=cmap, alpha=alpha)))
        if exp.is_signed and not all(signed):  # the colour bar below is not for this one
            key = "red: for, blue: against" if cmap == "jet" else "signed: top of the scale for"
            ax.set_xlabel(key, fontsize=_SUBTITLE_SIZE, color="0.35")
        ax.set_title(label, fontsize=_TITLE_SIZE + 1, fontweight="bold", pad=16)
        ax.annotate(
            short_name(exp.target_name(i, 0)),
            xy=(0.5, 1.0),
            xycoords="axes fraction",
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=_SUBTITLE_SIZE,
            color="0.35",
        )
    _colorbar(fig, cmap, cax=fig.add_subplot(grid[1, first_method : ncols - 1]), signed=all(signed))
    highlight = {int(e.targets[i, 0]) for _, e in items}
    _top5_axes(axes[-1], first, i, highlight)
    return fig


def multiclass_figure(
    exp: Explanation, i: int = 0, *, alpha: float = 0.6, threshold: float = 0.2
) -> Figure:
    """The image and one composite of all K targets of image ``i``, each in its own colour.

    See :func:`convlens.render.overlay.multiclass_composite`. A legend gives each colour's class
    name and probability.

    Args:
        exp: the explanation, typically of the top-k classes (``exp.num_targets == k``).
        i: index of the image in the batch.
        alpha: opacity of a class colour where its map is 1, in [0, 1].
        threshold: normalised map values below it are not coloured.

    Returns:
        A matplotlib ``Figure`` (object API, not registered with pyplot).

    Raises:
        InputError: (a ``ValueError``) if ``i`` is out of range or ``alpha``/``threshold``
            invalid.
    """
    _check_index(exp, i)
    image = None if exp.images is None else exp.images[i]
    num_targets = exp.num_targets
    colors = class_colors(num_targets)
    ncols = 1 + (image is not None)
    fig = _new_figure(PANEL_INCHES * ncols + 2.4, PANEL_INCHES + 0.6)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        _image_axes(ax)
    if image is not None:
        axes[0].imshow(np.asarray(to_pil(image)))
        axes[0].set_title("input", fontsize=_TITLE_SIZE)
    # signed maps: the evidence for each class (a min-max rescale would put their zeros
    # mid-scale, above the threshold everywhere)
    maps = exp.signed()[i].clamp_min(0.0) if exp.is_signed else exp.normalized()[i]
    composite = multiclass_composite(maps, image, colors, alpha=alpha, threshold=threshold)
    axes[-1].imshow(np.asarray(composite))
    # Outline each class's region: where its map is the highest and above the threshold.
    owner = dominant_class(maps, threshold).numpy()
    limits = axes[-1].get_xlim(), axes[-1].get_ylim()
    for k, rgb in enumerate(colors):
        region = (owner == k).astype(np.float32)
        if 0.0 < region.mean() < 1.0:  # contour() warns on a constant array
            axes[-1].contour(region, levels=[0.5], colors=[_rgb01(rgb)], linewidths=1.2)
    axes[-1].set_xlim(limits[0])  # contour() autoscales to pixel centres and would crop
    axes[-1].set_ylim(limits[1])
    axes[-1].set_title(f"{exp.method}: top-{num_targets} classes", fontsize=_TITLE_SIZE)
    handles = [
        Patch(
            facecolor=_rgb01(rgb),
            edgecolor="none",
            label=f"{short_name(exp.target_name(i, k))} (p={_prob(exp.probs[i, k]):.2f})",
        )
        for k, rgb in enumerate(colors)
    ]
    fig.legend(
        handles=handles,
        loc="outside right center",
        frameon=False,
        fontsize=_SUBTITLE_SIZE,
        handlelength=1.2,
        handleheight=1.2,
    )
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a figure as a PNG file, creating parent folders.

    Args:
        fig: the figure.
        path: destination; ``.png`` is appended when it has no suffix.
        dpi: resolution.

    Returns:
        The path written.

    The file is written atomically (:func:`~convlens.atomic.atomic_path`): it appears whole
    or not at all.

    Raises:
        InputError: (a ``ValueError``) if ``path`` has a suffix other than ``.png``.
        OutputError: the file cannot be written (full disk, permissions).
    """
    from convlens.atomic import save_matplotlib

    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise InputError(f"save_figure writes PNG files; give a '.png' path, got {str(path)!r}.")
    return save_matplotlib(fig, path, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
