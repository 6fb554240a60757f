"""Every hook convlens puts on a model, each living for one call only.

All context managers here register on entry and remove in ``finally`` (also when registration
fails halfway), and restore what they change. Gradients are taken with ``torch.autograd.grad`` on
captured tensors, never with module backward hooks, so in-place activations and modules called
several times in one forward work.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from convlens.errors import InferenceModeError, LayerError, close_matches

__all__ = [
    "LayerCapture",
    "check_autograd_available",
    "full_float32",
    "hooks",
    "layer_capture",
    "model_state",
    "named_module",
]


@contextlib.contextmanager
def hooks(register: Sequence[Callable[[], RemovableHandle]]) -> Iterator[list[RemovableHandle]]:
    """Register several hooks all-or-nothing and remove them all on exit.

    Args:
        register: zero-argument callables, each registering one hook and returning its handle.

    Yields:
        The handles, in registration order.
    """
    handles: list[RemovableHandle] = []
    try:
        for reg in register:
            handles.append(reg())
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()


@dataclass
class _Snapshot:
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[torch.Tensor, bool]]
    grads: list[tuple[torch.Tensor, torch.Tensor | None]]
    versions: list[tuple[str, torch.Tensor, int]]


def _snapshot(net: nn.Module) -> _Snapshot:
    params = list(net.parameters())
    named = list(net.named_parameters()) + list(net.named_buffers())
    grads = [(n + ".grad", p.grad) for n, p in net.named_parameters() if p.grad is not None]
    return _Snapshot(
        training=[(m, m.training) for m in net.modules()],
        # Inference tensors cannot change requires_grad; they never take part in autograd.
        requires_grad=[(p, p.requires_grad) for p in params if not p.is_inference()],
        grads=[(p, p.grad) for p in params],
        versions=[
            (n, t, t._version) for n, t in named + grads if t is not None and not t.is_inference()
        ],
    )


def _restore(snap: _Snapshot) -> None:
    for module, flag in snap.training:
        module.training = flag
    for param, grad in snap.grads:
        param.grad = grad
    for param, flag in snap.requires_grad:
        param.requires_grad_(flag)
    changed = [name for name, t, version in snap.versions if t._version != version]
    if changed:
        warnings.warn(
            f"the model changed {len(changed)} of its own tensors in place during the call "
            f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); convlens never "
            "writes parameters, buffers or .grad, so the model's own forward did",
            RuntimeWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def model_state(
    net: nn.Module, *, eval_mode: bool = True, grads: bool = True
) -> Iterator[nn.Module]:
    """Use a model for one call and leave it exactly as found.

    On entry every module's ``training`` flag and every parameter's ``requires_grad`` and
    ``.grad`` are recorded; on exit (also on error) they are restored. Parameter, buffer and
    ``.grad`` values are never written by convlens (parameters are frozen inside, so no gradient
    accumulates); their version counters are checked on exit, and a ``RuntimeWarning`` names any
    tensor the model's own forward changed in place (copying every weight on every call to be
    able to undo that would cost more than the explanation).

    Inside, the model is in eval mode (``eval_mode``) and parameters do not require
    gradients, so backward passes compute input/activation gradients only.

    Args:
        net: the user's model.
        eval_mode: switch every module to eval mode for the call.
        grads: the caller will take gradients; fails early under ``torch.inference_mode``.

    Raises:
        InferenceModeError: ``grads`` is set and gradients cannot be taken.
    """
    if grads:
        check_autograd_available(net)
    snap = _snapshot(net)
    try:
        if eval_mode:
            net.eval()
        for param, _ in snap.requires_grad:
            param.requires_grad_(False)
        yield net
    finally:
        _restore(snap)


_FLOAT32_LOCK = threading.Lock()
_float32_depth = 0
_float32_saved: tuple[Any, ...] = ()


def _precision_settings() -> list[tuple[Any, str]]:
    """The per-operator ``fp32_precision`` settings (PyTorch >= 2.9), or [] on older versions."""
    b = torch.backends
    owners = [
        getattr(getattr(b.cudnn, "conv", None), "fp32_precision", None),
        getattr(getattr(b.cudnn, "rnn", None), "fp32_precision", None),
        getattr(b.cuda.matmul, "fp32_precision", None),
    ]
    if any(o is None for o in owners):
        return []
    return [
        (b.cudnn.conv, "fp32_precision"),
        (b.cudnn.rnn, "fp32_precision"),
        (b.cuda.matmul, "fp32_precision"),
    ]


def tf32_convolutions() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 now (outside :func:`full_float32`:
    PyTorch's default on Ampere and later GPUs). Reads the per-operator ``fp32_precision``
    (PyTorch >= 2.9; ``"none"`` defers to the parent setting), since reading the legacy
    ``allow_tf32`` flag raises once the new API is in use; ``True`` when undecidable (the
    caller then allows for TF32 rounding)."""
    b = torch.backends
    for owner in (getattr(b.cudnn, "conv", None), b.cudnn, b):
        value = getattr(owner, "fp32_precision", None)
        if value in ("ieee", "tf32"):
            return value == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # mixed legacy and new settings
        return True


