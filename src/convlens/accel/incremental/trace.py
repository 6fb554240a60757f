"""Tracing a model for incremental occlusion, and its clean pass.

The model is traced with :func:`torch.fx.symbolic_trace`; one pass through the graph on the
clean batch keeps every node's output (Krypton's "materialised views": Nakandala, Kumar &
Papakonstantinou, SIGMOD 2019) and notes which nodes depend on the input and which operations
change a value in place.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from convlens.accel.incremental.ops import INPLACE_FUNCTIONS, hooked, is_tensor

__all__ = ["Mutation", "NotIncrementalError", "Traced", "trace"]


class NotIncrementalError(Exception):
    """The model cannot run incrementally (not traceable, several inputs, ...); the message says
    why. Occlusion then falls back to full forward passes."""


@dataclass(frozen=True)
class Mutation:
    """An in-place change seen in the clean pass.

    Attributes:
        node: the operation.
        changed: the input whose value it changed.
        virtual: the change exists only in the model's code: ``x += y`` on a traced value runs
            as ``x + y`` in the incremental pass.
    """

    node: fx.Node
    changed: fx.Node
    virtual: bool


@dataclass
class Traced:
    """A traced model and its clean pass.

    Attributes:
        gm: the traced model.
        nodes: its nodes in order.
        input: the placeholder of the image batch.
        x: a copy of the clean batch.
        clean: every node's output on the clean batch (a copy, unchanged by later in-place
            operations).
        dependent: the nodes whose value depends on the input.
        mutations: the in-place changes of the clean pass.
        alias: for a node whose output shares memory with inputs (views, in-place modules),
            those inputs.
    """

    gm: fx.GraphModule
    nodes: list[fx.Node]
    input: fx.Node
    x: torch.Tensor
    clean: dict[fx.Node, Any] = field(default_factory=dict)
    dependent: set[fx.Node] = field(default_factory=set)
    mutations: list[Mutation] = field(default_factory=list)
    alias: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.gm.get_submodule(str(node.target))

    def execute(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``node``'s operation on the given arguments (in-place operators out of place)."""
        target = node.target
        if node.op == "call_module":
            return self.module(node)(*args, **kwargs)
        if node.op == "call_function":
            assert callable(target)
            return INPLACE_FUNCTIONS.get(target, target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(node.op)


def _defaults(net: nn.Module) -> dict[str, Any] | None:
    """Arguments of ``forward`` after the input that have defaults: traced with those values
    (convlens calls ``net(x)``)."""
    try:
        params = list(inspect.signature(net.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {p.name: p.default for p in params if p.kind in kinds and p.default is not p.empty}
    return out or None


def _trace_error(exc: Exception) -> bool:
    """Whether an exception raised by :func:`torch.fx.symbolic_trace` means "cannot be traced"
    (control flow on tensors, unsupported Python on proxies) rather than the model failing."""
    if isinstance(exc, (fx.proxy.TraceError, TypeError, NotImplementedError, AttributeError)):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("proxy", "trac", "symbolic"))


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of a tensor (``None`` for an inference tensor)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _storage(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr()) or None
    except (RuntimeError, NotImplementedError):
        return None


def _hook_problem(net: nn.Module) -> str | None:
    """Why hooks prevent tracing the model faithfully: global module hooks (they run around
    every module call, not around the operations the boxes recompute), or hooks on the model
    itself or on a module that torch.fx traces through (they would run on proxies)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    tracer = fx.Tracer()
    for name, m in net.named_modules():
        if hooked(m) and (m is net or not tracer.is_leaf_module(m, name)):
            return f"{'the model' if m is net else repr(name)} has forward hooks"
    return None


def trace(net: nn.Module, x: torch.Tensor) -> Traced:
    """Trace ``net`` and run the graph once on ``x``.

    Args:
        net: the model (eval mode).
        x: the clean batch (B, C, H, W); not changed.

    Returns:
        The traced model with every node's clean output.

    Raises:
        NotIncrementalError: a TorchScript model, hooks that tracing would skip or run on
            proxies, a model torch.fx cannot trace, or one that needs several inputs.
    """
    if isinstance(net, torch.jit.ScriptModule):
        raise NotIncrementalError("TorchScript models cannot be traced by torch.fx")
    hook_problem = _hook_problem(net)
    if hook_problem is not None:
        raise NotIncrementalError(hook_problem)
    try:
        gm = fx.symbolic_trace(net, concrete_args=_defaults(net))
    except Exception as exc:
        if not _trace_error(exc):
            raise  # the model's own error, not a limitation of tracing
        raise NotIncrementalError(
            f"torch.fx cannot trace the model ({type(exc).__name__}: {exc})"
        ) from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        raise NotIncrementalError("the model's forward needs more than one input")
    with torch.inference_mode(False):  # version counters, to see in-place operations
        clean_x = x.detach().clone()  # the model may change its input in place
    traced = Traced(gm, list(gm.graph.nodes), placeholders[0], clean_x)
    _run_clean(traced)
    return traced


def _run_clean(t: Traced) -> None:
    """One pass through the graph on the clean batch, keeping a copy of every node's output,
    and noting in-place changes (:class:`Mutation`) and the inputs whose memory a node's output
    shares (views, in-place modules)."""
    env = t.clean
    with torch.no_grad(), torch.inference_mode(False):
        for node in t.nodes:
            if node is t.input:
                env[node] = t.x
                t.dependent.add(node)
                continue
            if node.op == "placeholder":  # an argument specialised to its default
                env[node] = node.args[0]
                continue
            if node.op == "output":
                env[node] = fx.node.map_arg(node.args[0], lambda a: env[a])
                continue
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            ins = [a for a in node.all_input_nodes if is_tensor(env[a])]
            before = [_version(env[a]) for a in ins]
            out = t.execute(node, args, kwargs)  # type: ignore[arg-type]
            for a, v in zip(ins, before, strict=True):
                if v is not None and _version(env[a]) != v:
                    t.mutations.append(Mutation(node, a, virtual=False))
            first = node.args[0] if node.args else None
            if node.op == "call_function" and node.target in INPLACE_FUNCTIONS and first in ins:
                t.mutations.append(Mutation(node, first, virtual=True))  # type: ignore[arg-type]
            if is_tensor(out):
                ptr = _storage(out)
                shared = [a for a in ins if ptr is not None and _storage(env[a]) == ptr]
                if shared:
                    t.alias[node] = shared
            env[node] = out.clone() if is_tensor(out) else out
            if any(a in t.dependent for a in node.all_input_nodes):
                t.dependent.add(node)
