"""The optimisation loop shared by class and channel visualisation, its settings and presets.

Every step (Olah et al. 2017; Yosinski et al. 2015; Simonyan et al. 2013)::

    u      = param()                                  # (N, 3, H, W) pixels
    batch  = T_k(u) for k = 1..K random transforms     # (K N, 3, H', W')
    s_n    = mean_k objective(net(normalize(batch)))   # (N,)
    loss   = -sum_n (s_n - l2 * ||normalize(u_n)||^2)
    param <- optimizer step on loss; then the pixel regularisers (decay, blur, clipping)

The network's parameters are frozen (:func:`convlens.hooks.model_state`), so only the image
parameters change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F

from convlens.errors import InputError, NonFiniteError, close_matches
from convlens.models.preprocess import Preprocess
from convlens.synthesis._common import progress_bar
from convlens.synthesis.objectives import LayerReader, Objective
from convlens.synthesis.parameterization import ImageParam, PixelImage, Squash, make_param
from convlens.synthesis.transforms import RandomTransform, standard_transforms
from convlens.validate import (
    finite_float,
    finite_floats,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from convlens.validate import seed as check_seed

__all__ = [
    "PRESETS",
    "ProgressCallback",
    "SynthesisSettings",
    "gaussian_blur",
    "optimize_images",
    "resolve_settings",
]

log = logging.getLogger(__name__)

#: Default images per forward/backward pass on CPU (see ``SynthesisSettings.batch_size``):
#: on EfficientNet-Lite0 at 224 px, chunks of 4-5 run about twice as fast as one batch of 20.
CPU_BATCH_SIZE = 4

#: ``callback(step, images, scores)`` after every step: ``images`` (N, 3, H, W) in [0, 1]
#: (detached), ``scores`` (N,) the objective averaged over the transform samples.
ProgressCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class SynthesisSettings:
    """Every option of class and channel visualisation (see ``docs/synthesis.md``).

    Attributes:
        param: ``"fourier"`` (1/f-scaled spectrum) or ``"pixel"``.
        decorrelate: optimise in the decorrelated ImageNet colour basis.
        squash: map to [0, 1]: ``"sigmoid"``, ``"clamp"``, or ``"none"`` (unbounded input,
            clipped only for display).
        fourier_decay: exponent of the 1/f scaling of the Fourier parameterisation.
        init_std: standard deviation of the random initial parameters (0: the mean image).
        steps: optimisation steps.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (plain gradient ascent, no momentum).
        score: class objective: ``"logit"`` (S_c) or ``"log_prob"`` (log softmax).
        l2: weight ``lambda`` of the penalty ``lambda * ||x||^2`` on the normalised input x
            (Simonyan et al. 2013).
        decay: multiplicative decay of the pixel parameters per step (Yosinski et al. 2015).
        blur_every: blur the pixel parameters every this many steps (0: never).
        blur_sigma: standard deviation (pixels) of that Gaussian blur.
        norm_clip_pct: after each step, zero the pixels whose norm (over channels) is below this
            percentile (0: off; Yosinski et al. 2015).
        contrib_clip_pct: zero the pixels whose contribution ``|sum_c x * dS/dx|`` is below
            this percentile (0: off; Yosinski et al. 2015).
        pad: pad every side by this many pixels before the random transforms.
        pad_mode: ``"constant"`` (grey) or ``"reflect"``.
        jitter: random translation (pixels) after padding.
        scale: (low, high) random zoom.
        rotate: largest random rotation (degrees).
        final_jitter: random translation after scaling and rotation.
        samples: random transform samples of every image per step (averaged; more samples
            give more transformation-robust images).
        resize: resize the transformed batch back to the image size (needed by models with a
            fixed input size; harmless for others).
        batch_size: most images per forward/backward pass; the ``samples x N`` images of a
            step are split into chunks of this size and their gradients summed (same result up
            to float rounding). Smaller uses less memory, and on CPU avoids the page faults of
            large activation buffers that make big batches slow. 0: all at once; ``None``
            (default): 4 on CPU, all at once on other devices.
    """

    param: Literal["pixel", "fourier"] = "fourier"
    decorrelate: bool = True
    squash: Squash = "sigmoid"
    fourier_decay: float = 1.0
    init_std: float = 0.01
    steps: int = 256
    lr: float = 0.05
    optimizer: Literal["adam", "sgd"] = "adam"
    score: Literal["logit", "log_prob"] = "logit"
    l2: float = 0.0
    decay: float = 0.0
    blur_every: int = 0
    blur_sigma: float = 0.0
    norm_clip_pct: float = 0.0
    contrib_clip_pct: float = 0.0
    pad: int = 16
    pad_mode: Literal["constant", "reflect"] = "constant"
    jitter: int = 8
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    final_jitter: int = 4
    samples: int = 2
    resize: bool = True
    batch_size: int | None = None

    def validate(self) -> SynthesisSettings:
        """Check the values; returns self.

        Raises:
            InputError: an invalid value, or a pixel-only regulariser with ``param="fourier"``.
        """
        choices = {
            "param": ("pixel", "fourier"),
            "squash": ("sigmoid", "clamp", "none"),
            "optimizer": ("adam", "sgd"),
            "score": ("logit", "log_prob"),
            "pad_mode": ("constant", "reflect"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        for name in ("steps", "pad", "jitter", "final_jitter", "blur_every"):
            non_negative_int(getattr(self, name), name)
        positive_int(self.samples, "samples")
        if self.batch_size is not None:
            non_negative_int(self.batch_size, "batch_size")
        positive_float(self.lr, "lr")
        for name in ("init_std", "l2", "blur_sigma"):
            non_negative_float(getattr(self, name), name)
        finite_float(self.fourier_decay, "fourier_decay")
        finite_float(self.rotate, "rotate")
        if not 0 <= fraction(self.decay, "decay") < 1:
            raise InputError(f"decay must be in [0, 1), got {self.decay}")
        for name in ("norm_clip_pct", "contrib_clip_pct"):
            finite_float(getattr(self, name), name)
            if not 0 <= getattr(self, name) < 100:
                raise InputError(
                    f"{name} must be a percentile in [0, 100), got {getattr(self, name)}"
                )
        pixel_only = {
            "decay": self.decay,
            "blur_every": self.blur_every,
            "norm_clip_pct": self.norm_clip_pct,
            "contrib_clip_pct": self.contrib_clip_pct,
        }
        used = [k for k, v in pixel_only.items() if v]
        if used and self.param != "pixel":
            raise InputError(
                f"{', '.join(used)} act on pixel parameters; use param='pixel' with them"
            )
        if self.blur_every and self.blur_sigma <= 0:
            raise InputError("blur_every needs blur_sigma > 0")
        finite_floats(self.scale, "scale", count=2, positive=True)
        if not self.scale[0] <= self.scale[1]:
            raise InputError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for reports)."""
        return dataclasses.asdict(self)


