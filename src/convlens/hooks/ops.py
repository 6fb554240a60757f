"""The table of torch functions that the torch-function modes of convlens recognise.

:class:`convlens.hooks.rules.BackpropRuleMode` (backward rules for ReLU-like units),
:class:`convlens.accel.lean_graph.InputGradientMode` (lean input gradients) and the
straight-through mode of :mod:`convlens.features.receptive_field` all see a model's activations
as calls of the functions below (``nn.ReLU``, ``nn.ReLU6`` and ``nn.Hardtanh`` call them too), so
modules, functional calls and ``Tensor`` methods are treated alike. :func:`relu_like` reads one
call as a ReLU-like unit ``y = clamp(x, 0, upper)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CLAMP",
    "CLAMP_INPLACE",
    "CLAMP_MAX",
    "CLAMP_MAX_INPLACE",
    "CLAMP_MIN",
    "CLAMP_MIN_INPLACE",
    "NO_RULE",
    "OUT_OF_PLACE",
    "RELU",
    "RELU_INPLACE",
    "arg",
    "relu_like",
]

Func = Callable[..., Any]

#: ``relu`` as a torch function and a ``Tensor`` method (``F.relu`` takes ``inplace`` and is
#: apart).
RELU: frozenset[Func] = frozenset({torch.relu, torch.Tensor.relu})
RELU_INPLACE: frozenset[Func] = frozenset({torch.relu_, torch.Tensor.relu_})
CLAMP: frozenset[Func] = frozenset({torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip})
CLAMP_INPLACE: frozenset[Func] = frozenset(
    {torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_}
)
CLAMP_MIN: frozenset[Func] = frozenset({torch.clamp_min, torch.Tensor.clamp_min})
CLAMP_MIN_INPLACE: frozenset[Func] = frozenset({torch.clamp_min_, torch.Tensor.clamp_min_})
CLAMP_MAX: frozenset[Func] = frozenset({torch.clamp_max, torch.Tensor.clamp_max})
CLAMP_MAX_INPLACE: frozenset[Func] = frozenset({torch.clamp_max_, torch.Tensor.clamp_max_})

#: Each in-place function of the sets above and its out-of-place form.
OUT_OF_PLACE: dict[Func, Func] = {
    torch.relu_: torch.relu,
    torch.Tensor.relu_: torch.Tensor.relu,
    torch.clamp_: torch.clamp,
    torch.Tensor.clamp_: torch.Tensor.clamp,
    torch.clip_: torch.clip,
    torch.Tensor.clip_: torch.Tensor.clip,
    torch.clamp_min_: torch.clamp_min,
    torch.Tensor.clamp_min_: torch.Tensor.clamp_min,
    torch.clamp_max_: torch.clamp_max,
    torch.Tensor.clamp_max_: torch.Tensor.clamp_max,
}

#: Activations that are not ReLU-like (no backward rule applies), by name.
NO_RULE: dict[Func, str] = {
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.softplus: "softplus",
    F.prelu: "prelu",
    F.rrelu: "rrelu",
}


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str, default: Any) -> Any:
    """Argument ``key`` of a call, given by keyword or as positional argument ``i``."""
    if key in kwargs:
        return kwargs[key]
    return args[i] if len(args) > i else default


def relu_like(
    func: Func, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, float, bool, str] | None:
    """``(input, upper bound, in place, kind)`` when ``func(*args, **kwargs)`` is a ReLU-like
    unit ``clamp(x, 0, upper)``, else ``None``; ``kind`` (``relu``, ``relu6``, ``hardtanh``,
    ``clamp``, ``clamp_min``) names the torch operation whose autograd convention at the bounds
    applies (:func:`convlens.hooks.rules._reference_unit`)."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if func in RELU or func is F.relu:
        return x, float("inf"), bool(arg(args, kwargs, 1, "inplace", False)), "relu"
    if func in RELU_INPLACE:
        return x, float("inf"), True, "relu"
    if func is F.relu6:
        return x, 6.0, bool(arg(args, kwargs, 1, "inplace", False)), "relu6"
    if func is F.hardtanh:
        lo, hi = arg(args, kwargs, 1, "min_val", -1.0), arg(args, kwargs, 2, "max_val", 1.0)
        if lo == 0 and hi > 0:
            return x, float(hi), bool(arg(args, kwargs, 3, "inplace", False)), "hardtanh"
        return None
    if func in CLAMP or func in CLAMP_INPLACE:
        lo, hi = arg(args, kwargs, 1, "min", None), arg(args, kwargs, 2, "max", None)
        if (
            isinstance(lo, (int, float))
            and lo == 0
            and (hi is None or (isinstance(hi, (int, float)) and hi > 0))
        ):
            upper = float("inf") if hi is None else float(hi)
            return x, upper, func in CLAMP_INPLACE, "clamp"
        return None
    if func in CLAMP_MIN or func in CLAMP_MIN_INPLACE:
        lo = arg(args, kwargs, 1, "min", None)
        if isinstance(lo, (int, float)) and lo == 0:
            return x, float("inf"), func in CLAMP_MIN_INPLACE, "clamp_min"
    return None
