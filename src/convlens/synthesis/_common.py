"""Helpers shared by the synthesis entry points: model parts, sizes, devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.errors import InputError
from convlens.models.base import ConvlensModel, unwrap
from convlens.models.classes import ClassList
from convlens.models.preprocess import Preprocess

#: Normalisation assumed for a bare ``nn.Module`` (the default of :func:`convlens.wrap_model`).
DEFAULT_PREPROCESS = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass
class ModelParts:
    net: nn.Module
    preprocess: Preprocess
    classes: ClassList | None
    device: torch.device
    dtype: torch.dtype


def model_parts(model: nn.Module | ConvlensModel) -> ModelParts:
    """The network, its preprocessing, class list (if known) and device."""
    net, wrapper = unwrap(model)
    first = next(iter(net.parameters()), None)
    device = torch.device("cpu") if first is None else first.device
    dtype = torch.float32 if first is None or not first.is_floating_point() else first.dtype
    if wrapper is None:
        return ModelParts(net, DEFAULT_PREPROCESS, None, device, dtype)
    return ModelParts(net, wrapper.preprocess, wrapper.classes, device, dtype)


def image_size(size: int | tuple[int, int] | None, preprocess: Preprocess) -> tuple[int, int]:
    """``size`` as (height, width); ``None`` is the model's input size (its crop).

    Raises:
        InputError: a side smaller than 8 pixels.
    """
    if size is None:
        hw = (preprocess.crop, preprocess.crop)
    elif isinstance(size, int):
        hw = (size, size)
    else:
        hw = (int(size[0]), int(size[1]))
    if min(hw) < 8:
        raise InputError(f"image size must be at least 8 pixels, got {hw}")
    return hw


def progress_bar(enabled: bool, total: int, description: str) -> Any:
    """A started rich progress bar on stderr with one task (``None`` when disabled); the
    caller stops it."""
    if not enabled:
        return None
    from convlens.console import progress_bar

    bar = progress_bar(transient=True, fields=("score",))
    bar.start()
    bar.add_task(description, total=total, score="")
    return bar