_NO_TRANSFORMS: dict[str, Any] = {
    "pad": 0,
    "jitter": 0,
    "scale": (1.0, 1.0),
    "rotate": 0.0,
    "final_jitter": 0,
    "samples": 1,
}

#: Named settings (read-only). ``readable`` is the default: tuned on EfficientNet-Lite0 so that
#: class images are recognised by a different network (see ``benchmarks/RESULTS.md``).
PRESETS: Mapping[str, SynthesisSettings] = MappingProxyType(
    {
        # Olah et al. 2017 / Lucid: Fourier basis, decorrelated colour, sigmoid, transforms, Adam.
        "readable": SynthesisSettings(),
        # Lucid's published recipe, one transform sample per step, 512 steps.
        "olah": SynthesisSettings(
            steps=512, pad=12, jitter=8, scale=(0.9, 1.1), rotate=10.0, final_jitter=4, samples=1
        ),
        # Simonyan et al. 2013 section 2: pixels from the zero (mean) image, L2 penalty, plain
        # gradient ascent, no transforms, no clipping of the optimised input.
        "simonyan": SynthesisSettings(
            param="pixel",
            decorrelate=False,
            squash="none",
            init_std=0.0,
            steps=200,
            lr=2.0,
            optimizer="sgd",
            l2=1e-3,
            **_NO_TRANSFORMS,
        ),
        # Yosinski et al. 2015: pixels, gradient ascent, decay + periodic blur + small-norm
        # clipping, plus jitter.
        "yosinski": SynthesisSettings(
            param="pixel",
            decorrelate=False,
            squash="clamp",
            init_std=0.0,
            steps=200,
            lr=2.0,
            optimizer="sgd",
            decay=1e-4,
            blur_every=4,
            blur_sigma=0.5,
            norm_clip_pct=20.0,
            **{**_NO_TRANSFORMS, "pad": 8, "jitter": 8},
        ),
    }
)


