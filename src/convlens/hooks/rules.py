"""Backward rules for ReLU-like activations (deconvnet, guided backpropagation), applied for one
block by a torch-function mode (:func:`backprop_rule`); the model itself is not changed. The
functions recognised are those of :mod:`convlens.hooks.ops`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from convlens.hooks.ops import NO_RULE, relu_like

__all__ = ["RULES", "BackpropRuleMode", "backprop_rule"]

RULES = ("gradient", "deconvnet", "guided", "pass")
"""Backward rules for ReLU-like units ``y = clamp(x, 0, upper)`` with incoming signal ``R``:

- ``gradient``: ``R`` times the unit's own derivative (the true gradient), with the convention of
  the running torch's autograd where ``x`` sits exactly on a bound or is NaN (measured from torch
  itself, :func:`_autograd_convention`: torch 2.13 passes ``clamp``'s bounds, 2.14 does not);
- ``deconvnet``: ``ReLU(R)`` (Zeiler & Fergus: the reconstruction is rectified; the forward
  mask is ignored);
- ``guided``: ``ReLU(R) * [0 < x < upper]`` (Springenberg et al.: both);
- ``pass``: ``R`` (straight through; used for receptive fields).
"""

_INF = float("inf")


@dataclass(frozen=True)
class _Convention:
    """Where autograd passes the gradient of a unit ``clamp(x, 0, upper)`` besides ``0 < x <
    upper`` (it never passes below or above): at ``x == 0``, at ``x == upper``, at NaN."""

    lower: bool
    upper: bool
    nan: bool

    def mask(self, x: torch.Tensor, upper: float) -> torch.Tensor:
        """Where the gradient passes, one byte per value of ``x``."""
        mask = x >= 0 if self.lower else x > 0
        if upper != _INF:
            mask.logical_and_(x <= upper if self.upper else x < upper)
        return mask.logical_or_(x.isnan()) if self.nan else mask


def _reference_unit(kind: str, upper: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch operation of family ``kind`` (see :func:`convlens.hooks.ops.relu_like`), out
    of place."""
    if kind == "relu":
        return torch.relu
    if kind == "relu6":
        return F.relu6
    if kind == "hardtanh":
        return lambda t: F.hardtanh(t, 0.0, upper)
    if kind == "clamp":
        return lambda t: torch.clamp(t, 0.0, None if upper == _INF else upper)
    if kind == "clamp_min":
        return lambda t: torch.clamp_min(t, 0.0)
    raise ValueError(f"unknown unit kind {kind!r}")


@functools.cache
def _measured_convention(
    torch_version: str, kind: str, upper: float, dtype: torch.dtype
) -> _Convention | None:
    """Torch's own autograd convention for the unit, measured by one backward pass through it on
    points below, between, on and above the bounds, at infinities and at NaN (on the CPU: the
    backward formulas are device-independent). ``None`` when torch's gradient there is not a
    pass-or-block mask of that shape (e.g. half the gradient on a bound); the unit is then left
    to autograd. ``torch_version`` only keys the cache: the result is a function of the torch
    installed."""
    finite = upper != _INF
    blocked = [-_INF, -1.0] + ([upper + 1.0, _INF] if finite else [])
    passed = [upper / 2] if finite else [1.0, _INF]
    on_bounds = [-0.0, 0.0] + ([upper] if finite else [])
    points = blocked + passed + on_bounds + [float("nan")]
    # No torch-function mode (another rule) may touch the probe, whatever context calls it.
    with torch._C.DisableTorchFunction(), torch.inference_mode(False), torch.enable_grad():
        t = torch.tensor(points, dtype=dtype, requires_grad=True)
        try:
            (grad,) = torch.autograd.grad(_reference_unit(kind, upper)(t).sum(), t)
        except RuntimeError:  # no CPU backward for this dtype: leave the unit to autograd
            return None
    g = grad.double().tolist()
    n_b, n_p = len(blocked), len(passed)
    bounds, nan = g[n_b + n_p : -1], g[-1]
    if (
        any(v not in (0.0, 1.0) for v in g)
        or any(g[:n_b])
        or not all(g[n_b : n_b + n_p])
        or bounds[0] != bounds[1]  # -0.0 and 0.0
    ):
        return None
    return _Convention(lower=bool(bounds[1]), upper=finite and bool(bounds[-1]), nan=bool(nan))