def _enter_full_float32() -> tuple[Any, ...]:
    settings = _precision_settings()
    if settings:  # the current API; reading the legacy flags can raise once it is in use
        saved = tuple(getattr(owner, attr) for owner, attr in settings)
        for owner, attr in settings:
            setattr(owner, attr, "ieee")
        return ("new", settings, saved)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved_flags = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    return ("legacy", saved_flags)


def _exit_full_float32(saved: tuple[Any, ...]) -> None:
    if saved[0] == "new":
        for (owner, attr), value in zip(saved[1], saved[2], strict=True):
            setattr(owner, attr, value)
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1]


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Run float32 convolutions and matrix products in full float32 for one call.

    cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) by default on Ampere and later
    GPUs. That is harmless for a prediction, but not for an explanation: on an H100 it moved the
    input-gradient (saliency) maps of EfficientNet-Lite0 by up to 28% of their maximum against
    the CPU (Grad-CAM by 0.1%; ``tests/test_gpu.py``). The settings are process-wide: the
    per-operator ``fp32_precision`` of cuDNN convolutions and RNNs and of CUDA matrix products
    are set to ``"ieee"`` (the legacy ``allow_tf32`` flags on PyTorch < 2.9) and restored on
    exit, also on error. Calls that overlap (threads) share one change: the first to enter saves
    the settings and the last to leave restores them. No effect on CPUs.
    """
    global _float32_depth, _float32_saved
    with _FLOAT32_LOCK:
        if _float32_depth == 0:
            _float32_saved = _enter_full_float32()
        _float32_depth += 1
    try:
        yield
    finally:
        with _FLOAT32_LOCK:
            _float32_depth -= 1
            if _float32_depth == 0:
                _exit_full_float32(_float32_saved)
                _float32_saved = ()


def check_autograd_available(net: nn.Module) -> None:
    """Raise a clear error when gradients through ``net`` are impossible.

    Raises:
        InferenceModeError: called under ``torch.inference_mode()`` or ``torch.no_grad()``, or
            the model's parameters are inference tensors.
    """
    if torch.is_inference_mode_enabled():
        raise InferenceModeError(
            "this method needs gradients but was called inside torch.inference_mode(); "
            "call it outside that block"
        )
    for p in net.parameters():
        if p.is_inference():
            raise InferenceModeError(
                "the model's parameters were created inside torch.inference_mode() and cannot "
                "take part in a backward pass; build or load the model outside inference mode"
            )
        break


def named_module(net: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path).

    Raises:
        LayerError: no such module; the message lists close matches.
    """
    modules = dict(net.named_modules())
    if name not in modules or name == "":
        hint = close_matches(name, [n for n in modules if n])
        raise LayerError(
            f"no layer named {name!r} in the model.{hint} "
            "Run `convlens layers MODEL` to list the layers."
        )
    return modules[name]


