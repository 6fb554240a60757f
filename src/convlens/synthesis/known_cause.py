"""Known-cause images: the class is decided by one object at a known place.

A map is only worth something if it points at what caused the prediction. On natural photos the
cause is unknown; here it is known by construction. Each image shows one *object*, a shape
whose kind is the class (disc, square, triangle, cross, ring), drawn at a random place and size
on clutter: a smooth random colour background, pixel noise and small *distractor* shapes. The
distractors are drawn from the same shapes and colours for every class, with their kind, colour,
place and size drawn independently of the class, so nothing but the object tells the class
apart: for a fixed seed, changing the labels changes only the pixels under the object (see
:func:`known_cause_batch`'s ``labels``). Distractors are smaller than the object and never
overlap its box.

The generator is pure torch, vectorised over the batch, and deterministic per seed (one CPU
:class:`torch.Generator`; the random draws do not depend on the labels). 64 x 64 images by
default; a batch of 256 takes about 0.15 s on one CPU core.

Example::

    from convlens.synthesis.known_cause import known_cause_batch

    batch = known_cause_batch(256, seed=1)
    batch.images.shape    # (256, 3, 64, 64) in [0, 1]
    batch.labels.shape    # (256,): class i is the shape SHAPES[i]
    batch.masks.shape     # (256, 64, 64): the object's pixels

Used by ``benchmarks/bench_known_cause.py`` to score every method with the pointing game and
the energy share inside the object (:mod:`convlens.metrics.pointing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SHAPES", "KnownCauseBatch", "known_cause_batch", "shape_masks"]

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring")
"""The shapes, in class order: class ``i`` is ``SHAPES[i]``."""

_PALETTE = torch.tensor(
    [
        [0.95, 0.15, 0.15],
        [0.15, 0.85, 0.20],
        [0.20, 0.35, 0.95],
        [0.95, 0.85, 0.10],
        [0.90, 0.20, 0.90],
        [0.10, 0.90, 0.90],
        [1.00, 1.00, 1.00],
        [0.05, 0.05, 0.05],
    ]
)
"""Saturated colours for objects and distractors alike (the colour never tells the class)."""


@dataclass
class KnownCauseBatch:
    """Images whose class is decided by one object.

    Attributes:
        images: (B, 3, H, W) float32 images in [0, 1].
        labels: (B,) int64 classes; class ``i`` is the shape ``SHAPES[i]``.
        masks: (B, H, W) bool, the object's pixels.
        boxes: (B, 4) int64 ``(x0, y0, x1, y1)`` boxes of the object's square cell (end
            exclusive, as :func:`convlens.metrics.boxes_to_masks` takes them); the mask lies
            inside it.
        distractor_masks: (B, H, W) bool, the distractors' pixels.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    distractor_masks: torch.Tensor


def shape_masks(
    kinds: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int
) -> torch.Tensor:
    """Masks of shapes on a ``size`` x ``size`` grid, all tensors of one shape ``S``.

    Pixel centres ``(x + 0.5, y + 0.5)`` are tested in coordinates ``u = (x + 0.5 - cx) / r``,
    ``v = (y + 0.5 - cy) / r``: disc ``u² + v² <= 1``; square ``max(|u|, |v|) <= 0.85``; triangle
    (apex up) ``v <= 0.75`` and ``v >= -1 + 1.75 |u| / 0.95``; cross ``min(|u|, |v|) <= 0.3`` and
    ``max(|u|, |v|) <= 1``; ring ``0.55 <= sqrt(u² + v²) <= 1``. Every shape lies in the square
    of half-side ``r`` around its centre.

    Args:
        kinds: int indices into :data:`SHAPES`.
        cx, cy: centres in pixels (x to the right, y down).
        r: half-sizes in pixels.
        size: side of the image.

    Returns:
        ``S + (size, size)`` booleans.
    """
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    shape = kinds.shape
    u = (grid.view(*([1] * len(shape)), 1, size) - cx[..., None, None]) / r[..., None, None]
    v = (grid.view(*([1] * len(shape)), size, 1) - cy[..., None, None]) / r[..., None, None]
    au, av = u.abs(), v.abs()
    d2 = u * u + v * v
    candidates = torch.stack(
        [
            d2 <= 1.0,
            torch.maximum(au, av) <= 0.85,
            (v <= 0.75) & (v >= -1.0 + 1.75 * au / 0.95),
            (torch.minimum(au, av) <= 0.3) & (torch.maximum(au, av) <= 1.0),
            (d2 >= 0.55**2) & (d2 <= 1.0),
        ],
        dim=-3,
    )
    index = kinds.long()[..., None, None, None].expand(*shape, 1, size, size)
    return candidates.gather(-3, index).squeeze(-3)


