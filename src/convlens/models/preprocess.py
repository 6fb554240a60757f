"""Turning a PIL image into the normalised tensor a model expects, and back for display."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from convlens.errors import InputError
from convlens.validate import finite_floats, positive_int

__all__ = ["INTERPOLATIONS", "Preprocess"]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
"""The resampling filters :class:`Preprocess` resizes with, by name (PIL's, with antialiasing:
what torchvision's and timm's transforms do on PIL images)."""


@dataclass(frozen=True)
class Preprocess:
    """Resize-and-crop preprocessing of one model.

    The shorter side is resized to ``resize`` (bilinear by default, with antialiasing), the centre
    ``crop`` x ``crop`` square is cut out, pixels are scaled to [0, 1] and normalised per channel:
    ``x = (pixel / 255 - mean) / std``.

    Args:
        resize: length of the shorter side after resizing; ``None`` resizes straight to ``crop``.
        crop: side of the square centre crop (the model's input size).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: the resampling filter of the resize, one of :data:`INTERPOLATIONS`
            (``"bilinear"``, ``"bicubic"``, ...), as the model's own preprocessing names it.

    Raises:
        InputError: ``resize`` or ``crop`` not a positive integer, ``mean`` not three finite
            numbers, ``std`` not three finite numbers above 0 (a std of 0 would make every
            input NaN or infinite), or ``interpolation`` not a filter name.
    """

    resize: int | None = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize is not None:
            object.__setattr__(self, "resize", positive_int(self.resize, "preprocess resize"))
        object.__setattr__(self, "crop", positive_int(self.crop, "preprocess crop"))
        mean = finite_floats(self.mean, "preprocess mean", count=3)
        std = finite_floats(self.std, "preprocess std", count=3, positive=True)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        name = str(self.interpolation).strip().lower()
        if name not in INTERPOLATIONS:
            raise InputError(
                f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        object.__setattr__(self, "interpolation", name)

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and centre-crop an RGB image, without normalising."""
        w, h = image.size
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize is None:
            return image.resize((self.crop, self.crop), resample)
        scale = self.resize / min(w, h)
        nw, nh = max(self.crop, round(w * scale)), max(self.crop, round(h * scale))
        image = image.resize((nw, nh), resample)
        left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
        return image.crop((left, top, left + self.crop, top + self.crop))

    def to_unit(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and scale to a (3, crop, crop) float tensor in [0, 1]."""
        arr = np.asarray(self.geometry(image.convert("RGB")), dtype=np.float32) / 255.0
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels (..., 3, H, W) to model inputs."""
        mean = torch.tensor(self.mean, dtype=unit.dtype, device=unit.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=unit.dtype, device=unit.device).view(3, 1, 1)
        return (unit - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map model inputs (..., 3, H, W) back to [0, 1] pixels for display (clamped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one PIL image into a normalised (3, crop, crop) tensor.

        The same float32 arithmetic as ``normalize(to_unit(image))``, done in NumPy: small
        torch operations on one image pay for intra-op thread synchronisation (several times
        the work itself on a busy machine), and this runs once per image in data loaders.
        """
        arr = np.asarray(self.geometry(image.convert("RGB")), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(
            self.std, dtype=np.float32
        )
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
