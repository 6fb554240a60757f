"""Random, differentiable image transforms applied before every forward pass.

Optimising an image through random translations, scalings and rotations ("transformation
robustness", Olah et al. 2017; jitter in Mordvintsev et al. 2015) removes the high-frequency
patterns that excite a network only at one exact pixel alignment. Every transform draws its own
parameters for each image of the batch from the ``torch.Generator`` it is given, so a run is
reproducible for a seed, and every transform is differentiable with respect to the image.

All transforms take and return (N, C, H, W) pixel images (values near [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Compose", "RandomTransform", "Transform", "random_roll", "standard_transforms"]


class Transform:
    """Base class: ``transform(x, generator) -> x'``."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Compose(Transform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __len__(self) -> int:
        return len(self.transforms)


class RandomTransform(Transform):
    """Lucid's standard transforms, fused into one bilinear resampling per image.

    The chain (Olah et al. 2017) is: pad every side by ``pad`` pixels (grey or reflection),
    crop at a random offset of up to ``jitter`` pixels, zoom by a random factor in ``scale`` and
    rotate by a random angle in ``[-rotate, rotate]`` degrees about the centre, crop again at a
    random offset of up to ``final_jitter`` pixels and, when ``size`` is given, resize to it.
    All steps are affine maps of the pixel coordinates, so their composition is computed per
    image and applied with one ``F.grid_sample`` (cheaper than five resamplings, and the
    translations need not be whole pixels). Without ``size`` the output is
    ``H + 2 pad - jitter - final_jitter`` pixels high (and likewise wide).

    Args:
        pad: padding width (pixels).
        pad_mode: ``"constant"`` (the value ``fill``) or ``"reflect"``.
        jitter: largest first translation (pixels).
        scale: (low, high) zoom factors, drawn uniformly.
        rotate: largest rotation (degrees).
        final_jitter: largest second translation (pixels).
        size: output (height, width), or ``None``.
        fill: the constant padding value.
    """

    def __init__(
        self,
        *,
        pad: int = 16,
        pad_mode: Literal["constant", "reflect"] = "constant",
        jitter: int = 8,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: float = 10.0,
        final_jitter: int = 4,
        size: tuple[int, int] | None = None,
        fill: float = 0.5,
    ) -> None:
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', not {pad_mode!r}")
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        if min(pad, jitter, final_jitter) < 0 or rotate < 0:
            raise ValueError("pad, jitter, final_jitter and rotate must not be negative")
        self.pad, self.pad_mode, self.jitter = int(pad), pad_mode, int(jitter)
        self.scale, self.rotate, self.final_jitter = (lo, hi), float(rotate), int(final_jitter)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.fill = float(fill)

    @property
    def identity(self) -> bool:
        """True when the transform changes nothing (and is skipped)."""
        return (
            self.pad == self.jitter == self.final_jitter == 0
            and self.scale == (1.0, 1.0)
            and self.rotate == 0.0
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.identity and (self.size is None or self.size == (h, w)):
            return x
        crop = 2 * self.pad - self.jitter - self.final_jitter
        size2 = (h + crop, w + crop)  # size after the second crop
        if min(size2) < 1:
            raise ValueError(f"jitter is too large for a {h}x{w} image padded by {self.pad}")
        out_h, out_w = self.size or size2

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        def offsets(d: int) -> torch.Tensor:  # (N, 2) crop offsets (x, y) about the centre
            return torch.randint(0, d + 1, (n, 2), generator=generator).double() - d / 2

        t1, s = offsets(self.jitter), uniform(*self.scale)
        a = uniform(-self.rotate, self.rotate) * (math.pi / 180)
        t2 = offsets(self.final_jitter)
        # Pixel coordinates about the centre, from the output back to the input:
        # q_in = A (K q_out + t2) + t1, A = R(-a) / s, K = size2 / out_size (the resize).
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        a_mat = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
        k = torch.tensor([size2[1] / out_w, size2[0] / out_h], dtype=torch.float64)
        lin = a_mat * k  # A K: column j scaled by k_j
        shift = torch.einsum("nij,nj->ni", a_mat, t2) + t1
        # In grid_sample's normalised coordinates (align_corners=False), q = n * half size:
        # theta = D_in^-1 [A K D_out | shift].
        half_in = torch.tensor([w / 2, h / 2], dtype=torch.float64)
        half_out = torch.tensor([out_w / 2, out_h / 2], dtype=torch.float64)
        lin = lin * half_out[None, None, :] / half_in[None, :, None]
        theta = torch.cat([lin, (shift / half_in)[..., None]], dim=2)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
        if self.pad_mode == "reflect":
            return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
        out = F.grid_sample(x - self.fill, grid, padding_mode="zeros", align_corners=False)
        return out + self.fill


def standard_transforms(
    *,
    pad: int = 16,
    pad_mode: Literal["constant", "reflect"] = "constant",
    jitter: int = 8,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate: float = 10.0,
    final_jitter: int = 4,
    size: tuple[int, int] | None = None,
) -> RandomTransform:
    """Pad, jitter, random scale and rotation, jitter again, and optionally resize to ``size``
    (the Lucid recipe of Olah et al. 2017) as one :class:`RandomTransform`."""
    return RandomTransform(
        pad=pad,
        pad_mode=pad_mode,
        jitter=jitter,
        scale=scale,
        rotate=rotate,
        final_jitter=final_jitter,
        size=size,
    )


def random_roll(
    x: torch.Tensor, max_shift: int, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Roll the whole batch by a random (dy, dx) in ``[-max_shift, max_shift]`` (DeepDream's
    jitter: a circular shift, undone after the step with ``torch.roll(x, (-dy, -dx))``)."""
    if max_shift <= 0:
        return x, (0, 0)
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1)), (dy, dx)
