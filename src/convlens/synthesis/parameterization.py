"""How a synthesised image is represented while it is optimised.

An image parameterisation is a small ``nn.Module`` whose only parameters are the image's; its
forward returns the image in [0, 1] pixel space (``(N, 3, H, W)``). Three choices combine:

- the **spatial basis**: ``"pixel"`` (one parameter per pixel, Simonyan et al. 2013) or
  ``"fourier"`` (the real FFT spectrum, scaled by ``1 / f**decay`` so that all frequencies
  have about the same energy after scaling; Olah et al. 2017, "Feature Visualization",
  *Distill*, section "Preconditioning and Parameterization");
- the **colour basis**: plain RGB, or *decorrelated* colour where the three channels are the
  principal components of ImageNet colour, mixed back to RGB with the square root of the
  colour covariance (:data:`COLOR_CORRELATION_SVD_SQRT`, the matrix used by Lucid);
- the **range map** (``squash``): ``"sigmoid"`` maps any real value into (0, 1); ``"clamp"``
  treats the signal as a normalised model input ``x`` (zero is the mean image) and clips the
  pixels ``mean + std * x`` to [0, 1]; ``"none"`` does the same without clipping (the literal
  Simonyan setting: the optimised input is unbounded and only the displayed image is clipped).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "FourierImage",
    "ImageParam",
    "PixelImage",
    "Squash",
    "color_matrix",
    "decorrelate_colors",
    "fourier_scale",
    "make_param",
    "recorrelate_colors",
]

Squash = Literal["sigmoid", "clamp", "none"]

#: Square root (from the SVD) of the colour covariance of ImageNet pixels, as used by Lucid and
#: Olah et al. 2017; row ``i`` is the contribution of the three decorrelated components to RGB
#: channel ``i``.
COLOR_CORRELATION_SVD_SQRT: tuple[tuple[float, float, float], ...] = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)


def color_matrix(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The colour-mixing matrix ``M`` (3, 3): :data:`COLOR_CORRELATION_SVD_SQRT` divided by the
    largest Euclidean norm of its columns, so that no decorrelated component moves any colour
    channel by more than its own magnitude. ``rgb = M @ decorrelated``."""
    m = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(dtype=dtype, device=device)


def recorrelate_colors(t: torch.Tensor) -> torch.Tensor:
    """Decorrelated colour components (..., 3, H, W) to RGB: ``rgb = M @ t`` per pixel."""
    m = color_matrix(t.dtype, t.device)
    return torch.einsum("ij,...jhw->...ihw", m, t)


