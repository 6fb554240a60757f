"""Receptive fields of a layer's units, measured on the model itself.

The receptive field (RF) of a unit ``(y, x)`` of a feature map is the box of input pixels that
can change its value. Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional
Networks") crop it around the strongest activations of a feature; so does the feature browser.

Method: gradient support. For a random input ``x`` (batch ``B``), the RF of unit ``(y, x)`` is
the bounding box of the pixels ``(i, j)`` with ``dS/dx[:, :, i, j] != 0`` for some image and
channel, where ``S = sum_{b,c} w_bc A[b, c, y, x]`` and ``w_bc > 0`` are random weights (a signed
sum rather than ``|A|``: the derivative of ``|a|`` is 0 where ``a == 0``, which is common after a
ReLU). Nothing is read from module types or architecture tables, so padding layers (TF "same"
padding), dilation, depthwise convolutions, residual additions, ``ceil_mode`` pooling and
functional calls are all covered as the model actually computes them.

A zero derivative inside the true RF hides a pixel: a dead ReLU, a saturated ReLU6, max pooling
that routes the gradient to its argmax only. Two counter-measures:

* During the forward pass a :class:`torch.overrides.TorchFunctionMode` makes piecewise-linear
  activations (``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``, ``hardswish``, ``hardsigmoid``,
  ``threshold``, ``clamp``/``clip``, their in-place and ``Tensor`` method forms) *straight-through*:
  the value is unchanged, the derivative is the identity (``y = act(x).detach() + x - x.detach()``).
  Max pooling keeps its value but takes the derivative of a window sum (every pixel of the window
  can become the maximum); adaptive max pooling takes that of adaptive average pooling, which
  uses the same windows. ``nn.ReLU``, ``nn.ReLU6``, ``nn.MaxPool2d`` ... call these functions, so
  modules and functional calls are treated alike.
* Several random inputs of different scales; the supports are united.

The stride (the "jump" between neighbouring units in input pixels) is the shift between the boxes
of two neighbouring units near the centre, and the offset is extrapolated from one of them. A
deep layer's RF does not fit in a 224x224 image, and with dilated convolutions a box that stays
clear of the border may still miss taps beyond it; so after a pass at ``input_size`` each axis is
measured again on an input about ``MAX_INPUT`` (1024) pixels long along it and narrow along the
other (cheap), whose size differs from ``input_size`` by a multiple of the stride so that "same"
padding is unchanged. Where even that does not contain the centre unit's RF, the result is
flagged ``clipped``. The geometry is assumed not to depend on the input size (true for
convolutions, pooling and padding; not after adaptive pooling, which is detected and reported as
``clipped``).

Limitations: every unit of a layer is assumed to have the same RF shape (convolutions and
pooling); a layer after a global operation (squeeze-and-excitation, attention) sees the whole
image, which is what is reported (``clipped``). TorchScript and compiled models bypass the
straight-through rules.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from convlens.architecture import LayerRef, parse_layer, resolve_call
from convlens.errors import ConvlensError, InputError, LayerError
from convlens.hooks import ops
from convlens.hooks.capture import capture_call, named_module
from convlens.hooks.state import model_state

__all__ = ["ReceptiveField", "receptive_field"]

logger = logging.getLogger(__name__)

#: Input side (along one axis) of the second measurement; RFs larger than this are ``clipped``.
MAX_INPUT = 1024
#: Scales of the random inputs (one image each); supports are united over them.
SCALES = (1.0, 0.1, 3.0, 10.0)


@dataclass(frozen=True)
class ReceptiveField:
    """Where each unit of a layer looks in the input image.

    Unit ``(y, x)`` of the layer's output sees input rows ``offset[0] + y * stride[0]`` to
    ``offset[0] + y * stride[0] + size[0]`` (exclusive), likewise for columns; :meth:`box` clips
    that to the image.

    Attributes:
        layer: the layer, as ``str(LayerRef)`` (``"name"`` or ``"name@call"``).
        size: ``(height, width)`` in input pixels of the RF of a unit away from the border.
        stride: input pixels between neighbouring units (the "jump"); 0 along an axis where the
            layer's output has a single unit.
        offset: input ``(y, x)`` of the top-left corner of unit ``(0, 0)``'s RF; negative where
            padding extends it beyond the image.
        input_size: ``(height, width)`` of the input the boxes refer to.
        output_size: ``(height, width)`` of the layer's output for that input.
        clipped: the RF did not fit in the largest input tried (``MAX_INPUT`` pixels per side),
            or the geometry depends on the input size; ``size`` is then the part of the RF seen
            inside the image and boxes may be too small.
    """

    layer: str
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    clipped: bool = False

    def box(self, y: int, x: int, clip: bool = True) -> tuple[int, int, int, int]:
        """The RF of unit ``(y, x)`` as ``(top, left, bottom, right)``, bottom/right exclusive.

        Args:
            y: row of the unit in the layer's output, ``0 <= y < output_size[0]``.
            x: column of the unit, ``0 <= x < output_size[1]``.
            clip: clip the box to the image ``[0, input_size)``; without it the box may extend
                beyond the image (into padding).

        Raises:
            InputError: the unit is outside the layer's output.
        """
        oh, ow = self.output_size
        if not (0 <= y < oh and 0 <= x < ow):
            raise InputError(
                f"unit ({y}, {x}) is outside layer {self.layer!r}, whose output is {oh}x{ow}"
            )
        top = self.offset[0] + y * self.stride[0]
        left = self.offset[1] + x * self.stride[1]
        bottom, right = top + self.size[0], left + self.size[1]
        if clip:
            h, w = self.input_size
            top, left = max(top, 0), max(left, 0)
            bottom, right = min(bottom, h), min(right, w)
        return top, left, bottom, right


def receptive_field(
    net: nn.Module,
    layer: str | LayerRef,
    input_size: tuple[int, int] = (224, 224),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    in_channels: int | None = None,
) -> ReceptiveField:
    """Measure the receptive field of a layer's units by gradient support.

    See the module docstring for the method. The model is used in eval mode for the call and left
    as found (training flags, ``requires_grad``, parameter values; no hooks remain). The forward
    pass stops once the layer's requested call has run, so the rest of the model is not needed.

    Args:
        net: the model; it takes ``(B, in_channels, H, W)`` images.
        layer: ``"name"`` or ``"name@call"`` (call index for a module called several times per
            forward pass, ``-1`` the last, the default) or a :class:`LayerRef`.
        input_size: ``(height, width)`` of the images the boxes refer to.
        device: where to run; by default the device of the model's first parameter (CPU if none).
        dtype: dtype of the random inputs; must match the model's parameters.
        in_channels: image channels; by default those of the first ``nn.Conv2d``, else 3.

    Returns:
        The layer's receptive field geometry for ``input_size``.

    Raises:
        LayerError: no such layer, the forward pass does not reach it (or not for the requested
            call), its output is not a ``(B, C, H, W)`` tensor, or it does not depend on the
            input.
        InputError: ``input_size`` is not two positive integers, or the model fails on a random
            input of that size (wrong ``input_size``, ``in_channels`` or ``dtype``).
        InferenceModeError: called under ``torch.inference_mode()``.
    """
    ref = parse_layer(layer)
    module = named_module(net, ref.name)
    size = _check_size(input_size)
    if device is None:
        device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
    probe = _Probe(
        net=net,
        module=module,
        ref=ref,
        channels=_in_channels(net) if in_channels is None else in_channels,
        device=torch.device(device),
        dtype=dtype,
    )
    axes = []
    with model_state(net, eval_mode=True, grads=True), torch.enable_grad(), _exact_kernels(device):
        first = probe.measure(size)
        for axis in (0, 1):
            axes.append(_resolve_axis(probe, first, axis))
    oh, ow = first.output_size
    return ReceptiveField(
        layer=str(ref),
        size=(axes[0].size, axes[1].size),
        stride=(axes[0].stride, axes[1].stride),
        offset=(axes[0].offset, axes[1].offset),
        input_size=size,
        output_size=(oh, ow),
        clipped=axes[0].clipped or axes[1].clipped,
    )


# --------------------------------------------------------------------------------------------
# Measurement


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _AxisGeometry:
    size: int
    stride: int
    offset: int
    clipped: bool


@dataclass(frozen=True)
class _Measurement:
    """Boxes of unit ``a`` near the centre and of its lower-right neighbour ``b`` (where the
    output has one along an axis) for one input size."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    units: list[tuple[tuple[int, int], Box]]

    def _ends(self, k: int, axis: int) -> tuple[int, int, int]:
        (unit, box) = self.units[k]
        return unit[axis], box[axis], box[axis + 2]

    def _has_b(self, axis: int) -> bool:
        return len(self.units) > 1 and self.units[1][0][axis] == self.units[0][0][axis] + 1

    def stride(self, axis: int) -> int | None:
        """Shift between the boxes of ``a`` and ``b``, from two edges that the image border did
        not clip (a clipped box starts at 0 or ends at the image size); None if unknown."""
        if not self._has_b(axis):
            return None
        n = self.input_size[axis]
        _, start_a, end_a = self._ends(0, axis)
        _, start_b, end_b = self._ends(1, axis)
        if start_a > 0 and start_b > 0:
            return start_b - start_a
        if end_a < n and end_b < n:
            return end_b - end_a
        return None

    def resolved(self, axis: int) -> bool:
        """Unit ``a``'s box is inside the image and the stride is known."""
        _, start, end = self._ends(0, axis)
        return start > 0 and end < self.input_size[axis] and self.stride(axis) is not None

    def geometry(self, axis: int) -> _AxisGeometry:
        index, start, end = self._ends(0, axis)
        stride = self.stride(axis) or 0
        return _AxisGeometry(
            size=end - start,
            stride=stride,
            offset=start - index * stride,
            clipped=not self.resolved(axis),
        )

    def consistent_with(self, g: _AxisGeometry, axis: int) -> bool:
        """Whether the boxes measured here along ``axis`` agree with ``g``: each lies within the
        predicted box clipped to the image, and equals it where that is inside the image (a box
        clipped by the border may lose pixels next to it that fall in holes of a dilated field).
        """
        n = self.input_size[axis]
        for k in range(len(self.units)):
            index, start, end = self._ends(k, axis)
            top = g.offset + index * g.stride
            bottom = top + g.size
            if top >= 0 and bottom <= n:
                if (start, end) != (top, bottom):
                    return False
            elif not (max(top, 0) <= start and end <= min(bottom, n)):
                return False
        return True


