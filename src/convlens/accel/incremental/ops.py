"""Operation tables of incremental occlusion: which traced operations act element-wise, on two
maps, or as a sliding window, and how a sliding window runs on a crop.

A sliding-window operation (convolution, max or average pooling) is run on the crop of its
input that its changed output box reads, with the padding applied to the crop beforehand
(zeros for convolution and average pooling, ``-inf`` for max pooling) and padding 0 in the call,
so the crop's outputs equal the corresponding outputs of the whole map.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AVG_DEFAULTS",
    "AVG_NAMES",
    "BINARY_FUNCTIONS",
    "BINARY_METHODS",
    "CONV_DEFAULTS",
    "CONV_NAMES",
    "INPLACE_FUNCTIONS",
    "MAX_DEFAULTS",
    "MAX_NAMES",
    "POINTWISE_FUNCTIONS",
    "POINTWISE_METHODS",
    "POINTWISE_MODULES",
    "SHAPE_METHODS",
    "Pads",
    "Window",
    "WindowKind",
    "bind",
    "conv_pads",
    "hooked",
    "is_tensor",
    "pair",
]

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)
"""Modules acting on each element (eval-mode batch norm and dropout: per channel)."""

POINTWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    operator.neg,
    torch.clamp,
    F.dropout,
    F.dropout2d,
    F.batch_norm,
}

POINTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "abs",
    "neg",
    "clamp",
    "clamp_min",
    "clamp_max",
    "contiguous",
}

INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
"""In-place operators and the out-of-place operators the incremental pass runs instead."""

BINARY_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}

BINARY_METHODS = {"add", "sub", "mul", "div"}

SHAPE_METHODS = {"size", "dim"}

CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
MAX_NAMES = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
MAX_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "ceil_mode": False,
    "return_indices": False,
}
AVG_NAMES = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
AVG_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def bind(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str], defaults: dict[str, Any]
) -> dict[str, Any]:
    """A call's arguments by name: ``defaults``, then ``args`` in the order of ``names``, then
    ``kwargs``."""
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


def pair(v: Any) -> tuple[int, int]:
    """A 2-D size argument (an int or a sequence of one or two) as ``(rows, columns)``."""
    if isinstance(v, int):
        return v, v
    t = tuple(v)
    return (int(t[0]), int(t[0])) if len(t) == 1 else (int(t[0]), int(t[1]))


def is_tensor(v: Any) -> bool:
    """Whether ``v`` is a tensor."""
    return isinstance(v, torch.Tensor)


def hooked(m: nn.Module) -> bool:
    """Whether a module has forward (pre-)hooks: its call is more than its ``forward``."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


class Pads(NamedTuple):
    """Padding of a sliding window's input, in rows and columns."""

    top: int
    bottom: int
    left: int
    right: int


def conv_pads(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> Pads | None:
    """The padding of a convolution (an int, a pair, ``"valid"`` or ``"same"``); ``None`` for
    anything else."""
    if padding == "valid":
        return Pads(0, 0, 0, 0)
    if padding == "same":
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return Pads(th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, str):
        return None
    ph, pw = pair(padding)
    return Pads(ph, ph, pw, pw)


class WindowKind(enum.Enum):
    """The operation of a sliding window."""

    CONV = "conv"
    MAX = "max"
    AVG = "avg"


@dataclass
class Window:
    """A sliding-window operation, run with padding 0 on a crop padded with ``pad_value``.

    Attributes:
        kind: convolution, max or average pooling.
        kernel, stride, dilation: ``(rows, columns)``.
        pads: the operation's padding, applied to the crop before the call.
        pad_value: the padding's value (``-inf`` for max pooling).
        weight, bias, groups: the convolution's parameters.
        divisor: average pooling's ``divisor_override``.
    """

    kind: WindowKind
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: Pads
    pad_value: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    divisor: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is WindowKind.CONV:
            assert self.weight is not None
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if self.kind is WindowKind.MAX:
            return F.max_pool2d(x, self.kernel, self.stride, 0, self.dilation)
        return F.avg_pool2d(x, self.kernel, self.stride, 0, divisor_override=self.divisor)

    def input_size(self, rows: int, cols: int) -> tuple[int, int]:
        """Rows and columns of the (padded) input that ``rows x cols`` outputs read."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return (rows - 1) * sh + (kh - 1) * dh + 1, (cols - 1) * sw + (kw - 1) * dw + 1
