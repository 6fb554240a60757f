"""Channel and neuron visualisation: images that excite one unit of a layer.

The same optimisation as class visualisation (Erhan et al. 2009's activation maximisation, with
the regularisers of Yosinski et al. 2015 and Olah et al. 2017), with the objective

    channel:  mean_{y,x} A_c(y, x)          neuron:  A_c(y0, x0)

where ``A`` is the output of the chosen layer (one call of it: ``name@call``). The layer output
is captured with a forward hook and the forward pass stops right after it, so deep parts of
the network cost nothing. Many channels of one layer are optimised in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from convlens.architecture import LayerRef, parse_layer
from convlens.errors import InputError
from convlens.hooks.capture import named_module
from convlens.hooks.state import model_state
from convlens.models.base import ConvlensModel
from convlens.synthesis._common import image_size, model_parts
from convlens.synthesis.objectives import ChannelMean, LayerReader, Neuron
from convlens.synthesis.optimize import (
    ProgressCallback,
    SynthesisSettings,
    optimize_images,
    resolve_settings,
)
from convlens.synthesis.result import SynthesisResult

__all__ = ["channel_visualization"]


def channel_visualization(
    model: nn.Module | ConvlensModel,
    layer: str | LayerRef,
    channels: int | Sequence[int],
    *,
    neuron: tuple[int, int] | Literal["center"] | None = None,
    preset: str | SynthesisSettings = "readable",
    steps: int | None = None,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
    callback: ProgressCallback | None = None,
    **overrides: Any,
) -> SynthesisResult:
    """Synthesise one image per channel of ``layer`` that maximises the channel's activation.

    Args:
        model: a :class:`~convlens.ConvlensModel` or a bare ``nn.Module``.
        layer: module name (``"_blocks.8"``), ``"name@call"`` for modules called several
            times, or a :class:`~convlens.architecture.LayerRef`.
        channels: channel indices; one image each, all optimised in one batch.
        neuron: ``None`` maximises the channel's spatial mean; ``"center"`` or ``(y, x)`` one
            unit of the feature map.
        preset: see :func:`~convlens.synthesis.class_visualization`.
        steps: optimisation steps (overrides the preset).
        seed: seed of every random draw.
        size: image side or (height, width); default the model's input size.
        progress: show a progress bar on stderr.
        callback: called after every step with ``(step, images, scores)``.
        **overrides: any :class:`~convlens.synthesis.SynthesisSettings` field.

    Returns:
        Images (N, 3, H, W) in [0, 1], objective history, the final activation (``scores``) of
        each target unit on the untransformed image; ``probabilities`` is ``None``.

    Raises:
        LayerError: unknown layer (close matches listed), unused layer or call, or a layer
            whose output is not a feature map.
        InputError: channel or position out of range, unknown option.
        InferenceModeError: called inside ``torch.inference_mode()``.
    """
    chans = [channels] if isinstance(channels, int) else [int(c) for c in channels]
    if not chans:
        raise InputError("give at least one channel")
    if steps is not None:
        overrides["steps"] = steps
    settings = resolve_settings(preset, overrides)
    parts = model_parts(model)
    ref = parse_layer(layer)
    named_module(parts.net, ref.name)  # LayerError before any work
    hw = image_size(size, parts.preprocess)
    targets = torch.tensor(chans)
    if neuron is None:
        objective: ChannelMean | Neuron = ChannelMean(targets, ref)
    else:
        objective = Neuron(targets, ref, position=None if neuron == "center" else neuron)
    with model_state(parts.net, eval_mode=True, grads=True) as net:
        out = optimize_images(
            net,
            parts.preprocess,
            objective,
            n=len(chans),
            size=hw,
            settings=settings,
            seed=seed,
            device=parts.device,
            dtype=parts.dtype,
            progress=progress,
            description=f"channels of {ref}",
            callback=callback,
        )
        with torch.no_grad():
            x = parts.preprocess.normalize(out.images.to(device=parts.device, dtype=parts.dtype))
            scores = objective(LayerReader(net, ref)(x)).float().cpu()
    return SynthesisResult(
        images=out.images,
        targets=chans,
        labels=[f"{ref}:{c}" for c in chans],
        objective=objective.name,
        history=out.history,
        scores=scores,
        probabilities=None,
        layer=str(ref),
        settings={
            **settings.as_dict(),
            "seed": seed,
            "size": hw,
            "neuron": neuron,
            "preset": preset if isinstance(preset, str) else "custom",
        },
        seconds=out.seconds,
    )