@dataclass
class LayerCapture:
    """Outputs of one module, one entry per call in the forward pass.

    With ``grad=True`` each captured output is part of the autograd graph so that
    ``torch.autograd.grad(score, capture.output())`` gives dS/dA; the graph starts at the first
    call of the module, so nothing before the layer is differentiated.
    """

    name: str
    grad: bool
    outputs: list[torch.Tensor] = field(default_factory=list)

    def output(self, call: int = -1) -> torch.Tensor:
        """The output of call ``call`` (default: the last call).

        Raises:
            LayerError: the module was not called, or has no such call.
        """
        if not self.outputs:
            raise LayerError(f"layer {self.name!r} was not used in the forward pass")
        try:
            return self.outputs[call]
        except IndexError:
            raise LayerError(
                f"layer {self.name!r} was called {len(self.outputs)} time(s); "
                f"there is no call {call}"
            ) from None

    def hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            raise LayerError(
                f"layer {self.name!r} returns {type(out).__name__}, not a tensor; "
                "choose a layer whose output is a feature map"
            )
        if not self.grad:
            # Clone: an in-place op after the layer (ReLU(inplace=True)) must not change it.
            self.outputs.append(out.detach().clone())
            return None
        captured = out if out.requires_grad else out.detach().requires_grad_(True)
        self.outputs.append(captured)
        # Hand the rest of the network a copy, so in-place ops after the layer leave the
        # captured activation (and the leaf) untouched.
        return captured.clone()


@contextlib.contextmanager
def layer_capture(net: nn.Module, name: str, *, grad: bool = False) -> Iterator[LayerCapture]:
    """Capture a layer's outputs for the duration of the block.

    Args:
        net: the model.
        name: dotted module name.
        grad: keep the captured outputs in the autograd graph (see :class:`LayerCapture`).
    """
    module = named_module(net, name)
    capture = LayerCapture(name=name, grad=grad)
    with hooks([lambda: module.register_forward_hook(capture.hook)]):
        yield capture


# --------------------------------------------------------------------------------------------
# Backprop rules for ReLU-like activations (deconvnet, guided backpropagation)
# --------------------------------------------------------------------------------------------

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
    """The torch operation of family ``kind`` (see :func:`_relu_like`), out of place."""
    if kind == "relu":
        return torch.relu
    if kind == "relu6":
        return _F.relu6
    if kind == "hardtanh":
        return lambda t: _F.hardtanh(t, 0.0, upper)
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


_F = torch.nn.functional
_RELU = {torch.relu, _F.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
_CLAMP = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip}
_CLAMP_INPLACE = {torch.clamp_, torch.Tensor.clamp_, torch.Tensor.clip_}
_CLAMP_MIN = {torch.clamp_min, torch.Tensor.clamp_min}
_CLAMP_MIN_INPLACE = {torch.clamp_min_, torch.Tensor.clamp_min_}
_NO_RULE = {
    _F.leaky_relu: "leaky_relu",
    _F.elu: "elu",
    _F.selu: "selu",
    _F.celu: "celu",
    _F.gelu: "gelu",
    _F.silu: "silu",
    _F.mish: "mish",
    _F.hardswish: "hardswish",
    _F.softplus: "softplus",
    _F.prelu: "prelu",
    _F.rrelu: "rrelu",
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[i] if len(args) > i else default


def _relu_like(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, float, bool, str] | None:
    """``(input, upper bound, in place, kind)`` when ``func(*args)`` is a ReLU-like unit;
    ``kind`` (``relu``, ``relu6``, ``hardtanh``, ``clamp``, ``clamp_min``) names the torch
    operation whose autograd convention at the bounds applies (:func:`_reference_unit`)."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if func in _RELU:
        return x, float("inf"), bool(_arg(args, kwargs, 1, "inplace", False)), "relu"
    if func in _RELU_INPLACE:
        return x, float("inf"), True, "relu"
    if func is _F.relu6:
        return x, 6.0, bool(_arg(args, kwargs, 1, "inplace", False)), "relu6"
    if func is _F.hardtanh:
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        if lo == 0 and hi > 0:
            return x, float(hi), bool(_arg(args, kwargs, 3, "inplace", False)), "hardtanh"
        return None
    if func in _CLAMP or func in _CLAMP_INPLACE:
        lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        if (
            isinstance(lo, (int, float))
            and lo == 0
            and (hi is None or (isinstance(hi, (int, float)) and hi > 0))
        ):
            upper = float("inf") if hi is None else float(hi)
            return x, upper, func in _CLAMP_INPLACE, "clamp"
        return None
    if func in _CLAMP_MIN or func in _CLAMP_MIN_INPLACE:
        lo = _arg(args, kwargs, 1, "min", None)
        if isinstance(lo, (int, float)) and lo == 0:
            return x, float("inf"), func in _CLAMP_MIN_INPLACE, "clamp_min"
    return None


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
        spec = _relu_like(func, args, kwargs)
        if spec is None:
            name = _NO_RULE.get(func)
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
