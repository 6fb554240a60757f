"""Region arithmetic of incremental occlusion: which rows and columns of each feature map a
patch can change.

Occluding a patch changes only a box of each feature map: the outputs whose receptive field
meets the changed box of the layer below. For a sliding-window layer (convolution, pooling) with
kernel ``k``, stride ``s``, dilation ``d``, padding ``p`` before, and a changed input box
``[lo, hi]`` along one axis, the changed outputs are

    lo' = max(0, ceil((lo + p - (k - 1) d) / s)),   hi' = min(H' - 1, floor((hi + p) / s))

(Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019). For one batch of windows every
layer uses one box size for all windows (the largest ``hi' - lo' + 1``); a box that would cross
the border is shifted inwards. With ``tau`` (Krypton's projective-field threshold,
approximate) a box is capped at ``ceil(tau * H')`` around its centre: changes outside the cap are
dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Box", "shift_box", "union_box", "window_box"]


@dataclass(frozen=True)
class Box:
    """Fixed-size boxes of one feature-map axis, one per window position along that axis.

    Attributes:
        lo: (P,) first row (or column) of each position's box.
        size: the common box size.
        extent: the size of the map along this axis.
        exact_lo, exact_hi: (P,) the exact changed rows (inclusive), for the FLOP bound.
    """

    lo: torch.Tensor
    size: int
    extent: int
    exact_lo: torch.Tensor
    exact_hi: torch.Tensor

    @property
    def full(self) -> bool:
        """Whether the box covers the whole axis."""
        return self.size >= self.extent


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _fix(lo: torch.Tensor, hi: torch.Tensor, extent: int, tau: float | None) -> tuple[int, Any]:
    """One box size for all positions; boxes shifted inwards; capped at ``tau * extent``."""
    size = max(1, int((hi - lo + 1).max()))
    if tau is not None:
        cap = max(1, math.ceil(tau * extent))
        if size > cap:
            centre = torch.div(lo + hi - (cap - 1), 2, rounding_mode="floor")
            return cap, centre.clamp(0, extent - cap)
    size = min(size, extent)
    return size, torch.minimum(lo, torch.full_like(lo, extent - size)).clamp_min(0)


def window_box(
    box: Box,
    kernel: int,
    stride: int,
    pad_before: int,
    pad_after: int,
    dilation: int = 1,
    tau: float | None = None,
) -> Box:
    """The box of a sliding-window layer's output (convolution, pooling) from its input's box.

    Args:
        box: the input's box along one axis.
        kernel, stride, dilation: the window along this axis.
        pad_before, pad_after: padding at the start and end of the axis.
        tau: cap of the output box as a fraction of the output size (approximate).

    Returns:
        The output box: ``lo' = max(0, ceil((lo + p - (k - 1) d) / s))``,
        ``hi' = min(H' - 1, floor((hi + p) / s))`` per position, one size for all.
    """
    span = (kernel - 1) * dilation
    extent = (box.extent + pad_before + pad_after - span - 1) // stride + 1

    def out(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = _ceil_div(lo + pad_before - span, stride).clamp_min(0)
        b = torch.div(hi + pad_before, stride, rounding_mode="floor").clamp_max(extent - 1)
        return a, torch.maximum(b, a - 1)  # an empty box where no output sees the input box

    lo, hi = out(box.lo, box.lo + box.size - 1)
    size, lo = _fix(lo, hi, extent, tau)
    elo, ehi = out(box.exact_lo, box.exact_hi)
    return Box(lo, size, extent, elo, ehi)


def union_box(boxes: Sequence[Box], tau: float | None) -> Box:
    """The box of an element-wise operation on several maps of the same size (a residual sum,
    a concatenation along channels): per position, from the lowest ``lo`` to the highest
    ``hi`` of the inputs' boxes."""
    lo = torch.stack([b.lo for b in boxes]).min(0).values
    hi = torch.stack([b.lo + b.size - 1 for b in boxes]).max(0).values
    extent = boxes[0].extent
    size, lo = _fix(lo, hi, extent, tau)
    elo = torch.stack([b.exact_lo for b in boxes]).min(0).values
    ehi = torch.stack([b.exact_hi for b in boxes]).max(0).values
    return Box(lo, size, extent, elo, ehi)


def shift_box(box: Box, by: int, extent: int) -> Box:
    """The box moved by ``by`` rows (or columns) on a map of size ``extent``: constant padding
    of ``by`` before the axis."""
    return Box(box.lo + by, box.size, extent, box.exact_lo + by, box.exact_hi + by)