def resolve_settings(
    preset: str | SynthesisSettings, overrides: dict[str, Any]
) -> SynthesisSettings:
    """A preset (name or settings) with keyword overrides applied and validated.

    Raises:
        InputError: unknown preset or option name (close matches listed), or an invalid value.
    """
    if isinstance(preset, SynthesisSettings):
        base = preset
    else:
        try:
            base = PRESETS[preset]
        except KeyError:
            raise InputError(
                f"unknown preset {preset!r}.{close_matches(preset, PRESETS)} "
                f"Available: {', '.join(PRESETS)}"
            ) from None
    names = {f.name for f in fields(SynthesisSettings)}
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise InputError(
            f"unknown synthesis option {unknown[0]!r}.{close_matches(unknown[0], names)} "
            f"Options: {', '.join(sorted(names))}"
        )
    values = {k: v for k, v in overrides.items() if v is not None}
    if "scale" in values:
        values["scale"] = tuple(float(v) for v in values["scale"])
    return dataclasses.replace(base, **values).validate()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflection at the border."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    radius_h = min(radius, x.shape[-2] - 1)
    radius_w = min(radius, x.shape[-1] - 1)
    if radius_h != radius or radius_w != radius:
        return x  # too small to blur with this kernel
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _percentile_mask(values: torch.Tensor, pct: float) -> torch.Tensor:
    """(N, 1, H, W) mask of the pixels at or above the ``pct`` percentile of each image."""
    flat = values.flatten(1)
    q = torch.quantile(flat, pct / 100.0, dim=1, keepdim=True)
    return (flat >= q).view_as(values)


@torch.no_grad()
def _pixel_regularisers(
    param: PixelImage, grad: torch.Tensor | None, s: SynthesisSettings, step: int
) -> None:
    p = param.pixels
    if s.decay:
        p.mul_(1.0 - s.decay)
    if s.blur_every and (step + 1) % s.blur_every == 0:
        p.copy_(gaussian_blur(p, s.blur_sigma))
    if s.norm_clip_pct:
        p.mul_(_percentile_mask(p.norm(dim=1, keepdim=True), s.norm_clip_pct))
    if s.contrib_clip_pct and grad is not None:
        contrib = (p * grad).sum(dim=1, keepdim=True).abs()
        p.mul_(_percentile_mask(contrib, s.contrib_clip_pct))


@dataclass
class OptimizationOutput:
    """What :func:`optimize_images` returns."""

    images: torch.Tensor
    history: torch.Tensor
    seconds: float


