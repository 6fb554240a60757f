"""Heatmaps as pictures: colour maps, overlays on the input, and the multi-class composite.

Everything here takes torch tensors (any device, any float dtype), never edits them, and returns
NumPy arrays or Pillow images ready to save or show.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from convlens.errors import InputError

__all__ = [
    "ColorSpec",
    "class_colors",
    "colorize",
    "dominant_class",
    "multiclass_composite",
    "overlay_map",
    "overlay_signed",
    "to_pil",
]

ColorSpec = str | tuple[int, int, int] | tuple[float, float, float]
"""A colour: a matplotlib name or hex string, RGB ints in 0-255, or RGB floats in [0, 1]."""

# Luma weights (ITU-R BT.601) used to desaturate the backdrop of the multi-class composite.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
_BACKDROP_SATURATION = 0.4
_BACKDROP_BRIGHTNESS = 0.75


def _as_map(map01: torch.Tensor, name: str = "map01") -> torch.Tensor:
    """A detached float32 CPU copy of a (H, W) map clamped to [0, 1] (NaN -> 0)."""
    if not isinstance(map01, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(map01).__name__}.")
    if map01.dim() != 2:
        raise InputError(
            f"{name} must have shape (H, W), got {tuple(map01.shape)}; "
            "select one image and target first, e.g. exp.normalized()[i, k]."
        )
    out = map01.detach().float().cpu()
    return torch.nan_to_num(out, nan=0.0).clamp(0.0, 1.0)


def _as_image(image: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy of a (3, H, W) image clamped to [0, 1]; (1, H, W) is grey."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a torch.Tensor, got {type(image).__name__}.")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise InputError(
            f"image must have shape (3, H, W) with values in [0, 1], got {tuple(image.shape)}."
        )
    out = image.detach().float().cpu()
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1)
    return out.clamp(0.0, 1.0)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (H, W) or (K, H, W) maps to ``size``, keeping values in [0, 1]."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    batched = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*maps.shape[:-2], *size).clamp(0.0, 1.0)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(
            f"alpha must be in [0, 1] (0 shows only the image, 1 only the heatmap), got {alpha}."
        )
    return alpha


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) floats in [0, 1] to an (H, W, 3) uint8 array."""
    return (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def get_cmap(cmap: str) -> mcolors.Colormap:
    """The matplotlib colour map named ``cmap``.

    Raises:
        InputError: no colour map has that name.
    """
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(
            f"unknown colour map {cmap!r}; use a matplotlib name such as 'jet', 'viridis', "
            "'inferno' or 'turbo'."
        ) from None


def colorize(map01: torch.Tensor, cmap: str = "jet") -> np.ndarray:
    """Colour a map with a matplotlib colour map.

    Args:
        map01: (H, W) map with values in [0, 1]; values outside are clamped, NaN counts as 0.
        cmap: name of a matplotlib colour map.

    Returns:
        (H, W, 3) uint8 RGB array; 0 gets the colour map's first colour, 1 its last.

    Raises:
        InputError: (a ``ValueError``) if the map is not 2-D or the colour map is unknown.
    """
    values = _as_map(map01).numpy()
    rgba = get_cmap(cmap)(values, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def to_pil(image: torch.Tensor) -> Image.Image:
    """Convert a (3, H, W) image in [0, 1] to an RGB Pillow image.

    Args:
        image: (3, H, W) (or (1, H, W) grey) tensor with values in [0, 1]; values are clamped.

    Returns:
        RGB ``PIL.Image.Image`` of size (W, H).

    Raises:
        InputError: (a ``ValueError``) if the shape is wrong.
    """
    return Image.fromarray(_to_uint8(_as_image(image)))


def overlay_map(
    map01: torch.Tensor,
    image: torch.Tensor | None,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Image.Image:
    """Blend a coloured heatmap over an image: ``(1 - alpha) * image + alpha * heat``.

    Args:
        map01: (H, W) map with values in [0, 1] (e.g. ``exp.normalized()[i, k]``). A map whose
            size differs from the image's is resized bilinearly to it.
        image: (3, H, W) image in [0, 1], or ``None`` to return the heatmap alone.
        cmap: name of a matplotlib colour map.
        alpha: opacity of the heatmap, in [0, 1].

    Returns:
        RGB ``PIL.Image.Image`` of the image's size (the map's when there is no image).

    Raises:
        InputError: (a ``ValueError``) if ``alpha`` is outside [0, 1], a shape is wrong or the
            colour map is unknown.
    """
    alpha = _check_alpha(alpha)
    heat_map = _as_map(map01)
    if image is None:
        return Image.fromarray(colorize(heat_map, cmap))
    img = _as_image(image)
    heat_map = _resize(heat_map, (int(img.shape[1]), int(img.shape[2])))
    heat = torch.from_numpy(colorize(heat_map, cmap)).permute(2, 0, 1).float() / 255.0
    blended = (1.0 - alpha) * img + alpha * heat
    return Image.fromarray(_to_uint8(blended))


SIGNED_CMAP = "RdBu_r"
"""Colour map of signed maps: red where the attribution speaks for the target, blue against."""


def overlay_signed(
    map_pm1: torch.Tensor,
    image: torch.Tensor | None,
    *,
    cmap: str = SIGNED_CMAP,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend a signed map over a muted copy of the image, zero transparent:
    ``(1 - w) backdrop + w heat`` with the weight ``w = min(1, 2 alpha) sqrt(|v|)`` per pixel
    (the square root lifts the many small values of pixel attributions into view; the backdrop
    is the image desaturated and darkened, as in :func:`multiclass_composite`, so that red and
    blue stand out).

    Signed attributions (gradient x input, integrated gradients) are evidence for (``v > 0``)
    and against (``v < 0``) the target; a diverging colour map centred on zero keeps the two
    apart, and the image stays visible where the map is near zero (a sequential map of the
    min-max rescaled values would paint the zeros mid-scale, e.g. green in ``jet``).

    Args:
        map_pm1: (H, W) map with values in [-1, 1] (e.g. ``exp.signed()[i, k]``); values
            outside are clamped, NaN counts as 0. Resized bilinearly to the image.
        image: (3, H, W) image in [0, 1], or ``None`` to return the coloured map alone.
        cmap: a diverging matplotlib colour map (its middle is zero).
        alpha: opacity, in [0, 1]; the largest magnitudes are opaque from 0.5 on.

    Returns and raises as :func:`overlay_map`.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(map_pm1, torch.Tensor) or map_pm1.dim() != 2:
        raise InputError("map_pm1 must be a (H, W) tensor, e.g. exp.signed()[i, k].")
    values = torch.nan_to_num(map_pm1.detach().float().cpu(), nan=0.0).clamp(-1.0, 1.0)
    if image is None:
        return Image.fromarray(colorize((values + 1) / 2, cmap))
    img = _as_image(image)
    half = _resize((values + 1) / 2, (int(img.shape[1]), int(img.shape[2])))  # 0 -> 0.5
    heat = torch.from_numpy(colorize(half, cmap)).permute(2, 0, 1).float() / 255.0
    weight = min(1.0, 2.0 * alpha) * (2 * half - 1).abs().sqrt()
    return Image.fromarray(_to_uint8((1.0 - weight) * _backdrop(img) + weight * heat))


def class_colors(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct RGB colours, one per class.

    Uses matplotlib's ``tab10`` for up to 10 classes, ``tab20`` up to 20, evenly spaced hues
    beyond.

    Args:
        k: number of colours, >= 0.

    Returns:
        List of ``k`` RGB tuples of ints in 0-255.

    Raises:
        InputError: (a ``ValueError``) if ``k`` is negative.
    """
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}.")
    if k <= 10:
        rgbs = matplotlib.colormaps["tab10"].colors[:k]
    elif k <= 20:
        rgbs = matplotlib.colormaps["tab20"].colors[:k]
    else:
        hsv = matplotlib.colormaps["hsv"]
        rgbs = [hsv(j / k)[:3] for j in range(k)]
    return [tuple(round(255 * c) for c in rgb[:3]) for rgb in rgbs]  # type: ignore[misc]


def _rgb01(color: ColorSpec) -> tuple[float, float, float]:
    """A colour spec as RGB floats in [0, 1]."""
    if isinstance(color, str):
        try:
            return mcolors.to_rgb(color)
        except ValueError:
            raise InputError(
                f"unknown colour {color!r}; use a matplotlib name or '#rrggbb'."
            ) from None
    values = tuple(color)
    if len(values) != 3:
        raise InputError(f"a colour must have 3 components (R, G, B), got {color!r}.")
    if all(isinstance(v, (int, np.integer)) for v in values):
        if not all(0 <= v <= 255 for v in values):
            raise InputError(f"integer colours must lie in 0-255, got {color!r}.")
        return tuple(v / 255.0 for v in values)  # type: ignore[return-value]
    if not all(0.0 <= float(v) <= 1.0 for v in values):
        raise InputError(f"float colours must lie in [0, 1], got {color!r}.")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _backdrop(image: torch.Tensor) -> torch.Tensor:
    """The image desaturated to 40 % and dimmed to 75 %, so class colours stand out on it."""
    grey = (image * _LUMA).sum(dim=0, keepdim=True)
    mixed = _BACKDROP_SATURATION * image + (1.0 - _BACKDROP_SATURATION) * grey
    return (mixed * _BACKDROP_BRIGHTNESS).clamp(0.0, 1.0)


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}.")
    return threshold


def _as_maps(maps01: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy of (K, H, W) maps clamped to [0, 1] (NaN -> 0)."""
    if not isinstance(maps01, torch.Tensor) or maps01.dim() != 3 or maps01.shape[0] < 1:
        shape = tuple(maps01.shape) if isinstance(maps01, torch.Tensor) else type(maps01).__name__
        raise InputError(
            f"maps01 must have shape (K, H, W) with K >= 1, got {shape}; "
            "use exp.normalized()[i] for image i."
        )
    return torch.nan_to_num(maps01.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0)


def dominant_class(maps01: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Index of the class whose map is highest at each pixel, or -1 where all are below threshold.

    Args:
        maps01: (K, H, W) maps with values in [0, 1].
        threshold: a pixel belongs to no class when its highest value is below it.

    Returns:
        (H, W) int64 tensor on the CPU with values in ``-1 .. K-1``.

    Raises:
        InputError: (a ``ValueError``) if the maps are not (K, H, W) or threshold is outside [0, 1].
    """
    maps = _as_maps(maps01)
    threshold = _check_threshold(threshold)
    value, winner = maps.max(dim=0)
    return torch.where(value >= threshold, winner, torch.full_like(winner, -1))


def multiclass_composite(
    maps01: torch.Tensor,
    image: torch.Tensor | None,
    colors: Sequence[ColorSpec] | None = None,
    alpha: float = 0.6,
    threshold: float = 0.2,
) -> Image.Image:
    """Combine K class maps into one picture, each class in its own colour.

    At each pixel the class whose map is highest wins; its colour is laid over the backdrop with
    opacity ``alpha * value``, or not at all where ``value < threshold``. The backdrop is the image
    desaturated to 40 % and dimmed to 75 % (black when there is no image).

    Args:
        maps01: (K, H, W) maps with values in [0, 1], e.g. ``exp.normalized()[i]``; resized
            bilinearly to the image when sizes differ.
        image: (3, H, W) image in [0, 1], or ``None``.
        colors: one colour per class (matplotlib names, RGB ints in 0-255 or RGB floats in
            [0, 1]); default :func:`class_colors`.
        alpha: opacity of a class colour where its map is 1, in [0, 1].
        threshold: map values below it leave the backdrop unchanged, in [0, 1].

    Returns:
        RGB ``PIL.Image.Image`` of the image's size (the maps' when there is no image).

    Raises:
        InputError: (a ``ValueError``) if shapes, colours, ``alpha`` or ``threshold`` are invalid.
    """
    alpha = _check_alpha(alpha)
    threshold = _check_threshold(threshold)
    maps = _as_maps(maps01)
    num_classes = int(maps.shape[0])
    palette = class_colors(num_classes) if colors is None else list(colors)
    if len(palette) < num_classes:
        raise InputError(f"need {num_classes} colours, one per map, got {len(palette)}.")
    rgb = torch.tensor([_rgb01(c) for c in palette[:num_classes]], dtype=torch.float32)

    if image is None:
        size = (int(maps.shape[1]), int(maps.shape[2]))
        base = torch.zeros(3, *size)
    else:
        img = _as_image(image)
        size = (int(img.shape[1]), int(img.shape[2]))
        base = _backdrop(img)
        maps = _resize(maps, size)

    value, winner = maps.max(dim=0)
    opacity = torch.where(value >= threshold, alpha * value, torch.zeros_like(value))
    color = rgb[winner].permute(2, 0, 1)  # (3, H, W)
    out = (1.0 - opacity) * base + opacity * color
    return Image.fromarray(_to_uint8(out))


def rgb_attribution(attribution: torch.Tensor, percentile: float = 99.0) -> Image.Image:
    """A signed (3, H, W) pixel-space attribution as an RGB picture centred on grey.

    The usual display of deconvnet and guided-backpropagation results (Zeiler & Fergus 2014;
    Springenberg et al. 2015): ``0.5 + a / (2 q)`` with ``q`` the ``percentile`` of ``|a|``,
    clipped to [0, 1]. Zero attribution is mid-grey.

    Args:
        attribution: (3, H, W) tensor.
        percentile: the magnitude mapped to full saturation.
    """
    a = attribution.detach().float().cpu()
    if a.dim() != 3 or a.shape[0] != 3:
        raise InputError(f"expected a (3, H, W) attribution, got shape {tuple(a.shape)}")
    q = torch.quantile(a.abs().flatten(), percentile / 100.0).clamp_min(1e-12)
    return to_pil((0.5 + a / (2 * q)).clamp(0.0, 1.0))
