"""Capturing what one layer of a model computes, with hooks that live for one call only.

Every context manager here registers on entry and removes in ``finally`` (also when
registration fails halfway). Layers are found by dotted name (:func:`named_module`); one call of
a module called several times per forward pass is an index (``name@call`` in
:func:`convlens.architecture.parse_layer`, made absolute by
:func:`convlens.architecture.resolve_call`). A forward pass that is only needed up to a layer
ends there (:func:`capture_call`, :class:`StopForward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from convlens.errors import LayerError, close_matches

__all__ = [
    "CallCapture",
    "LayerCapture",
    "StopForward",
    "call_error",
    "capture_call",
    "hooks",
    "layer_capture",
    "named_module",
    "stoppable",
]

_LIST_HINT = "Run `convlens layers MODEL` to list the layers."


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


def named_module(net: nn.Module, name: str) -> nn.Module:
    """The submodule of ``net`` with the dotted ``name`` (``"features.3"``,
    ``"_blocks.15._project_conv"``); surrounding spaces are ignored.

    Raises:
        LayerError: the name is empty, names a parameter or buffer, or no submodule has it (the
            message suggests close names).
    """
    key = name.strip()
    if not key:
        raise LayerError(f"empty layer name. {_LIST_HINT}")
    try:
        return net.get_submodule(key)
    except AttributeError:
        pass
    tensors = dict(net.named_parameters())
    tensors.update(net.named_buffers())
    if key in tensors:
        owner = key.rpartition(".")[0]
        of = f" of layer {owner!r}" if owner else ""
        raise LayerError(f"{key!r} is a parameter or buffer{of}, not a layer. {_LIST_HINT}")
    names = [n for n, _ in net.named_modules() if n]
    raise LayerError(
        f"no layer named {name!r} in the model.{close_matches(key, names)} {_LIST_HINT}"
    )


def call_error(name: str, call: int, calls: int) -> LayerError:
    """The error for call ``call`` of layer ``name`` when a forward pass called it ``calls``
    times and never reached that call."""
    if calls == 0:
        return LayerError(
            f"layer {name!r} is not used in the model's forward pass; "
            "choose a layer the model calls"
        )
    return LayerError(
        f"layer {name!r} is called {calls} time(s) per forward pass; there is no call {call} "
        f"(use '{name}@0' .. '{name}@{calls - 1}', or '{name}' for the last)"
    )


def _feature_output(name: str, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise LayerError(
            f"layer {name!r} returns {type(out).__name__}, not a tensor; "
            "choose a layer whose output is a feature map"
        )
    return out


@dataclass
class LayerCapture:
    """Outputs of one module, one entry per call in the forward pass.

    With ``grad=True`` each captured output is part of the autograd graph so that
    ``torch.autograd.grad(score, capture.output())`` gives dS/dA. The graph starts at the first
    call of the module: run the forward pass under ``torch.no_grad()`` and the hook turns
    gradient recording on from there (:func:`layer_capture` restores the mode on exit), so the
    part of the network before the layer runs as plain inference, recording nothing. Register
    the hook through :func:`layer_capture` only: used on its own it would leave recording on.
    """

    name: str
    grad: bool
    outputs: list[torch.Tensor] = field(default_factory=list)

    def output(self, call: int = -1) -> torch.Tensor:
        """The output of call ``call`` (default: the last call).

        Raises:
            LayerError: the module was not called, or has no such call.
        """
        try:
            return self.outputs[call]
        except IndexError:
            raise call_error(self.name, call, len(self.outputs)) from None

    def hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        _feature_output(self.name, out)
        if not self.grad:
            # Clone: an in-place op after the layer (ReLU(inplace=True)) must not change it.
            self.outputs.append(out.detach().clone())
            return None
        torch.set_grad_enabled(True)  # from the layer on; layer_capture restores the mode
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
        grad: keep the captured outputs in the autograd graph, recording gradients from the
            layer on (see :class:`LayerCapture`); the grad mode of the block's start is
            restored on exit.
    """
    module = named_module(net, name)
    capture = LayerCapture(name=name, grad=grad)
    recording = torch.is_grad_enabled()
    try:
        with hooks([lambda: module.register_forward_hook(capture.hook)]):
            yield capture
    finally:
        torch.set_grad_enabled(recording)


class StopForward(BaseException):
    """Raised by a forward hook to end the forward pass once everything needed has run.

    A :class:`BaseException`, so that model code catching ``Exception`` does not swallow it;
    :func:`stoppable` (and :func:`capture_call`) end the block silently when it arrives.
    """


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """A block whose forward pass a hook may end early by raising :class:`StopForward`."""
    with contextlib.suppress(StopForward):
        yield


@dataclass
class CallCapture:
    """The output of one call of one module, captured by :func:`capture_call`.

    Attributes:
        name: the module's dotted name (for messages).
        call: which call, counted from 0.
        calls: how many times the module ran in the block (up to the captured call, when the
            forward pass stopped there).
    """

    name: str
    call: int
    calls: int = 0
    captured: torch.Tensor | None = None

    def output(self) -> torch.Tensor:
        """The captured output, part of the autograd graph when the input was.

        Raises:
            LayerError: the forward pass did not reach the call.
        """
        if self.captured is None:
            raise call_error(self.name, self.call, self.calls)
        return self.captured


@contextlib.contextmanager
def capture_call(
    module: nn.Module, name: str, call: int, *, stop: bool = True
) -> Iterator[CallCapture]:
    """Capture call ``call`` of ``module`` during the block, and with ``stop`` end the forward
    pass right after it (:class:`StopForward`), so the rest of the network never runs.

    Without ``stop`` the rest of the network gets a copy of the output, so that its in-place
    operations leave the captured tensor unchanged.

    Args:
        module: the module (see :func:`named_module`).
        name: its name, for messages.
        call: which call, counted from 0 (see :func:`convlens.architecture.resolve_call` for
            ``name@-1`` and other calls counted from the end).
        stop: end the forward pass once the call has run.

    Raises:
        LayerError: the call's output is not a tensor; ``call`` is negative.
    """
    if call < 0:
        raise LayerError(f"call {call} of layer {name!r} must be counted from 0 here")
    capture = CallCapture(name=name, call=call)

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        index = capture.calls
        capture.calls += 1
        if index != call:
            return None
        capture.captured = _feature_output(name, out)
        if stop:
            raise StopForward
        return out.clone()

    with hooks([lambda: module.register_forward_hook(hook)]), stoppable():
        yield capture
