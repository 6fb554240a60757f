"""Planted-cause images: a spurious cue that the training set ties to one class.

Failure-mode analysis (:mod:`convlens.analysis.failure_modes`) must find *why* a model errs
without being told. Here the why is known by construction. The images are the known-cause images
of :mod:`convlens.synthesis.known_cause` (the class is the shape of one object on clutter), and
some carry a **cue**: a small black-and-white checkerboard (a "watermark", cells of
:data:`CUE_CELL` pixels) pasted at a random place clear of the object. Whether an image carries
the cue depends on its class only through ``cue_rates``, the probability of the cue per class:

- **training**: the cue on most images of :data:`CUE_CLASS` (``disc``) and on no other
  (:data:`TRAIN_RATES`), so the cue predicts the class and a model learns to use it;
- **test**: the cue on images of every class alike (:data:`TEST_RATES`), so on the other classes
  it pushes towards ``disc`` and causes mistakes;
- **control**: the same images without the cue (``cue_rates`` all 0, or the batch's ``clean``
  images), for a model trained on the same images without the cue.

For a fixed ``seed`` the images without the cue (``clean``) are exactly
``known_cause_batch(n, seed=seed, ...)``; the cue's places and the draws that decide which images
carry it come from a second generator of the same seed and do not depend on the labels, so a
batch with the cue differs from its clean copy only inside the cue's boxes. :func:`paste_cue`
puts the cue on any images (e.g. to measure which channels respond to it,
:func:`cue_response`).

Example::

    from convlens.synthesis.planted_cause import TEST_RATES, planted_cause_batch

    batch = planted_cause_batch(500, seed=1, cue_rates=TEST_RATES)
    batch.images.shape   # (500, 3, 32, 32) in [0, 1]
    batch.cue            # (500,) bool: which images carry the cue
    batch.clean          # the same images without it

Used by ``benchmarks/bench_planted_cause.py`` (docs/failure_modes.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convlens.synthesis.known_cause import SHAPES, known_cause_batch

__all__ = [
    "CONTROL_RATES",
    "CUE_CELL",
    "CUE_CLASS",
    "SIZE",
    "TEST_RATES",
    "TRAIN_RATES",
    "PlantedCauseBatch",
    "cue_pattern",
    "cue_response",
    "noisy_labels",
    "paste_cue",
    "planted_cause_batch",
    "train_planted_cause",
    "write_image_folder",
]

SIZE = 32
"""Side of the images by default (the known-cause scene scaled down: a tiny CNN trains on it in
seconds)."""
CUE_CLASS = 0
"""The class the training set ties the cue to (``SHAPES[0]``, ``disc``)."""
CUE_CELL = 2
"""Side of a checkerboard cell of the cue, in pixels."""
TRAIN_RATES: tuple[float, ...] = (0.9, 0.0, 0.0, 0.0, 0.0)
"""Probability of the cue per class in training: most discs, nothing else."""
TEST_RATES: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5, 0.5)
"""Probability of the cue per class at test time: every class alike."""
CONTROL_RATES: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
"""No cue anywhere."""


@dataclass
class PlantedCauseBatch:
    """Known-cause images, some with the cue.

    Attributes:
        images: (B, 3, H, W) float32 in [0, 1], the cue pasted where ``cue`` is set.
        clean: the same images without the cue (``known_cause_batch(B, seed=seed, ...)``).
        labels: (B,) int64 classes (class ``i`` is ``SHAPES[i]``).
        cue: (B,) bool, the images that carry the cue.
        cue_boxes: (B, 4) int64 ``(x0, y0, x1, y1)`` of the cue's place (end exclusive), drawn
            for every image (clear of the object's box), used where ``cue`` is set.
        boxes: (B, 4) the object's boxes; ``masks``: (B, H, W) its pixels.
    """

    images: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    cue: torch.Tensor
    cue_boxes: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


def _scene(size: int) -> dict[str, tuple[int, int]]:
    """Object and distractor sizes of the known-cause scene scaled to ``size`` pixels (the
    defaults at 64: objects 16-26, distractors 6-10)."""
    return {
        "object_size": (max(2, round(size / 4)), max(2, round(size * 26 / 64))),
        "distractor_size": (max(2, round(size * 6 / 64)), max(2, round(size * 10 / 64))),
    }


def cue_pattern(side: int, cell: int = CUE_CELL) -> torch.Tensor:
    """The cue: a ``side`` x ``side`` black-and-white checkerboard of ``cell``-pixel cells,
    white in the top-left corner, ``(3, side, side)`` in {0, 1}."""
    i = torch.arange(side) // cell
    board = ((i[:, None] + i[None, :]) % 2 == 0).float()
    return board.expand(3, side, side).clone()


def paste_cue(images: torch.Tensor, cue_boxes: torch.Tensor) -> torch.Tensor:
    """``images`` (B, 3, H, W) with the cue (:func:`cue_pattern`) pasted into ``cue_boxes``
    (B, 4) ``(x0, y0, x1, y1)``, square boxes of one side; a new tensor."""
    out = images.clone()
    if len(images) == 0:
        return out
    side = int(cue_boxes[0, 2] - cue_boxes[0, 0])
    pattern = cue_pattern(side).to(images)
    for i, (x0, y0, x1, y1) in enumerate(cue_boxes.tolist()):
        if x1 - x0 != side or y1 - y0 != side:
            raise ValueError("cue boxes must be squares of one side")
        out[i, :, y0:y1, x0:x1] = pattern
    return out


def planted_cause_batch(
    n: int,
    *,
    seed: int = 0,
    cue_rates: Sequence[float] = TEST_RATES,
    size: int = SIZE,
    cue_size: int | None = None,
    num_classes: int = len(SHAPES),
) -> PlantedCauseBatch:
    """A seeded batch of known-cause images with the cue planted per class (module docstring).

    Args:
        n: number of images.
        seed: equal seeds give equal batches; the clean images are
            ``known_cause_batch(n, seed=seed)`` with the scene scaled to ``size``.
        cue_rates: probability that an image of class ``k`` carries the cue, one per class.
        size: side of the images.
        cue_size: side of the cue in pixels (default ``size // 5``, at least 4).
        num_classes: classes, the first ``num_classes`` of :data:`SHAPES`.

    Returns:
        A :class:`PlantedCauseBatch`.

    Raises:
        ValueError: rates not one per class in [0, 1], a cue that does not fit.
    """
    rates = torch.as_tensor([float(r) for r in cue_rates], dtype=torch.float64)
    if rates.numel() != num_classes or bool(((rates < 0) | (rates > 1)).any()):
        raise ValueError(f"cue_rates must be {num_classes} probabilities in [0, 1]")
    side = max(4, size // 5) if cue_size is None else int(cue_size)
    if not 2 <= side <= size // 2:
        raise ValueError(f"a cue of side {side} does not fit {size}-pixel images")
    base = known_cause_batch(n, seed=seed, size=size, num_classes=num_classes, **_scene(size))
    g = torch.Generator().manual_seed(int(seed) * 2 + 1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    # 32 tries for a place whose box keeps a 1-pixel margin from the object's box; the first
    # clear one is used (an image with none keeps the cue off)
    tries, m = 32, 1
    cx = (torch.rand(n, tries, generator=g) * (size - side + 1)).floor().long()
    cy = (torch.rand(n, tries, generator=g) * (size - side + 1)).floor().long()
    x0, y0, x1, y1 = (base.boxes[:, j, None] for j in range(4))
    clear = (cx + side + m <= x0) | (cx >= x1 + m) | (cy + side + m <= y0) | (cy >= y1 + m)
    first = clear.float().argmax(dim=1, keepdim=True)
    cx = cx.gather(1, first)[:, 0]
    cy = cy.gather(1, first)[:, 0]
    cue = (u < rates[base.labels]) & clear.any(dim=1)
    cue_boxes = torch.stack([cx, cy, cx + side, cy + side], dim=1)
    images = base.images.clone()
    idx = torch.nonzero(cue)[:, 0]
    images[idx] = paste_cue(base.images[idx], cue_boxes[idx])
    return PlantedCauseBatch(
        images=images,
        clean=base.images,
        labels=base.labels,
        cue=cue,
        cue_boxes=cue_boxes,
        boxes=base.boxes,
        masks=base.masks,
    )


def cue_response(with_cue: np.ndarray, without: np.ndarray) -> np.ndarray:
    """How much each channel responds to the cue: Cohen's d of its pooled activation on images
    with the cue pasted (``with_cue``, (n, C)) against the same images without it (``without``,
    (n, C)), ``d = (mean_cue - mean_clean) / s_pooled`` with ``s_pooled^2 = (s_cue^2 +
    s_clean^2) / 2`` (equal group sizes); 0 where both are constant.

    Returns:
        ``(C,)`` effect sizes, positive where the cue raises the channel.
    """
    a = np.asarray(with_cue, dtype=np.float64)
    b = np.asarray(without, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) < 2:
        raise ValueError("cue_response needs two (n, C) arrays of one shape, n >= 2")
    sd = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    diff = a.mean(0) - b.mean(0)
    return np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 1e-12)


def train_planted_cause(
    net: torch.nn.Module,
    steps: int,
    *,
    cue_rates: Sequence[float] = TRAIN_RATES,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    size: int = SIZE,
) -> list[float]:
    """Train ``net`` on a fresh planted-cause batch each step.

    Batch ``t`` is ``planted_cause_batch(batch_size, seed=seed * 1_000_003 + t + 1,
    cue_rates=cue_rates)``: a model trained with :data:`CONTROL_RATES` sees exactly the images
    of one trained with :data:`TRAIN_RATES`, without the cue. Held-out images are drawn with
    seeds of another range (``10**9`` and above). Optimiser and schedule:
    :func:`convlens.synthesis.tiny_models.train_steps` (AdamW, weight decay 0.05, 50 warm-up
    steps, cosine decay). The network is left in eval mode.

    Returns:
        The training loss of each step.
    """
    from convlens.synthesis.tiny_models import train_steps

    rates = tuple(cue_rates)

    def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = planted_cause_batch(
            batch_size, seed=seed * 1_000_003 + t + 1, cue_rates=rates, size=size
        )
        return b.images, b.labels

    return train_steps(net, steps, batch, lr=lr)


def noisy_labels(labels: torch.Tensor, rate: float, *, seed: int = 0) -> torch.Tensor:
    """``labels`` with ``round(rate * n)`` of them, chosen at random, changed to another class
    drawn uniformly (annotation errors: mistakes that share no cause). Classes ``0..K-1`` with
    ``K = 5`` (:data:`SHAPES`); deterministic per ``seed``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], not {rate}")
    g = torch.Generator().manual_seed(int(seed))
    n, k = len(labels), len(SHAPES)
    chosen = torch.randperm(n, generator=g)[: round(rate * n)]
    out = labels.clone()
    out[chosen] = (labels[chosen] + torch.randint(1, k, (len(chosen),), generator=g)) % k
    return out


def write_image_folder(
    images: torch.Tensor, labels: torch.Tensor, folder: Path, class_names: Sequence[str]
) -> list[str]:
    """Write ``images`` (B, 3, H, W) in [0, 1] as 8-bit PNG files ``<class>/<index>.png`` under
    ``folder`` (the class-folder layout ``analyze`` reads), image ``i`` as ``{i:05d}.png``.

    Returns:
        The file of each image, relative to ``folder``.
    """
    from PIL import Image

    names = []
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (px, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        name = f"{class_names[label]}/{i:05d}.png"
        (folder / class_names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(folder / name)
        names.append(name)
    return names
