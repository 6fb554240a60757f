"""Every hook convlens puts on a model, each living for one call only.

All context managers here register on entry and remove in ``finally`` (also when registration
fails halfway), and restore what they change. Gradients are taken with ``torch.autograd.grad`` on
captured tensors, never with module backward hooks, so in-place activations and modules called
several times in one forward work.
"""

from __future__ import annotations

import contextlib
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
    grads: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
    values: list[tuple[torch.Tensor, int, torch.Tensor]]


def _snapshot(net: nn.Module) -> _Snapshot:
    params = list(net.parameters())
    tensors = params + [b for b in net.buffers()]
    return _Snapshot(
        training=[(m, m.training) for m in net.modules()],
        # Inference tensors cannot change requires_grad; they never take part in autograd.
        requires_grad=[(p, p.requires_grad) for p in params if not p.is_inference()],
        grads=[(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params],
        values=[(t, t._version, t.detach().clone()) for t in tensors if not t.is_inference()],
    )


def _restore(snap: _Snapshot) -> None:
    for module, flag in snap.training:
        module.training = flag
    with torch.no_grad():
        for tensor, version, value in snap.values:
            if tensor._version != version:
                tensor.copy_(value)
        for param, grad, grad_value in snap.grads:
            param.grad = grad
            if grad is not None and grad_value is not None and not torch.equal(grad, grad_value):
                grad.copy_(grad_value)
    for param, flag in snap.requires_grad:
        param.requires_grad_(flag)


@contextlib.contextmanager
def model_state(
    net: nn.Module, *, eval_mode: bool = True, grads: bool = True
) -> Iterator[nn.Module]:
    """Use a model for one call and leave it exactly as found.

    On entry every module's ``training`` flag, every parameter's ``requires_grad`` and ``.grad``,
    and the values of parameters and buffers are recorded; on exit (also on error) they are
    restored. Inside, the model is in eval mode (``eval_mode``) and parameters do not require
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