def _autograd_convention(kind: str, upper: float, dtype: torch.dtype) -> _Convention | None:
    """:func:`_measured_convention` for the torch running now (computed once per unit, bound and
    dtype)."""
    probe_dtype = dtype if dtype.is_floating_point else torch.float32
    return _measured_convention(torch.__version__, kind, float(upper), probe_dtype)


class _ReluRule(torch.autograd.Function):
    """``clamp(x, 0, upper)`` forward; the chosen rule backward. For the ``gradient`` rule
    ``convention`` says where autograd passes the gradient on the bounds (see :data:`RULES`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, upper: float, rule: str, convention: _Convention | None = None
    ) -> torch.Tensor:
        out = x.clamp(min=0.0) if upper == _INF else x.clamp(0.0, upper)
        ctx.rule = rule
        if rule == "gradient":
            if convention is None:
                raise ValueError("the gradient rule needs autograd's convention at the bounds")
            ctx.save_for_backward(convention.mask(x, upper))
        elif rule == "guided":
            mask = x > 0 if upper == _INF else (x > 0) & (x < upper)
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.rule == "pass":
            return grad, None, None, None
        if ctx.rule == "deconvnet":
            return grad.clamp(min=0.0), None, None, None
        (mask,) = ctx.saved_tensors
        if ctx.rule == "guided":
            grad = grad.clamp(min=0.0)
        return torch.where(mask, grad, 0.0), None, None, None


class BackpropRuleMode(torch.overrides.TorchFunctionMode):
    """Applies a backward rule to every ReLU-like operation run while the mode is active.

    Works on ``nn.ReLU``/``nn.ReLU6`` modules (in place or not, called any number of times)
    and on functional calls (``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.relu6``,
    ``F.hardtanh(x, 0, m)``, ``x.clamp(min=0)``, ``clamp_min(x, 0)``), because all of them go
    through these functions. Activations with no rule (SiLU, GELU, LeakyReLU, ...) are
    recorded in :attr:`unsupported`.
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        self.rule = rule
        self.count = 0
        self.unsupported: set[str] = set()

    def check(self, method: str, *, strict: bool = True) -> None:
        """Raise when the rule could not apply as asked.

        Raises:
            UnsupportedModelError: no ReLU-like unit ran, or (``strict``) activations without a
                rule ran too.
        """
        from convlens.errors import UnsupportedModelError

        if self.count == 0:
            raise UnsupportedModelError(
                f"{method} needs ReLU-like activations (nn.ReLU, nn.ReLU6, F.relu, "
                "clamp(min=0)), and the model ran none; use 'saliency' or 'gradcam'"
            )
        if self.unsupported and strict:
            names = ", ".join(sorted(self.unsupported))
            raise UnsupportedModelError(
                f"{method} defines a backward rule for ReLU-like units only, but the model also "
                f"uses {names}; the map would be a mix of rules. Pass strict=False to apply the "
                "rule to the ReLUs and plain gradients elsewhere."
            )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        spec = relu_like(func, args, kwargs)
        if spec is None:
            name = NO_RULE.get(func)
            if name is not None:
                self.unsupported.add(name)
            return func(*args, **kwargs)
        x, upper, inplace, kind = spec
        self.count += 1
        convention = None
        if self.rule == "gradient":
            convention = _autograd_convention(kind, upper, x.dtype)
            if convention is None:  # not a mask: torch's own operation is the gradient rule
                return func(*args, **kwargs)
        out = _ReluRule.apply(x, upper, self.rule, convention)
        if inplace:
            with torch.no_grad() if not x.requires_grad else contextlib.nullcontext():
                x.copy_(out)
            return x
        return out


@contextlib.contextmanager
def backprop_rule(rule: str) -> Iterator[BackpropRuleMode]:
    """Apply ``rule`` (see :data:`RULES`) to the backward pass of every ReLU-like operation
    run inside the block; the model itself is not changed."""
    mode = BackpropRuleMode(rule)
    with mode:
        yield mode