def _smooth_background(b: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth colour clutter: 8 x 8 uniform noise upsampled bicubically, in [0.15, 0.85]."""
    coarse = torch.rand(b, 3, 8, 8, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.15 + 0.7 * smooth).clamp(0.0, 1.0)


def known_cause_batch(
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    num_classes: int = len(SHAPES),
    distractors: int = 3,
    object_size: tuple[int, int] = (16, 26),
    distractor_size: tuple[int, int] = (6, 10),
    noise: float = 0.04,
    labels: Sequence[int] | torch.Tensor | None = None,
) -> KnownCauseBatch:
    """A seeded batch of known-cause images (see the module docstring).

    The labels are balanced: ``arange(n) % num_classes`` in a seeded random order. Every random
    draw (background, noise, object place, size and colour, distractors) is made before and
    independently of the labels, so for one ``seed`` two label vectors give images that differ
    only inside the objects' boxes.

    Args:
        n: number of images.
        seed: seed of the CPU generator; equal seeds give equal batches.
        size: side of the square images in pixels.
        num_classes: classes used, the first ``num_classes`` of :data:`SHAPES` (2 to 5).
        distractors: distractor shapes per image (each dropped when it finds no place clear of
            the object in 16 tries).
        object_size: (min, max) side of the object's square in pixels, drawn uniformly.
        distractor_size: (min, max) side of a distractor's square, drawn uniformly; keep it below
            ``object_size`` so that size tells object from distractor.
        noise: standard deviation of the Gaussian pixel noise.
        labels: the classes to draw instead of the balanced seeded ones, (n,).

    Returns:
        A :class:`KnownCauseBatch`.

    Raises:
        ValueError: sizes that do not fit, a class count outside 2..5, labels of the wrong
            length or outside the classes.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 2 to {len(SHAPES)}, not {num_classes}")
    lo, hi = object_size
    dlo, dhi = distractor_size
    if not (2 <= lo <= hi < size and 2 <= dlo <= dhi < size):
        raise ValueError(
            f"object_size {object_size} / distractor_size {distractor_size} do not fit"
        )
    g = torch.Generator().manual_seed(int(seed))
    balanced = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    images = _smooth_background(n, size, g)
    images = images + noise * torch.randn(n, 3, size, size, generator=g)

    # the object: a square cell of side s at (x0, y0), the shape filling it
    s = torch.randint(lo, hi + 1, (n,), generator=g)
    x0 = (torch.rand(n, generator=g) * (size - s + 1)).floor().long()
    y0 = (torch.rand(n, generator=g) * (size - s + 1)).floor().long()
    obj_colour = _PALETTE[torch.randint(len(_PALETTE), (n,), generator=g)]

    # distractors: kind, colour, size drawn independently of the class; 16 tries each for a
    # place whose cell keeps a 2-pixel margin from the object's cell
    k, tries = distractors, 16
    d_kind = torch.randint(num_classes, (n, k), generator=g)
    d_colour = _PALETTE[torch.randint(len(_PALETTE), (n, k), generator=g)]
    ds = torch.randint(dlo, dhi + 1, (n, k), generator=g)
    dx = (torch.rand(n, k, tries, generator=g) * (size - ds[..., None] + 1)).floor().long()
    dy = (torch.rand(n, k, tries, generator=g) * (size - ds[..., None] + 1)).floor().long()
    m = 2
    clear = (
        (dx + ds[..., None] + m <= x0[:, None, None])
        | (dx >= (x0 + s)[:, None, None] + m)
        | (dy + ds[..., None] + m <= y0[:, None, None])
        | (dy >= (y0 + s)[:, None, None] + m)
    )
    first = clear.float().argmax(dim=-1, keepdim=True)
    placed = clear.any(dim=-1)
    dx = dx.gather(-1, first).squeeze(-1)
    dy = dy.gather(-1, first).squeeze(-1)

    if labels is None:
        lab = balanced
    else:
        lab = torch.as_tensor(labels, dtype=torch.long).view(-1)
        if lab.numel() != n or bool(((lab < 0) | (lab >= num_classes)).any()):
            raise ValueError(f"labels must be {n} classes in 0..{num_classes - 1}")

    d_masks = shape_masks(d_kind, dx + ds / 2, dy + ds / 2, ds / 2, size) & placed[..., None, None]
    for j in range(k):
        mj = d_masks[:, j, None]
        images = torch.where(mj, d_colour[:, j, :, None, None], images)
    masks = shape_masks(lab, x0 + s / 2, y0 + s / 2, s / 2, size)
    images = torch.where(masks[:, None], obj_colour[:, :, None, None], images)
    boxes = torch.stack([x0, y0, x0 + s, y0 + s], dim=1)
    return KnownCauseBatch(
        images=images.clamp(0.0, 1.0).float(),
        labels=lab,
        masks=masks,
        boxes=boxes,
        distractor_masks=d_masks.any(dim=1),
    )
