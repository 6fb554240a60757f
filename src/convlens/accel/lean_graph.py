"""Lean autograd graphs for gradients with respect to the input only (accelerator
``Acceleration.lean_graph``).

With every parameter frozen, autograd still saves each operation's input for parameter
gradients that are never computed. :class:`InputGradientMode` replaces, for one block,
``conv2d`` by a function that saves only its weight (``dL/dx = conv_transpose(dL/dy, W)``),
inference-mode ``batch_norm`` by one that saves one scale per channel (``dL/dx = s dL/dy``,
``s = gamma / sqrt(var + eps)``), and ReLU-like units by the ``"gradient"`` rule of
:class:`convlens.hooks.BackpropRuleMode` (a one-byte mask). The gradients are plain autograd's
up to rounding; the plain path (``Acceleration.plain()``) never enters this mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from convlens.hooks.ops import arg, relu_like
from convlens.hooks.rules import BackpropRuleMode

__all__ = ["InputGradientMode", "input_gradient_mode"]


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` with a frozen weight: backward to the input only, saving only the weight.

    Autograd's own ``conv2d`` saves its input for the weight gradient; with frozen weights that
    copy of every activation is never used. ``dL/dx = conv_transpose(dL/dy, W)`` needs the
    input's shape only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ctx.conv = (x.shape, fmt, weight, stride, padding, dilation, groups)
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        shape, fmt, weight, stride, padding, dilation, groups = ctx.conv
        # The kernel never reads the input's values for dL/dx; an uninitialised tensor gives it
        # the shape and layout without a copy of the activation (a stride-0 view would be made
        # contiguous, a copy per call).
        x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
        # Under autocast the forward convolved a 16-bit copy of the float32 weight, so the
        # incoming gradient is 16-bit; give the kernel one dtype for all three (the CPU
        # tolerates a mix, cuDNN is not known to; untested on a GPU). Autograd casts the result
        # to the input's dtype.
        g = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight.to(grad.dtype),
            None,
            stride,
            padding,
            dilation,
            False,
            [0],
            groups,
            (True, False, False),
        )[0]
        return g, None, None, None, None, None, None


class _FrozenBatchNorm(torch.autograd.Function):
    """Inference-mode ``batch_norm`` (running statistics, frozen affine): ``y = s x + t``.

    Backward is ``dL/dx = s dL/dy`` with ``s = w / sqrt(var + eps)`` per channel; only ``s``
    is kept (autograd's own batch norm saves the whole input for the parameter gradients).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        ctx.scale = scale
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return grad * ctx.scale, None, None, None, None, None, None


def _frozen(*tensors: Any) -> bool:
    """No tensor among ``tensors`` (``None`` allowed) requires a gradient."""
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _int_pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _rule_mode_outside() -> bool:
    """A :class:`BackpropRuleMode` is active below the mode now running (inside a mode's
    ``__torch_function__`` that mode is off the stack, so the stack holds the outer ones)."""
    stack = torch.overrides._get_current_function_mode_stack()
    return any(isinstance(m, BackpropRuleMode) for m in stack)


class InputGradientMode(BackpropRuleMode):
    """Leaner autograd graphs for gradients with respect to the input only.

    With every parameter frozen (as inside :func:`convlens.hooks.model_state`), autograd still
    saves each operation's input for the parameter gradients that will never be computed. While
    this mode is active, and only where the parameters do not require gradients:

    - ``conv2d`` saves nothing but its weight (``dL/dx = conv_transpose(dL/dy, W)``);
    - inference-mode ``batch_norm`` saves one scale per channel (``dL/dx = s dL/dy``);
    - ReLU-like units (``relu``, ``relu6``, ``hardtanh(x, 0, m)``, ``clamp(min=0)``) save a
      one-byte mask instead of their float input (:class:`BackpropRuleMode` with the
      ``"gradient"`` rule, the true gradient, with the running torch's convention on the bounds;
      a unit whose gradient there is no mask is left to autograd).

    The gradients are those of plain autograd (the same operations in the other order, so equal
    up to rounding); every other operation is left to autograd. On a conv-BN-ReLU network the
    graph kept for the backward pass shrinks to about a twelfth (one byte per activation value
    instead of three saved float tensors), so more images fit in one pass (measurements:
    ``benchmarks/RESULTS.md``). The price is a few Python-level autograd Functions per layer:
    negligible on a CPU, noticeable on a GPU when passes are small. Gradients with respect to
    the parameters, or second derivatives, must not be taken inside the mode.

    Inside an outer :func:`convlens.hooks.backprop_rule` block (or another rule mode),
    ReLU-like units are left to that mode, so its rule applies (``with backprop_rule("guided")``
    around a saliency call gives guided backpropagation); convolutions and batch norms are
    still made lean.
    """

    def __init__(self) -> None:
        super().__init__("gradient")
        # Batch-norm scales, computed once per layer while the mode lives (one explanation).
        self._scales: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            if func is torch.conv2d:
                out = self._conv2d(args, kwargs)
                if out is not None:
                    return out
            elif func is torch.nn.functional.batch_norm:
                out = self._batch_norm(args, kwargs)
                if out is not None:
                    return out
        if relu_like(func, args, kwargs) is not None and _rule_mode_outside():
            # The outer rule mode runs next in the stack and applies its own rule (e.g.
            # guided); handling the unit here first would hide it from that mode.
            return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    @staticmethod
    def _conv2d(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        pairs_in = enumerate(zip(names, defaults, strict=True))
        a = [arg(args, kwargs, i, n, d) for i, (n, d) in pairs_in]
        x, weight, bias, stride, padding, dilation, groups = a
        if x.dim() != 4:
            return None
        pairs = [_int_pair(v) for v in (stride, padding, dilation)]
        if not _frozen(weight, bias) or None in pairs or not isinstance(groups, int):
            return None  # e.g. padding="same": leave it to autograd
        return _FrozenConv2d.apply(x, weight, bias, *pairs, groups)

    def _batch_norm(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training")
        defaults = (None, None, None, None, None, False)
        pairs_in = enumerate(zip(names, defaults, strict=True))
        x, mean, var, weight, bias, training = (
            arg(args, kwargs, i, n, d) for i, (n, d) in pairs_in
        )
        eps = arg(args, kwargs, 7, "eps", 1e-5)
        if training or mean is None or var is None or not _frozen(weight, bias, mean, var):
            return None
        w_version = None if weight is None else weight._version
        key = (id(var), var._version, id(weight), w_version, float(eps), x.dtype, x.dim())
        hit = self._scales.get(key)
        if hit is None or hit[0] is not var or hit[1] is not weight:
            scale = torch.rsqrt(var + eps)
            if weight is not None:
                scale = scale * weight
            scale = scale.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
            hit = (var, weight, scale)  # the tensors keep their ids valid
            self._scales[key] = hit
        return _FrozenBatchNorm.apply(x, mean, var, weight, bias, float(eps), hit[2])


@contextlib.contextmanager
def input_gradient_mode() -> Iterator[InputGradientMode]:
    """Build lean graphs for input gradients inside the block (:class:`InputGradientMode`);
    the model itself is not changed."""
    with InputGradientMode() as mode:
        yield mode