def _resolve_axis(probe: _Probe, first: _Measurement, axis: int) -> _AxisGeometry:
    """Geometry along ``axis``, measured on an input enlarged to about ``MAX_INPUT`` along it.

    A centre unit whose box does not touch the border at the requested size is not proof enough:
    with dilated convolutions the outer taps of a large field may fall beyond the image while the
    box of the taps inside stays clear of the border. So each axis is measured once more on an
    input about ``MAX_INPUT`` long along it. The size added is a multiple of the stride, so that
    the input size modulo each layer's stride, and with it any "same" padding, is unchanged. The
    other side is made as small as keeps two output units (the geometry of convolutions and
    pooling along one axis does not depend on the other), which keeps the pass cheap; if the
    model rejects that input, the requested side is used instead.
    """
    n = first.input_size[axis]
    limit = max(MAX_INPUT, n)
    jump = first.stride(axis) or max(1, math.ceil(n / first.output_size[axis]))
    grown = n + ((limit - n) // jump) * jump
    other = 1 - axis
    n_other, out_other = first.input_size[other], first.output_size[other]
    jump_other = first.stride(other) or max(1, n_other // out_other)
    thin = max(1, n_other - max(0, out_other - 2) * jump_other)
    m = first
    if grown > n:
        for side in dict.fromkeys((thin, n_other)):  # thin first; the full side if that fails
            size = (grown, side) if axis == 0 else (side, grown)
            try:
                m = probe.measure(size)
                break
            except LayerError:
                raise
            except Exception as exc:  # a model that accepts only some input sizes
                logger.debug("receptive_field: input %s failed: %s", size, exc)
    geometry = m.geometry(axis)
    if m is not first and not first.consistent_with(geometry, axis):
        # The geometry depends on the input size (e.g. an adaptive pooling before the layer):
        # report what was seen at the requested size.
        logger.debug("receptive_field: axis %d geometry differs between input sizes", axis)
        geometry = first.geometry(axis)
        geometry = _AxisGeometry(geometry.size, geometry.stride, geometry.offset, clipped=True)
    return geometry


@dataclass
class _Probe:
    net: nn.Module
    module: nn.Module
    ref: LayerRef
    channels: int
    device: torch.device
    dtype: torch.dtype
    call: int | None = None  # the requested call as a non-negative index, once known

    def measure(self, size: tuple[int, int]) -> _Measurement:
        gen = torch.Generator().manual_seed(0)
        b = len(SCALES)
        scales = torch.tensor(SCALES, dtype=self.dtype).view(b, 1, 1, 1)
        base = torch.randn((b, self.channels, *size), generator=gen, dtype=self.dtype) * scales
        x = base.to(self.device).requires_grad_(True)
        out = self._forward(x)
        if out.dim() != 4:
            raise LayerError(
                f"layer {str(self.ref)!r} outputs shape {tuple(out.shape)}; a receptive field "
                "needs a (B, C, H, W) feature map: choose a convolutional layer"
            )
        if not out.requires_grad:
            raise LayerError(
                f"layer {str(self.ref)!r} does not depend on the input through autograd "
                "(its output does not require gradients), so its receptive field cannot be measured"
            )
        oh, ow = int(out.shape[2]), int(out.shape[3])
        ya, xa = max(0, min((oh - 1) // 2, oh - 2)), max(0, min((ow - 1) // 2, ow - 2))
        units = [(ya, xa)]
        if oh > 1 or ow > 1:
            units.append((ya + (oh > 1), xa + (ow > 1)))
        weights = 1.0 + torch.rand((b, out.shape[1]), generator=gen, dtype=self.dtype)
        weights = weights.to(device=out.device, dtype=out.dtype)
        boxes = []
        for k, (y, x_) in enumerate(units):
            score = (out[:, :, y, x_] * weights).sum()
            (grad,) = torch.autograd.grad(
                score, x, retain_graph=k < len(units) - 1, allow_unused=True
            )
            boxes.append(((y, x_), self._support(grad, (y, x_))))
        return _Measurement(input_size=size, output_size=(oh, ow), units=boxes)

    def _support(self, grad: torch.Tensor | None, unit: tuple[int, int]) -> Box:
        mask = None if grad is None else (grad != 0).any(dim=0).any(dim=0)
        if mask is None or not bool(mask.any()):
            raise LayerError(
                f"unit {unit} of layer {str(self.ref)!r} does not depend on the input, so its "
                "receptive field is empty; choose a layer computed from the image"
            )
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model until the layer's requested call; return that call's raw output."""
        if self.call is None:
            # One cheap pass counts the calls when the call is counted from the end.
            self.call = resolve_call(self.net, self.ref, x, forward=self._run).call
        with capture_call(self.module, self.ref.name, self.call) as capture, _StraightThrough():
            self._run(x.clone())  # not the leaf itself: the model may change its input in place
        return capture.output()

    def _run(self, x: torch.Tensor) -> None:
        try:
            self.net(x)
        except ConvlensError:
            raise
        except Exception as exc:
            raise InputError(
                f"the model fails on a random input of shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {exc}); pass the input_size (and in_channels) it accepts"
            ) from exc


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise InputError(f"input_size must be (height, width), two positive integers; got {size!r}")
    return int(size[0]), int(size[1])


def _in_channels(net: nn.Module) -> int:
    return next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), 3)


@contextlib.contextmanager
def _exact_kernels(device: torch.device | str) -> Iterator[None]:
    """Exact zeros outside the support: cuDNN may pick FFT or Winograd kernels, whose rounding
    leaves tiny non-zero gradients everywhere; the native CUDA kernels do not."""
    if torch.device(device).type == "cuda":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


# --------------------------------------------------------------------------------------------
# Straight-through activations


def _identity_grad(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``value`` with the derivative of ``x`` (``x - x.detach()`` is exactly zero)."""
    return value.detach() + (x - x.detach())


#: Out-of-place elementwise ops, and in-place ones with their out-of-place counterpart.
#: ``relu`` and ``clamp``-family functions (:mod:`convlens.hooks.ops`), each with its out-of-place
#: form where it works in place (``None``: it does not).
_ELEMENTWISE: dict[Callable[..., Any], Callable[..., Any] | None] = {
    **dict.fromkeys(ops.RELU | ops.CLAMP | ops.CLAMP_MIN | ops.CLAMP_MAX),
    **ops.OUT_OF_PLACE,
}

#: Functionals with an ``inplace`` argument, and their signatures.
_FUNCTIONAL: dict[Callable[..., Any], inspect.Signature] = {
    f: inspect.signature(f)
    for f in (F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.hardswish, F.hardsigmoid, F.threshold)
}

_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


def _grad_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()


class _StraightThrough(TorchFunctionMode):
    """Piecewise-linear activations with identity derivatives, max pooling with window-sum
    derivatives; values unchanged. Everything else runs as usual."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _ELEMENTWISE:
            return self._elementwise(func, args, kwargs)
        if func in _FUNCTIONAL:
            return self._functional(func, args, kwargs)
        if func in (F.max_pool2d, F.max_pool2d_with_indices):
            return self._max_pool(func, args, kwargs)
        if func in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices):
            return self._adaptive_max_pool(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _elementwise(
        func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        x = args[0] if args else None
        others = [*args[1:], *kwargs.values()]
        if not _grad_tensor(x) or any(_grad_tensor(o) for o in others):
            return func(*args, **kwargs)  # bounds that need gradients: leave as is
        out_of_place = _ELEMENTWISE[func]
        value = (out_of_place or func)(*args, **kwargs)
        if value.shape != x.shape:
            return value if out_of_place is None else func(*args, **kwargs)
        st = _identity_grad(value, x)
        if out_of_place is None:
            return st
        return x.copy_(st)

    @staticmethod
    def _functional(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = _FUNCTIONAL[func].bind(*args, **kwargs)
        x = bound.arguments["input"]
        if not _grad_tensor(x):
            return func(*args, **kwargs)
        inplace = bool(bound.arguments.get("inplace", False))
        bound.arguments["inplace"] = False
        st = _identity_grad(func(*bound.args, **bound.kwargs), x)
        return x.copy_(st) if inplace else st

    @staticmethod
    def _max_pool(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a = dict(zip(_MAX_POOL_ARGS, args, strict=False))
        a.update(kwargs)
        x = a.get("input")
        result = func(*args, **kwargs)
        if not _grad_tensor(x) or x.dim() not in (3, 4) or not x.is_floating_point():
            return result
        value, indices = result if isinstance(result, tuple) else (result, None)
        kh, kw = _pair(a["kernel_size"])
        stride = a.get("stride")
        sh, sw = _pair(stride) if stride not in (None, [], ()) else (kh, kw)
        ph, pw = _pair(a.get("padding", 0))
        dh, dw = _pair(a.get("dilation", 1))
        xb = x if x.dim() == 4 else x.unsqueeze(0)
        oh, ow = value.shape[-2], value.shape[-1]
        # Zero padding (only for the derivative); extra at the bottom/right for ceil_mode.
        extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (xb.shape[2] + 2 * ph))
        extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (xb.shape[3] + 2 * pw))
        padded = F.pad(xb, (pw, pw + extra_w, ph, ph + extra_h))
        ones = xb.new_ones((xb.shape[1], 1, kh, kw))
        window_sum = F.conv2d(padded, ones, stride=(sh, sw), dilation=(dh, dw), groups=xb.shape[1])
        window_sum = window_sum[:, :, :oh, :ow].reshape(value.shape)
        st = _identity_grad(value, window_sum)
        return st if indices is None else (st, indices)

    @staticmethod
    def _adaptive_max_pool(
        func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        a = dict(zip(("input", "output_size"), args, strict=False))
        a.update(kwargs)
        x = a.get("input")
        result = func(*args, **kwargs)
        if not _grad_tensor(x) or not x.is_floating_point():
            return result
        value, indices = result if isinstance(result, tuple) else (result, None)
        mean = F.adaptive_avg_pool2d(x, a["output_size"])
        if mean.shape != value.shape:
            return result
        st = _identity_grad(value, mean)
        return st if indices is None else (st, indices)
