"""Class model visualisation: the image a classifier finds most typical of a class.

Simonyan, Vedaldi & Zisserman 2013, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps", section 2, find

    I* = argmax_I  S_c(I) - lambda * ||I||_2^2

where ``S_c`` is the unnormalised score (logit) of class ``c`` and ``I`` the mean-subtracted
input, by gradient ascent from the zero (mean) image (preset ``"simonyan"``). The default preset
``"readable"`` adds what makes such images recognisable to people and to other networks
(Yosinski et al. 2015; Mordvintsev et al. 2015; Olah et al. 2017): a 1/f Fourier basis,
decorrelated colour, a sigmoid range map and random pad/jitter/scale/rotation at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convlens.hooks.state import model_state
from convlens.models.base import ConvlensModel
from convlens.synthesis._common import image_size, model_parts
from convlens.synthesis.objectives import ClassScore, class_targets
from convlens.synthesis.optimize import (
    ProgressCallback,
    SynthesisSettings,
    optimize_images,
    resolve_settings,
)
from convlens.synthesis.result import SynthesisResult

__all__ = ["class_visualization"]


def class_visualization(
    model: nn.Module | ConvlensModel,
    classes: Sequence[int | str] | int | str,
    *,
    preset: str | SynthesisSettings = "readable",
    steps: int | None = None,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
    callback: ProgressCallback | None = None,
    **overrides: Any,
) -> SynthesisResult:
    """Synthesise one image per class that maximises the class score, all in one batch.

    Maximises ``S_c(I) - lambda * ||I||^2`` (Simonyan et al. 2013, section 2) over the image
    parameters, averaged over ``samples`` random transforms of the image per step.

    Args:
        model: a :class:`~convlens.ConvlensModel` (its preprocessing and class names are used)
            or a bare ``nn.Module`` (ImageNet mean/std assumed; classes by index only).
        classes: class indices, names (``"tabby cat"``) or synsets; one image each.
        preset: ``"readable"`` (default), ``"olah"``, ``"simonyan"``, ``"yosinski"`` (see
            :data:`~convlens.synthesis.PRESETS`), or a :class:`SynthesisSettings`.
        steps: number of optimisation steps (overrides the preset).
        seed: seed of every random draw (initialisation, transforms); same seed, same images.
        size: image side or (height, width); default the model's input size.
        progress: show a progress bar (rich) on stderr.
        callback: called after every step with ``(step, images, scores)``.
        **overrides: any :class:`SynthesisSettings` field, e.g. ``lr=0.1, param="pixel"``.

    Returns:
        The images (N, 3, H, W) in [0, 1], the logit (or log-probability) per step, the final
        logits and probabilities of the target classes on the untransformed images, and the
        settings.

    Raises:
        TargetError: unknown class name (close matches listed) or index out of range.
        InputError: unknown preset or option, invalid value.
        InferenceModeError: called inside ``torch.inference_mode()``.
    """
    if isinstance(classes, (int, str)):
        classes = [classes]
    if steps is not None:
        overrides["steps"] = steps
    settings = resolve_settings(preset, overrides)
    parts = model_parts(model)
    hw = image_size(size, parts.preprocess)
    targets = class_targets(list(classes), parts.classes)
    objective = ClassScore(torch.tensor(targets), None, kind=settings.score)
    with model_state(parts.net, eval_mode=True, grads=True) as net:
        out = optimize_images(
            net,
            parts.preprocess,
            objective,
            n=len(targets),
            size=hw,
            settings=settings,
            seed=seed,
            device=parts.device,
            dtype=parts.dtype,
            progress=progress,
            description="class images",
            callback=callback,
        )
        with torch.no_grad():
            x = parts.preprocess.normalize(out.images.to(device=parts.device, dtype=parts.dtype))
            logits = net(x).float().cpu()
    idx = torch.tensor(targets)
    probs = torch.softmax(logits, dim=1)[torch.arange(len(targets)), idx]
    names = parts.classes
    labels = [
        names.short(t) if names is not None and t < len(names) else f"class {t}" for t in targets
    ]
    return SynthesisResult(
        images=out.images,
        targets=targets,
        labels=labels,
        objective=objective.name,
        history=out.history,
        scores=objective(logits),
        probabilities=probs,
        layer=None,
        settings={**settings.as_dict(), "seed": seed, "size": hw, "preset": _preset_name(preset)},
        seconds=out.seconds,
    )


def _preset_name(preset: str | SynthesisSettings) -> str:
    return preset if isinstance(preset, str) else "custom"
