"""Result types of image synthesis and their save/grid helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convlens.atomic import save_image

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DreamResult", "SynthesisResult", "image_grid", "to_pil"]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an RGB PIL image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in text.strip())
    return keep.strip("_")[:60] or "image"


def image_grid(
    images: torch.Tensor,
    labels: Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    cell: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] into one RGB image, with a caption under each.

    Args:
        images: the images.
        labels: one caption per image (``None``: no captions).
        ncols: columns (default: about ``sqrt(N)``, at most 8).
        cell: side each image is resized to (default: unchanged).
        pad: white space between cells (pixels).
    """
    from PIL import Image, ImageDraw, ImageFont

    n = images.shape[0]
    ncols = ncols or min(8, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    tiles = [to_pil(images[i]) for i in range(n)]
    if cell is not None:
        tiles = [t.resize((cell, cell), Image.Resampling.LANCZOS) for t in tiles]
    tw, th = tiles[0].size if tiles else (1, 1)
    font_size = max(10, min(16, tw // 14))
    font = ImageFont.load_default(size=font_size)
    text_h = font_size + 6 if labels else 0
    width = ncols * tw + (ncols + 1) * pad
    height = nrows * (th + text_h) + (nrows + 1) * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        canvas.paste(tile, (x0, y0))
        if labels:
            text = labels[i]
            while len(text) > 3 and draw.textlength(text, font=font) > tw:
                text = text[:-2].rstrip() + "…" if not text.endswith("…") else text[:-2] + "…"
            draw.text((x0 + 1, y0 + th + 2), text, fill="black", font=font)
    return canvas


@dataclass
class SynthesisResult:
    """Images synthesised to maximise a class score or a unit of a layer.

    Attributes:
        images: (N, 3, H, W) float32 images in [0, 1] (CPU).
        targets: class indices (class visualisation) or channel indices, one per image.
        labels: a readable name per image (class name, or ``layer:channel``).
        objective: what was maximised (``"logit"``, ``"log_prob"``, ``"channel"``,
            ``"neuron"``).
        history: (steps, N) objective per step (mean over the transform samples).
        scores: (N,) the objective on the final images, untransformed.
        probabilities: (N,) softmax probability of the target class on the final images
            (class visualisation only, else ``None``).
        layer: the layer of a channel/neuron objective.
        settings: every option used (:class:`~convlens.synthesis.SynthesisSettings` as dict),
            plus ``seed`` and ``size``.
        seconds: wall time of the optimisation.
    """

    images: torch.Tensor
    targets: list[int]
    labels: list[str]
    objective: str
    history: torch.Tensor
    scores: torch.Tensor
    probabilities: torch.Tensor | None = None
    layer: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def steps_per_second(self) -> float:
        """Optimisation steps per second (each step is one batched forward and backward)."""
        steps = int(self.history.shape[0])
        return steps / self.seconds if self.seconds > 0 else float("nan")

    def captions(self) -> list[str]:
        """Labels with the probability (class images) or the final score."""
        if self.probabilities is not None:
            return [
                f"{lab} ({float(p):.2f})"
                for lab, p in zip(self.labels, self.probabilities, strict=True)
            ]
        return [f"{lab} ({float(s):.3g})" for lab, s in zip(self.labels, self.scores, strict=True)]

    def to_pil(self, i: int) -> Image.Image:
        """Image ``i`` as a PIL image."""
        return to_pil(self.images[i])

    def grid(
        self, *, ncols: int | None = None, cell: int | None = None, captions: bool = True
    ) -> Image.Image:
        """All images tiled, captioned with :meth:`captions`."""
        return image_grid(
            self.images, self.captions() if captions else None, ncols=ncols, cell=cell
        )

    def save(self, directory: str | Path, *, prefix: str = "", grid: bool = True) -> list[Path]:
        """Write one PNG per image (``{prefix}{index}_{label}.png``) and ``{prefix}grid.png``.

        Returns:
            The written paths.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for i, (t, lab) in enumerate(zip(self.targets, self.labels, strict=True)):
            path = out / f"{prefix}{i:02d}_{t}_{_safe_name(lab)}.png"
            save_image(self.to_pil(i), path)
            paths.append(path)
        if grid:
            path = out / f"{prefix}grid.png"
            save_image(self.grid(), path)
            paths.append(path)
        return paths


@dataclass
class DreamResult:
    """A DeepDream image.

    Attributes:
        image: (3, H, W) float32 dreamed image in [0, 1] (CPU), the size of the input.
        original: (3, H, W) the input image in [0, 1].
        layer: the layer whose activations were amplified.
        channel: the channel amplified, or ``None`` for the whole layer.
        history: (steps,) the objective (mean squared activation) before each step, over all
            octaves in order.
        octave_sizes: (height, width) of each octave, smallest first.
        frames: (3, H, W) snapshots for the animation (empty unless a GIF was asked for).
        gif_path: where the animation was written, if it was.
        settings: the options used.
        seconds: wall time.
    """

    image: torch.Tensor
    original: torch.Tensor
    layer: str
    channel: int | None
    history: torch.Tensor
    octave_sizes: list[tuple[int, int]]
    frames: list[torch.Tensor] = field(default_factory=list)
    gif_path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_pil(self) -> Image.Image:
        """The dreamed image as a PIL image."""
        return to_pil(self.image)

    def save(self, path: str | Path) -> Path:
        """Write the dreamed image as PNG; returns the path."""
        path = Path(path)
        return save_image(self.to_pil(), path)