def _check_finite(scores: torch.Tensor, step: int) -> None:
    """Stop at the first objective that is NaN or infinite (nothing useful can follow it)."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(
            f"the objective is NaN or infinite for image(s) {', '.join(map(str, bad))} at step "
            f"{step + 1}: the model's outputs (or their gradients) are not finite; check the "
            "model's weights, or lower the learning rate",
            rows=bad,
        )


def optimize_images(
    net: torch.nn.Module,
    preprocess: Preprocess,
    objective: Objective,
    *,
    n: int,
    size: tuple[int, int],
    settings: SynthesisSettings,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    description: str = "synthesising",
    callback: ProgressCallback | None = None,
) -> OptimizationOutput:
    """Optimise ``n`` images for ``objective`` (the caller holds ``net`` in ``model_state``).

    Returns:
        The images (N, 3, H, W) in [0, 1] (float32, CPU), the objective history (steps, N)
        (mean over transform samples, before the L2 penalty) and the wall time.
    """
    s = settings
    gen = torch.Generator().manual_seed(check_seed(seed, "seed"))
    h, w = size
    param: ImageParam = make_param(
        s.param,
        n,
        h,
        w,
        mean=preprocess.mean,
        std=preprocess.std,
        decorrelate=s.decorrelate,
        squash=s.squash,
        init_std=s.init_std,
        decay=s.fourier_decay,
        generator=gen,
    ).to(device=device, dtype=dtype)
    transforms: RandomTransform = standard_transforms(
        pad=s.pad,
        pad_mode=s.pad_mode,
        jitter=s.jitter,
        scale=s.scale,
        rotate=s.rotate,
        final_jitter=s.final_jitter,
        size=(h, w) if s.resize else None,
    )
    params = list(param.parameters())
    opt: torch.optim.Optimizer
    if s.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=s.lr)
    else:
        opt = torch.optim.SGD(params, lr=s.lr)
    reader = LayerReader(net, objective.layer)
    with torch.no_grad():
        reader.resolve(preprocess.normalize(param()))
    history = torch.zeros(s.steps, n)
    chunk = CPU_BATCH_SIZE if s.batch_size is None and device.type == "cpu" else s.batch_size
    chunk = chunk or n * s.samples
    index = torch.arange(n * s.samples, device=device) % n
    bar = progress_bar(progress, s.steps, description)
    start = time.perf_counter()
    try:
        for step in range(s.steps):
            unit = param()
            batch = unit.repeat(s.samples, 1, 1, 1) if s.samples > 1 else unit
            x = preprocess.normalize(transforms(batch, gen))
            # The network runs on chunks of a detached copy; their input gradients are summed
            # and then carried back to the image parameters in one surrogate backward pass.
            x_leaf = x.detach().requires_grad_(True)
            sample_scores = torch.empty(x.shape[0], device=x.device)
            for lo in range(0, x.shape[0], chunk):
                part = slice(lo, lo + chunk)
                sc = objective(reader(x_leaf[part]), index[part])
                (sc.sum() / s.samples).backward()
                sample_scores[part] = sc.detach()
            scores = sample_scores.view(s.samples, n).mean(dim=0)
            grad_x = torch.zeros_like(x) if x_leaf.grad is None else x_leaf.grad
            surrogate = -(x * grad_x).sum()  # d/dparam = -(dS/dx)(dx/dparam)
            if s.l2:
                surrogate = surrogate + s.l2 * preprocess.normalize(unit).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            surrogate.backward()
            grad = None
            if isinstance(param, PixelImage) and param.pixels.grad is not None:
                grad = -param.pixels.grad.detach().clone()  # gradient of the objective
            opt.step()
            param.project_()
            if isinstance(param, PixelImage):
                _pixel_regularisers(param, grad, s, step)
            history[step] = scores.float().cpu()
            _check_finite(history[step], step)
            mean = float(scores.mean())
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1, score=f"objective {mean:.3g}")
            if callback is not None:
                callback(step, unit.detach().clamp(0, 1), scores)
            if step == 0 or (step + 1) % 50 == 0:
                log.debug("step %d: mean objective %.4g", step + 1, mean)
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        images = param().clamp(0.0, 1.0).float().cpu()
    return OptimizationOutput(images=images, history=history, seconds=seconds)