def decorrelate_colors(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`recorrelate_colors`: ``t = M^-1 @ rgb`` per pixel."""
    m_inv = torch.linalg.inv(color_matrix(torch.float64)).to(dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("ij,...jhw->...ihw", m_inv, rgb)


def fourier_scale(
    height: int, width: int, decay: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-frequency scale ``sqrt(H W) / max(f, 1 / max(H, W)) ** decay`` of an (H, W // 2 + 1)
    real-FFT spectrum, ``f = sqrt(fy**2 + fx**2)`` in cycles per pixel (Lucid's ``fft_image``).

    With ``decay = 1`` every frequency band gets about equal energy in the image, i.e. the 1/f
    amplitude spectrum of natural images; larger ``decay`` favours lower frequencies.
    """
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freqs = torch.sqrt(fy * fy + fx * fx)
    scale = 1.0 / freqs.clamp(min=1.0 / max(height, width)) ** decay
    return (scale * math.sqrt(height * width)).to(dtype)


class ImageParam(nn.Module):
    """Base class: parameters of ``n`` images of size ``height x width``.

    Subclasses implement :meth:`signal` (the (N, 3, H, W) real signal in the chosen colour
    basis); this class applies the colour mixing and the range map.

    Args:
        n: number of images.
        height: image height.
        width: image width.
        mean: per-channel mean of the model's normalisation (pixel units).
        std: per-channel standard deviation of the model's normalisation.
        decorrelate: mix the signal's channels to RGB with :func:`color_matrix`.
        squash: range map to [0, 1] pixels (see the module docstring).
    """

    def __init__(
        self,
        n: int,
        height: int,
        width: int,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        decorrelate: bool,
        squash: Squash,
    ) -> None:
        super().__init__()
        if squash not in ("sigmoid", "clamp", "none"):
            raise ValueError(f"squash must be 'sigmoid', 'clamp' or 'none', not {squash!r}")
        self.n, self.height, self.width = n, height, width
        self.decorrelate = decorrelate
        self.squash: Squash = squash
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def signal(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """The images in pixel units, (N, 3, H, W); in [0, 1] unless ``squash="none"``."""
        s = self.signal()
        if self.decorrelate:
            s = recorrelate_colors(s)
        if self.squash == "sigmoid":
            return torch.sigmoid(s)
        unit = self.mean + self.std * s
        return unit.clamp(0.0, 1.0) if self.squash == "clamp" else unit

    @torch.no_grad()
    def project_(self) -> None:
        """Bring the parameters back into their valid set after a step (``clamp`` only)."""


class PixelImage(ImageParam):
    """One parameter per pixel and channel.

    With ``squash="none"`` or ``"clamp"`` and no decorrelation the parameter is exactly the
    normalised model input ``x = (pixels - mean) / std``; zero initialisation is then the mean
    image, the starting point of Simonyan et al. 2013.

    Args:
        init: (N, 3, H, W) initial signal, or ``None``.
        generator: random source for ``init_std`` noise.
        init_std: standard deviation of the initial noise (0: all zeros).
        **kwargs: see :class:`ImageParam`.
    """

    def __init__(
        self,
        n: int,
        height: int,
        width: int,
        *,
        init_std: float = 0.0,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(n, height, width, **kwargs)  # type: ignore[arg-type]
        init = torch.randn(n, 3, height, width, generator=generator) * init_std
        self.pixels = nn.Parameter(init)

    def signal(self) -> torch.Tensor:
        return self.pixels

    @torch.no_grad()
    def project_(self) -> None:
        """Clip the pixels to [0, 1] when ``squash="clamp"`` (plain RGB only)."""
        if self.squash == "clamp" and not self.decorrelate:
            lo = (0.0 - self.mean) / self.std
            hi = (1.0 - self.mean) / self.std
            self.pixels.copy_(torch.maximum(torch.minimum(self.pixels, hi), lo))


class FourierImage(ImageParam):
    """The image as its real 2-D Fourier spectrum, scaled by :func:`fourier_scale`.

    ``signal = irfft2(scale * (a + i b)) / 4`` with ``a, b`` the parameters, initialised with
    standard deviation ``init_std`` (Lucid's ``fft_image``; the division by 4 keeps the initial
    image close to grey).

    Args:
        decay: exponent of the 1/f scaling (1: natural-image spectrum).
        init_std: standard deviation of the initial spectrum.
        generator: random source for the initial spectrum.
        **kwargs: see :class:`ImageParam`.
    """

    def __init__(
        self,
        n: int,
        height: int,
        width: int,
        *,
        decay: float = 1.0,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(n, height, width, **kwargs)  # type: ignore[arg-type]
        self.decay = decay
        shape = (n, 3, height, width // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=generator) * init_std)
        self.register_buffer("scale", fourier_scale(height, width, decay), persistent=False)

    def signal(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(spec, s=(self.height, self.width)) / 4.0


def make_param(
    kind: Literal["pixel", "fourier"],
    n: int,
    height: int,
    width: int,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    decorrelate: bool,
    squash: Squash,
    init_std: float,
    decay: float,
    generator: torch.Generator,
) -> ImageParam:
    """Build a :class:`PixelImage` or :class:`FourierImage` (on the CPU; move it with ``.to``).

    Raises:
        ValueError: unknown ``kind``.
    """
    common = {"mean": mean, "std": std, "decorrelate": decorrelate, "squash": squash}
    if kind == "pixel":
        return PixelImage(n, height, width, init_std=init_std, generator=generator, **common)
    if kind == "fourier":
        return FourierImage(
            n, height, width, decay=decay, init_std=init_std, generator=generator, **common
        )
    raise ValueError(f"param must be 'pixel' or 'fourier', not {kind!r}")
