"""The model's state for one call: training flags, ``requires_grad`` and ``.grad`` restored on
exit (:func:`model_state`), and full-float32 convolutions on GPUs (:func:`full_float32`,
:func:`tf32_convolutions`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.errors import InferenceModeError

__all__ = ["check_autograd_available", "full_float32", "model_state", "tf32_convolutions"]


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
