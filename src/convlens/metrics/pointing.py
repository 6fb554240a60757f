"""Localisation scores of maps against known object masks.

- :func:`pointing_game`: is the map's maximum on the object? (Zhang et al. 2016, "Top-down
  Neural Attention by Excitation Backprop", ECCV.)
- :func:`energy_share`: which share of the map's positive mass lies on the object? (The
  energy-based pointing game of Wang et al. 2020, "Score-CAM: Score-Weighted Visual
  Explanations for Convolutional Neural Networks", CVPR workshops.)
"""

from __future__ import annotations

import torch

__all__ = ["boxes_to_masks", "energy_share", "pointing_game"]


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 4) boxes ``(x0, y0, x1, y1)`` in pixels (end exclusive) to (B, H, W) boolean masks."""
    h, w = size
    rows = torch.arange(h, device=boxes.device)
    cols = torch.arange(w, device=boxes.device)
    b = boxes.to(torch.float32)
    in_y = (rows[None] >= b[:, 1:2]) & (rows[None] < b[:, 3:4])
    in_x = (cols[None] >= b[:, 0:1]) & (cols[None] < b[:, 2:3])
    return in_y[:, :, None] & in_x[:, None, :]


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 15) -> torch.Tensor:
    """Hits of the pointing game: is the map's maximum on the object?

    With ``p* = argmax_p map(p)``, image ``i`` is a hit when some pixel ``q`` of its mask has
    ``||q - p*||_2 <= tolerance``: the maximum lies on the object or within ``tolerance``
    pixels of it (Zhang et al. 2016, who use 15 px on 224-pixel images; ``tolerance=0`` asks
    for the maximum itself on the object). For several equal maxima the first in raster order
    is used. The hit rate over images is the pointing accuracy ``hits / (hits + misses)``.

    Args:
        maps: (B, H, W) maps.
        masks: (B, H, W) boolean object masks (``boxes_to_masks`` turns boxes into masks).
        tolerance: radius in pixels.

    Returns:
        (B,) booleans; ``.float().mean()`` is the hit rate.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ")
    b, h, w = maps.shape
    flat = maps.reshape(b, -1).float().argmax(dim=1)
    py, px = flat // w, flat % w
    rows = torch.arange(h, device=maps.device).view(1, h, 1)
    cols = torch.arange(w, device=maps.device).view(1, 1, w)
    near = (rows - py.view(b, 1, 1)) ** 2 + (cols - px.view(b, 1, 1)) ** 2 <= tolerance**2
    return (near & masks.to(torch.bool)).flatten(1).any(dim=1).cpu()


def energy_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive mass that lies on the object.

    ``share = sum_{p in mask} max(map(p), 0) / sum_p max(map(p), 0)``, in [0, 1]: the
    energy-based pointing game of Wang et al. 2020 (Score-CAM), which counts how much of the
    map is on the object rather than where its single maximum is. Negative values (evidence
    against the class in signed maps) are ignored, so a map's scale and sign convention do not
    matter beyond "positive means for". A map with no positive mass scores 0 (it points at
    nothing). For reference, a constant map scores the mask's share of the image area.

    Args:
        maps: (B, H, W) maps.
        masks: (B, H, W) boolean object masks.

    Returns:
        (B,) float32 shares on the CPU.

    Raises:
        ValueError: ``maps`` and ``masks`` differ in shape.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ")
    pos = maps.detach().double().clamp(min=0).flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * masks.to(torch.bool).flatten(1)).sum(dim=1)
    share = torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return share.float().cpu()
