"""The high-level entry point: several methods on one batch, side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from convlens.accel.settings import Acceleration
from convlens.architecture import LayerRef
from convlens.methods import Method, get_method
from convlens.models.base import ConvlensModel
from convlens.result import Explanation
from convlens.targets import TargetSpec

__all__ = ["explain"]


def explain(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    methods: str | Method | Sequence[str | Method] = ("saliency", "occlusion", "cam", "gradcam"),
    target: TargetSpec = None,
    *,
    top_k: int | None = None,
    layer: str | LayerRef | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    accel: Acceleration | None = None,
) -> dict[str, Explanation]:
    """Run several explanation methods on one batch.

    Args:
        model: a network or a :class:`~convlens.models.ConvlensModel` (which adds class names
            and display images to the results).
        x: (B, 3, H, W) preprocessed inputs (``model.load_images(paths)`` makes them).
        methods: method names from :func:`~convlens.methods.list_methods` or method objects.
        target: class(es) to explain (index, name, synset, one per image); default top-1.
        top_k: explain each image's ``top_k`` most probable classes instead.
        layer: layer for the methods that use one (ignored by those that find their own, such
            as CAM: :attr:`~convlens.methods.Method.finds_own_layer`).
        options: per-method constructor options, e.g. ``{"occlusion": {"patch": 16}}``.
        accel: the accelerators the methods may use (default: the model wrapper's
            ``accel``, else ``Acceleration()``); ``Acceleration.plain()`` runs every method's
            plain PyTorch path.

    Returns:
        ``{method name: Explanation}`` in the order given.

    Example:
        >>> model = convlens.load_model("lite0")
        >>> x = model.load_images(["cat.jpg"])
        >>> results = convlens.explain(model, x, ["saliency", "gradcam"], target="tabby cat")
        >>> results["gradcam"].save("cat_gradcam.png")
    """
    if isinstance(methods, (str, Method)):
        methods = [methods]
    options = options or {}
    out: dict[str, Explanation] = {}
    for m in methods:
        method = get_method(m, **options.get(m, {})) if isinstance(m, str) else m
        use_layer = layer if method.uses_layer and not method.finds_own_layer else None
        out[method.name] = method(model, x, target, top_k=top_k, layer=use_layer, accel=accel)
    return out
