"""The pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop")."""

from __future__ import annotations

import torch

__all__ = ["boxes_to_masks", "pointing_game"]


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

    A hit when some pixel within ``tolerance`` pixels (Euclidean) of the map's maximum lies in
    the object's mask (the paper uses 15 px). For several equal maxima the first in raster order
    is used.

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
