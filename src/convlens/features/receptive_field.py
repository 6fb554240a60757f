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
of two neighbouring units, and the offset is extrapolated from one of them. Units are taken near
the centre so that their boxes are not clipped by the image border; when the layer's RF does not
fit in ``input_size`` (deep layers at 224x224), the input is enlarged (keeping its size modulo the
stride, so that "same" padding stays the same) until it fits, up to 1024 pixels per side.
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

from convlens.architecture import LayerRef, parse_layer
from convlens.errors import InputError, LayerError
from convlens.hooks import hooks, model_state, named_module

__all__ = ["ReceptiveField", "receptive_field"]

logger = logging.getLogger(__name__)

#: Largest input side tried when the RF does not fit in the requested input size.
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
        clipped: the RF did not fit in the largest input tried (or in the requested one, when the
            model's geometry depends on the input size), so ``size`` is the part of it that was
            measured inside the image and boxes may be too small.
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
        InputError: ``input_size`` is not two positive integers.
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
    with model_state(net, eval_mode=True, grads=True), torch.enable_grad(), _exact_kernels(device):
        first = probe.measure(size)
        last = first
        current = size
        while last.touches_border():
            grown = _grow(current, last)
            if grown == current:
                break
            try:
                nxt = probe.measure(grown)
            except LayerError:
                raise
            except Exception as exc:  # a model that only accepts some input sizes
                logger.debug("receptive_field: input %s failed (%s); stopping", grown, exc)
                break
            current, last = grown, nxt
    geometry = last.geometry()
    clipped = last.touches_border()
    if last is not first and not geometry.explains(first):
        # The model's geometry depends on the input size (e.g. padding fixed for one size):
        # report what was seen at the requested size.
        logger.debug("receptive_field: geometry at %s differs from %s", current, size)
        geometry, clipped = first.geometry(), True
    h, w = size
    oh, ow = first.output_size
    for axis, (n_in, n_out) in enumerate(((h, oh), (w, ow))):
        if not clipped and n_in % n_out == 0 and geometry.stride[axis] != n_in // n_out:
            logger.debug(
                "receptive_field: %s stride %d along axis %d, but input/output is %d",
                ref,
                geometry.stride[axis],
                axis,
                n_in // n_out,
            )
    return ReceptiveField(
        layer=str(ref),
        size=geometry.size,
        stride=geometry.stride,
        offset=geometry.offset,
        input_size=size,
        output_size=first.output_size,
        clipped=clipped,
    )


# --------------------------------------------------------------------------------------------
# Measurement


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def explains(self, m: _Measurement) -> bool:
        """Whether this geometry predicts the (clipped) boxes measured in ``m``."""
        h, w = m.input_size
        for (y, x), box in m.units:
            top, left = self.offset[0] + y * self.stride[0], self.offset[1] + x * self.stride[1]
            predicted = (
                max(top, 0),
                max(left, 0),
                min(top + self.size[0], h),
                min(left + self.size[1], w),
            )
            if predicted != box:
                return False
        return True


@dataclass(frozen=True)
class _Measurement:
    """Boxes of unit ``a`` and (where the output has one) its lower-right neighbour ``b``."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    units: list[tuple[tuple[int, int], Box]]

    def _axis(self, axis: int) -> tuple[int, int, int | None, int, int]:
        """``(index_a, start_a, start_b or None, end_a, size)`` along one axis."""
        (ia, box_a) = self.units[0][0][axis], self.units[0][1]
        start_a, end_a = box_a[axis], box_a[axis + 2]
        start_b = None
        if len(self.units) > 1 and self.units[1][0][axis] == ia + 1:
            start_b = self.units[1][1][axis]
        return ia, start_a, start_b, end_a, self.input_size[axis]

    def touches_border(self, axis: int | None = None) -> bool:
        """A box reaches the image border, or there is no neighbour to measure the stride."""
        if axis is None:
            return self.touches_border(0) or self.touches_border(1)
        _, _, start_b, _, n = self._axis(axis)
        if start_b is None:
            return True
        return any(box[axis] <= 0 or box[axis + 2] >= n for _, box in self.units)

    def geometry(self) -> _Geometry:
        size, stride, offset = [], [], []
        for axis in (0, 1):
            ia, start_a, start_b, end_a, _ = self._axis(axis)
            jump = 0 if start_b is None else start_b - start_a
            size.append(end_a - start_a)
            stride.append(jump)
            offset.append(start_a - ia * jump)
        return _Geometry(
            size=(size[0], size[1]), stride=(stride[0], stride[1]), offset=(offset[0], offset[1])
        )


class _Stop(BaseException):
    """Ends the forward pass once the layer has run (BaseException: model code that catches
    ``Exception`` must not swallow it)."""


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
        seen: list[torch.Tensor] = []
        calls = 0

        def record(module: nn.Module, args: Any, out: Any) -> Any:
            nonlocal calls
            index, calls = calls, calls + 1
            target = self.call if self.call is not None else self.ref.call
            if target >= 0 and index != target:
                return None
            if not isinstance(out, torch.Tensor):
                raise LayerError(
                    f"layer {str(self.ref)!r} returns {type(out).__name__}, not a tensor; "
                    "choose a layer whose output is a feature map"
                )
            seen[:] = [out]
            if target >= 0:
                raise _Stop
            # Later in-place operations (ReLU(inplace=True), x += ...) must not change the
            # captured output: the rest of the model gets a copy.
            return out.clone()

        with (
            hooks([lambda: self.module.register_forward_hook(record)]),
            _StraightThrough(),
            contextlib.suppress(_Stop),
        ):
            self.net(x)
        if self.call is None:
            if self.ref.call < 0:
                index = calls + self.ref.call
                if index < 0:
                    raise self._missing(calls)
                if index != calls - 1:  # an earlier call from the end: run again, stopping there
                    self.call = index
                    return self._forward(x)
                self.call = index
            else:
                self.call = self.ref.call
        if not seen:
            raise self._missing(calls)
        return seen[0]

    def _missing(self, calls: int) -> LayerError:
        if calls == 0:
            return LayerError(
                f"layer {self.ref.name!r} is not used in the model's forward pass; "
                "choose a layer the model calls"
            )
        return LayerError(
            f"layer {self.ref.name!r} is called {calls} time(s) per forward pass; there is no "
            f"call {self.ref.call} (use 'name@0' .. 'name@{calls - 1}', or 'name' for the last)"
        )


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


def _grow(current: tuple[int, int], m: _Measurement) -> tuple[int, int]:
    """A larger input for the axes whose boxes touch the border.

    Adds a multiple of the measured stride (about doubling the side), so that the input size
    modulo every layer's stride, and with it any "same" padding, stays the same.
    """
    geometry = m.geometry()
    out = list(current)
    for axis in (0, 1):
        if not m.touches_border(axis):
            continue
        n = current[axis]
        limit = max(MAX_INPUT, n)
        jump = geometry.stride[axis]
        if jump <= 0:
            jump = max(1, math.ceil(n / m.output_size[axis]))
        steps = max(1, math.ceil(n / jump))
        grown = n + steps * jump
        if grown > limit:
            grown = n + ((limit - n) // jump) * jump
        out[axis] = grown
    return out[0], out[1]


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
_ELEMENTWISE: dict[Callable[..., Any], Callable[..., Any] | None] = {
    torch.relu: None,
    torch.Tensor.relu: None,
    torch.clamp: None,
    torch.Tensor.clamp: None,
    torch.clamp_min: None,
    torch.Tensor.clamp_min: None,
    torch.clamp_max: None,
    torch.Tensor.clamp_max: None,
    torch.clip: None,
    torch.Tensor.clip: None,
    torch.relu_: torch.relu,
    torch.Tensor.relu_: torch.Tensor.relu,
    torch.clamp_: torch.clamp,
    torch.Tensor.clamp_: torch.Tensor.clamp,
    torch.clamp_min_: torch.clamp_min,
    torch.Tensor.clamp_min_: torch.Tensor.clamp_min,
    torch.clamp_max_: torch.clamp_max,
    torch.Tensor.clamp_max_: torch.Tensor.clamp_max,
    torch.clip_: torch.clip,
    torch.Tensor.clip_: torch.Tensor.clip,
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
    def _elementwise(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
        a = dict(zip(_MAX_POOL_ARGS, args))
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
        a = dict(zip(("input", "output_size"), args))
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
