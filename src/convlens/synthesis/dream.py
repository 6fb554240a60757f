"""DeepDream: amplify whatever a layer sees in a photo.

Mordvintsev, Olah & Tyka 2015, "Inceptionism: Going Deeper into Neural Networks" (Google
Research blog; the ``deepdream`` notebook). Starting from the photo, repeat at several scales
("octaves", each ``octave_scale`` times larger than the last, smallest first)::

    u     <- roll(u, random (dy, dx))                     # jitter
    g     =  d/du  mean A(normalize(u))**2                # A: the layer's output (or one channel)
    u     <- unroll(u + step_size * g / mean|g|)          # normalised step
    u     <- clip(u, 0, 1)                                # stay a valid image

and carry the *detail* ``u - photo`` of each octave, upsampled, into the next. ``u`` lives in
[0, 1] pixel space; the model sees ``preprocess.normalize(u)``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from convlens.architecture import LayerRef, parse_layer
from convlens.atomic import save_image
from convlens.errors import InputError
from convlens.hooks.capture import named_module
from convlens.hooks.state import model_state
from convlens.models.base import ConvlensModel
from convlens.synthesis._common import model_parts, progress_bar
from convlens.synthesis.objectives import DreamL2, LayerReader
from convlens.synthesis.result import DreamResult, to_pil
from convlens.synthesis.transforms import random_roll
from convlens.validate import (
    at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from convlens.validate import seed as check_seed

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["deep_dream", "octave_sizes"]

log = logging.getLogger(__name__)

MIN_OCTAVE_SIDE = 32


def octave_sizes(
    height: int, width: int, octaves: int, scale: float, *, min_side: int = MIN_OCTAVE_SIDE
) -> list[tuple[int, int]]:
    """Sizes of the octaves, smallest first, the last being (height, width). Octaves whose
    shorter side would fall below ``min_side`` are dropped."""
    sizes = []
    for i in reversed(range(octaves)):
        h, w = round(height / scale**i), round(width / scale**i)
        if min(h, w) >= min(min_side, height, width):
            sizes.append((h, w))
    return sizes


def _as_unit(image: torch.Tensor | Image.Image | str | Path, max_size: int | None) -> torch.Tensor:
    from PIL import Image as PILImage

    if isinstance(image, (str, Path)):
        from convlens.images import load_image

        image = load_image(image)
    if isinstance(image, PILImage.Image):
        import numpy as np

        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        x = image.detach()
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] != 3:
            raise InputError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
        if not x.is_floating_point():
            raise InputError(f"image must be a float tensor in [0, 1], got {x.dtype}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(
                f"image values must lie in [0, 1] (pixels, not normalised inputs); got "
                f"[{lo:.3g}, {hi:.3g}]"
            )
        x = x.float().clamp(0, 1)
    else:
        raise InputError(f"image must be a tensor, PIL image or path, not {type(image).__name__}")
    if max_size is not None and max(x.shape[-2:]) > max_size:
        s = max_size / max(x.shape[-2:])
        size = (max(1, round(x.shape[-2] * s)), max(1, round(x.shape[-1] * s)))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
    return x


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def deep_dream(
    model: nn.Module | ConvlensModel,
    image: torch.Tensor | Image.Image | str | Path,
    layer: str | LayerRef,
    *,
    channel: int | None = None,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps_per_octave: int = 10,
    step_size: float = 0.01,
    jitter: int = 32,
    max_size: int | None = None,
    seed: int = 0,
    gif_path: str | Path | None = None,
    gif_every: int = 1,
    gif_duration: int = 80,
    progress: bool = True,
) -> DreamResult:
    """DeepDream a photo at ``layer`` (Mordvintsev et al. 2015).

    Gradient ascent on ``mean A**2`` (the squared L2 norm of the layer's activations per
    element; of one channel with ``channel``) starting from the photo, over ``octaves`` scales
    ``octave_scale`` apart, with a random roll of up to ``jitter`` pixels before each step and
    steps normalised by the mean absolute gradient: ``u += step_size * g / mean|g|``. Pixels
    stay in [0, 1].

    Args:
        model: a :class:`~convlens.ConvlensModel` or a bare ``nn.Module`` (ImageNet mean/std).
        image: (3, H, W) or (1, 3, H, W) float tensor in [0, 1], a PIL image or an image path.
            Any size the network accepts; the result has the same size.
        layer: module name or ``"name@call"``.
        channel: amplify only this channel of the layer.
        octaves: number of scales (octaves too small for the network, under 32 pixels, are
            skipped).
        octave_scale: size ratio between successive octaves.
        steps_per_octave: gradient steps per octave.
        step_size: mean absolute change of a pixel per step (pixel units, [0, 1] range).
        jitter: largest random roll (pixels) per step; 0 for none.
        max_size: shrink the photo first so that its longer side is at most this.
        seed: seed of the random rolls.
        gif_path: write an animated GIF of every ``gif_every``-th step here.
        gif_every: steps between animation frames.
        gif_duration: milliseconds per animation frame.
        progress: show a progress bar on stderr.

    Returns:
        The dreamed image, the original, the objective before each step, the octave sizes and
        (when a GIF was asked for) the frames.

    Raises:
        LayerError: unknown layer (close matches listed) or a non-tensor output.
        InputError: bad image, channel out of range, invalid option.
        InferenceModeError: called inside ``torch.inference_mode()``.
    """
    positive_int(octaves, "octaves")
    non_negative_int(steps_per_octave, "steps_per_octave")
    at_least(octave_scale, "octave_scale", 1.0)
    positive_float(step_size, "step_size")
    non_negative_int(jitter, "jitter")
    positive_int(gif_every, "gif_every")
    positive_int(gif_duration, "gif_duration")
    check_seed(seed, "seed")
    if max_size is not None:
        positive_int(max_size, "max_size")
    if channel is not None:
        non_negative_int(channel, "channel")
    parts = model_parts(model)
    ref = parse_layer(layer)
    named_module(parts.net, ref.name)
    original = _as_unit(image, max_size)
    h, w = original.shape[-2:]
    sizes = octave_sizes(h, w, octaves, octave_scale)
    if len(sizes) < octaves:
        log.info(
            "using %d of %d octaves: smaller ones would be under %d px",
            len(sizes),
            octaves,
            MIN_OCTAVE_SIDE,
        )
    objective = DreamL2(
        torch.tensor([0 if channel is None else channel]), ref, channel=channel is not None
    )
    pre = parts.preprocess
    gen = torch.Generator().manual_seed(seed)
    photo = original[None].to(device=parts.device, dtype=parts.dtype)
    frames: list[torch.Tensor] = []
    history: list[float] = []
    total = len(sizes) * steps_per_octave
    bar = progress_bar(progress, total, f"dreaming at {ref}")
    start = time.perf_counter()
    try:
        with model_state(parts.net, eval_mode=True, grads=True) as net:
            reader = LayerReader(net, ref)
            with torch.no_grad():
                reader.resolve(pre.normalize(_resize(photo, sizes[0])))
            detail = torch.zeros_like(_resize(photo, sizes[0]))
            u = photo
            for size in sizes:
                base = _resize(photo, size)
                u = (base + _resize(detail, size)).clamp(0.0, 1.0)
                for _ in range(steps_per_octave):
                    rolled, (dy, dx) = random_roll(u, jitter, gen)
                    rolled = rolled.detach().requires_grad_(True)
                    score = objective(reader(pre.normalize(rolled))).sum()
                    (grad,) = torch.autograd.grad(score, rolled)
                    grad = torch.roll(grad, shifts=(-dy, -dx), dims=(-2, -1))
                    step = step_size / (grad.abs().mean() + 1e-12)
                    u = (u + step * grad).clamp(0.0, 1.0).detach()
                    history.append(float(score.detach()))
                    if gif_path is not None and len(history) % gif_every == 0:
                        frames.append(_resize(u, (h, w))[0].float().cpu())
                    if bar is not None:
                        bar.update(bar.task_ids[0], advance=1, score=f"|A|² {history[-1]:.3g}")
                detail = u - base
    finally:
        if bar is not None:
            bar.stop()
    result = u[0].float().cpu()
    written = None
    if gif_path is not None:
        written = _write_gif(Path(gif_path), [original, *frames], gif_duration)
    return DreamResult(
        image=result,
        original=original,
        layer=str(ref),
        channel=channel,
        history=torch.tensor(history),
        octave_sizes=sizes,
        frames=frames,
        gif_path=written,
        settings={
            "octaves": octaves,
            "octave_scale": octave_scale,
            "steps_per_octave": steps_per_octave,
            "step_size": step_size,
            "jitter": jitter,
            "max_size": max_size,
            "seed": seed,
            "channel": channel,
        },
        seconds=time.perf_counter() - start,
    )


def _write_gif(path: Path, frames: list[torch.Tensor], duration: int) -> Path:
    images = [to_pil(f) for f in frames]
    hold = [images[-1]] * max(1, math.ceil(1000 / max(duration, 1)))  # linger on the result
    return save_image(
        images[0],
        path,
        save_all=True,
        append_images=images[1:] + hold,
        duration=duration,
        loop=0,
        optimize=False,
    )
