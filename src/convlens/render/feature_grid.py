"""The feature-browser figure: per channel, deconvnet projections beside the image patches.

The layout follows Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional
Networks", Fig. 2): for each feature map, its top-k activations projected into pixel space in a
small grid (3x3 for k = 9) and, beside it, the grid of the image patches under those activations'
receptive fields. Composed with Pillow at exact pixel sizes (one tile per cell, no resampling
by a plotting library), so that small patches of early layers stay sharp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from convlens.errors import InputError

__all__ = ["ChannelTiles", "feature_grid", "fit_tile"]

_BACKGROUND = (255, 255, 255)
_SEPARATOR = (200, 200, 200)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_EMPTY = (238, 238, 238)
_PROJECTION_FILL = (128, 128, 128)  # zero of rgb_attribution
_PATCH_FILL = (238, 238, 238)

_GAP = 1  # between tiles of one k-grid
_PAIR_GAP = 6  # between the projection grid and the patch grid
_PAD = 8  # around a channel block
_LABEL_SIZE = 13
_TITLE_SIZE = 16


@dataclass(frozen=True)
class ChannelTiles:
    """What the figure shows for one channel.

    Attributes:
        label: main label, e.g. ``"channel 12"``.
        projections: up to ``k`` pixel-space projections (RGB images, any size), strongest first.
        patches: the matching image patches, same order and length as ``projections``.
        note: smaller text after the label, e.g. ``"max 5.43"``.
    """

    label: str
    projections: Sequence[Image.Image]
    patches: Sequence[Image.Image]
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.projections) != len(self.patches):
            raise InputError(
                f"channel {self.label!r} has {len(self.projections)} projections but "
                f"{len(self.patches)} patches; they must pair up"
            )


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's bundled fonts; Pillow's default font if unavailable."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True
        )
        return ImageFont.truetype(path, size)
    except (OSError, ValueError, ImportError):
        return ImageFont.load_default()


def fit_tile(
    image: Image.Image, cell: int, fill: tuple[int, int, int] = _PATCH_FILL
) -> Image.Image:
    """Scale an image to fit a ``cell`` x ``cell`` square, aspect ratio kept, centred on ``fill``.

    Small crops are enlarged with bicubic resampling, large ones reduced with Lanczos.

    Args:
        image: any RGB (or convertible) image.
        cell: side of the square in pixels.
        fill: colour of the bars left where the image is not square.

    Returns:
        A ``cell`` x ``cell`` RGB image.
    """
    img = image.convert("RGB")
    w, h = img.size
    scale = cell / max(w, h, 1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != img.size:
        method = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
        img = img.resize(size, method)
    if size == (cell, cell):
        return img
    out = Image.new("RGB", (cell, cell), fill)
    out.paste(img, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return out


def _grid_shape(k: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols), cols


def _text_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + 2


def _wrap(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, sep: str = " · "
) -> list[str]:
    """Split ``text`` at ``sep`` into lines no wider than ``width`` (where possible)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for part in text.split(sep):
        if lines and draw.textlength(lines[-1] + sep + part, font=font) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def feature_grid(
    channels: Sequence[ChannelTiles],
    *,
    k: int | None = None,
    cell: int = 64,
    columns: int = 4,
    title: str | None = None,
    subtitle: str | None = None,
) -> Image.Image:
    """Compose the Zeiler & Fergus figure for one layer.

    Each channel is a block: its label on top, then a ``rows x cols`` grid of projections
    (``cols = ceil(sqrt(k))``) and, to its right, the same grid of image patches. Blocks are laid
    out ``columns`` per row and separated by thin grey lines. Tiles are fitted into square cells
    (:func:`fit_tile`); slots without an example stay empty (light grey).

    Args:
        channels: one :class:`ChannelTiles` per channel, in display order.
        k: slots per grid; by default the largest number of examples of any channel.
        cell: side of one tile in pixels.
        columns: channel blocks per row (fewer when there are fewer channels).
        title: bold line at the top (e.g. the layer name).
        subtitle: smaller line under the title (e.g. the receptive field).

    Returns:
        The figure as an RGB image.

    Raises:
        InputError: no channels, or ``cell``/``columns``/``k`` not positive.
    """
    if not channels:
        raise InputError("feature_grid needs at least one channel")
    if cell < 4 or columns < 1:
        raise InputError(f"cell must be >= 4 and columns >= 1, got cell={cell}, columns={columns}")
    k = max(len(c.projections) for c in channels) if k is None else k
    k = max(k, 1)
    rows, cols = _grid_shape(k)
    label_font, title_font, note_font = _font(_LABEL_SIZE), _font(_TITLE_SIZE), _font(11)
    label_h = _text_height(label_font) + 4
    grid_w = cols * cell + (cols - 1) * _GAP
    grid_h = rows * cell + (rows - 1) * _GAP
    block_w = 2 * _PAD + 2 * grid_w + _PAIR_GAP
    block_h = 2 * _PAD + label_h + grid_h
    ncol = min(columns, len(channels))
    nrow = math.ceil(len(channels) / ncol)

    width = ncol * block_w + (ncol - 1)
    sub_lines = _wrap(subtitle, note_font, width - 2 * _PAD) if subtitle else []
    header = 0
    if title:
        header += _text_height(title_font) + 6
    header += len(sub_lines) * (_text_height(note_font) + 3)
    if header:
        header += _PAD
    height = header + nrow * block_h + (nrow - 1)
    fig = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(fig)

    y_text = _PAD
    if title:
        draw.text((_PAD, y_text), title, fill=_TEXT, font=title_font)
        y_text += _text_height(title_font) + 6
    for line in sub_lines:
        draw.text((_PAD, y_text), line, fill=_MUTED, font=note_font)
        y_text += _text_height(note_font) + 3

    for r in range(1, nrow):  # separators between block rows
        y = header + r * block_h + (r - 1)
        draw.line([(0, y), (width, y)], fill=_SEPARATOR, width=1)
    for c in range(1, ncol):
        x = c * block_w + (c - 1)
        draw.line([(x, header), (x, height)], fill=_SEPARATOR, width=1)
    if header:
        draw.line([(0, header - 1), (width, header - 1)], fill=_SEPARATOR, width=1)

    for i, ch in enumerate(channels):
        bx = (i % ncol) * (block_w + 1) + _PAD
        by = header + (i // ncol) * (block_h + 1) + _PAD
        draw.text((bx, by), ch.label, fill=_TEXT, font=label_font)
        if ch.note:
            lw = draw.textlength(ch.label + "  ", font=label_font)
            draw.text((bx + lw, by + 2), ch.note, fill=_MUTED, font=note_font)
        gy = by + label_h
        for half, (tiles, fill) in enumerate(
            ((ch.projections, _PROJECTION_FILL), (ch.patches, _PATCH_FILL))
        ):
            gx = bx + half * (grid_w + _PAIR_GAP)
            for j in range(rows * cols):
                if j >= k:
                    break
                x = gx + (j % cols) * (cell + _GAP)
                y = gy + (j // cols) * (cell + _GAP)
                if j < len(tiles):
                    fig.paste(fit_tile(tiles[j], cell, fill), (x, y))
                else:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_EMPTY)
    return fig
