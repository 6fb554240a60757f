"""The fully computed end of an incremental occlusion pass, as one fused ``channels_last`` module.

:class:`~convlens.accel.incremental.engine.IncrementalEngine` recomputes only the changed boxes
of the early feature maps; from the layer where a window's changes cover the whole map (or at
global pooling, flatten, the linear head) on, every occluded copy runs in full. That *suffix* is
run the way the metrics run whole networks (:func:`convlens.accel.folded.inference_copy`):
the suffix's nodes are copied into their own :class:`torch.fx.GraphModule` that shares the
model's modules, with every eval-mode ``BatchNorm2d`` folded into the convolution before it
(``W' = s W``, ``b' = s (b - mu) + beta``, ``s = gamma / sqrt(var + eps)``; only with
``Acceleration.fold_batchnorm``, else the BatchNorm runs as it is) and 4-D weights and inputs in
``channels_last``. Only the order of floating-point operations changes; the suffix is
checked against the clean pass's own values before use, and not used (the engine runs the nodes
one by one as before) if it differs, if the model has hooked modules (their hooks must see the
model's own modules), or if anything about building it fails.

With ``compile=True`` the suffix runs compiled by ``torch.compile`` for a fixed number of
(image, window) pairs per pass (:class:`~convlens.accel.compiled.FixedBatchForward`, which pads
the last batch and falls back to eager execution when compilation fails or disagrees).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convlens.accel.folded import batchnorm_affine
from convlens.accel.incremental.ops import hooked as _hooked

__all__ = ["Suffix", "build_suffix"]

log = logging.getLogger(__name__)


class Suffix:
    """The suffix module and the nodes it takes as inputs.

    Attributes:
        module: the fused ``channels_last`` GraphModule; ``module(*values_of(inputs))`` gives
            the model's output.
        inputs: the engine's nodes whose values the suffix reads (the changed maps, made whole
            for each pair, constants and shapes), in the order of its arguments.
        folded: the number of BatchNorm layers folded.
    """

    def __init__(self, module: fx.GraphModule, inputs: list[fx.Node], folded: int) -> None:
        self.module = module
        self.inputs = inputs
        self.folded = folded
        self.fn: Any = module
        """What runs: the module, or its compiled form (:meth:`compile`)."""

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.fn(*(_cl(a) for a in args))

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` was called (even if compilation then failed: the suffix then
        runs eagerly and is not compiled again)."""
        return self.fn is not self.module

    def compile(self, owner: nn.Module, batch_size: int, device: torch.device) -> None:
        """Run the suffix compiled by ``torch.compile`` for passes of ``batch_size`` pairs
        from now on (other sizes run eagerly: the suffix's arguments may include the batch
        size). The compiled form is kept for later calls on ``owner`` (the user's network) with
        the same suffix (:func:`~convlens.accel.compiled.compiled_forward`)."""
        from convlens.accel.compiled import compiled_forward

        first = next(iter([*self.module.parameters(), *self.module.buffers()]), None)
        self.fn = compiled_forward(
            owner,
            lambda: self.module,
            batch_size=batch_size,
            device=device,
            dtype=first.dtype if first is not None else torch.float32,
            tag="occlusion suffix\n" + self.module.code,
            pad=False,
        )


def _cl(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.dim() == 4:
        return a.contiguous(memory_format=torch.channels_last)
    return a


_CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _conv_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, Any, dict] | None:
    """``(weight, bias, conv2d keyword arguments)`` of a zero-padded 2-D convolution node
    (module or function) whose parameters nothing else uses, else ``None``."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is not nn.Conv2d or m.padding_mode != "zeros" or _hooked(m):
            return None
        if len(node.args) != 1 or node.kwargs:
            return None
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        return m.weight, m.bias, kw
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    bound = dict(zip(_CONV_NAMES, node.args, strict=False))
    bound.update(node.kwargs)
    weight, bias = bound.get("weight"), bound.get("bias")
    for a in (weight, bias):
        if a is not None and (
            not isinstance(a, fx.Node) or a.op != "get_attr" or len(a.users) != 1
        ):
            return None
    assert isinstance(weight, fx.Node)
    kw = {k: bound[k] for k in ("stride", "padding", "dilation", "groups") if k in bound}
    if any(isinstance(v, fx.Node) for v in kw.values()):
        return None
    w = _attr(gm, str(weight.target))
    b = None if bias is None else _attr(gm, str(bias.target))  # type: ignore[union-attr]
    return w, b, kw


def _bn_parts(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    bn = gm.get_submodule(str(node.target))
    if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None or _hooked(bn):
        return None
    return bn


def _fold_in_graph(gm: fx.GraphModule) -> int:
    """Fold each eval-mode ``BatchNorm2d`` whose input is a zero-padded convolution's output and
    nothing else's (a ``Conv2d`` module called once, or ``conv2d`` on parameters nothing else
    uses) into that convolution, in place: the pair becomes one ``conv2d`` on new folded
    parameters (:func:`~convlens.accel.folded.batchnorm_affine`)."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    folded = 0
    for n in list(gm.graph.nodes):
        bn = _bn_parts(gm, n)
        src = n.args[0] if bn is not None else None
        if bn is None or not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        if calls.get(str(n.target), 0) != 1:
            continue
        if src.op == "call_module" and calls.get(str(src.target), 0) != 1:
            continue
        parts = _conv_parts(gm, src)
        if parts is None:
            continue
        weight, bias, kw = parts
        dtype = torch.promote_types(weight.dtype, torch.float32)
        scale, shift = batchnorm_affine(bn, dtype)
        with torch.no_grad():
            w = (weight.to(dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
            b = (shift if bias is None else bias.to(dtype) * scale + shift).to(weight.dtype)
        name = f"_convlens_folded_{folded}"
        gm.register_buffer(f"{name}_weight", w.detach().clone())
        gm.register_buffer(f"{name}_bias", b.detach().clone())
        with gm.graph.inserting_before(src):
            w_node = gm.graph.get_attr(f"{name}_weight")
            b_node = gm.graph.get_attr(f"{name}_bias")
        with gm.graph.inserting_after(src):
            conv = gm.graph.call_function(F.conv2d, (src.args[0], w_node, b_node), dict(kw))
        n.replace_all_uses_with(conv)
        gm.graph.erase_node(n)
        old_inputs = list(src.all_input_nodes)
        gm.graph.erase_node(src)
        for a in old_inputs:
            if a.op == "get_attr" and not a.users:
                gm.graph.erase_node(a)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _channels_last(gm: fx.GraphModule, shared: set[int]) -> None:
    """Give ``gm`` ``channels_last`` copies of the 4-D weights it uses: each called leaf
    module with a 4-D parameter is replaced by a converted copy, each 4-D attribute by a
    converted copy. Only attributes of containers that ``gm`` owns are replaced (ids in
    ``shared`` are the model's modules, never changed)."""
    cl = torch.channels_last

    def own_parent(target: str) -> nn.Module | None:
        prefix = target.rpartition(".")[0]
        parent = gm.get_submodule(prefix) if prefix else gm
        return None if id(parent) in shared else parent

    for n in gm.graph.nodes:
        target = str(n.target)
        if n.op == "call_module":
            m = gm.get_submodule(target)
            four_d = any(p.dim() == 4 for p in m.parameters(recurse=False))
            parent = own_parent(target)
            if four_d and parent is not None and not list(m.children()):
                setattr(parent, target.rpartition(".")[2], copy.deepcopy(m).to(memory_format=cl))
        elif n.op == "get_attr":
            t = _attr(gm, target)
            parent = own_parent(target)
            four_d = isinstance(t, torch.Tensor) and t.dim() == 4
            if four_d and parent is not None and not t.is_contiguous(memory_format=cl):
                name = target.rpartition(".")[2]
                delattr(parent, name)
                parent.register_buffer(name, t.detach().contiguous(memory_format=cl))


def build_suffix(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    full: set[fx.Node],
    clean: dict[fx.Node, Any],
    *,
    fold_batchnorm: bool = True,
) -> Suffix | None:
    """The suffix of ``gm`` made of the ``full`` nodes, or ``None`` when there is none or it
    cannot be used (see the module docstring).

    Args:
        gm: the traced model.
        nodes: its nodes in order.
        full: the nodes the engine computes in full.
        clean: every node's value on the clean batch (for the check).
        fold_batchnorm: fold eval-mode BatchNorm into the convolution before it
            (:attr:`convlens.accel.Acceleration.fold_batchnorm`); ``False``: the suffix runs
            the model's BatchNorm modules as they are.
    """
    output = nodes[-1]
    result = output.args[0] if output.args else None
    if not full or not isinstance(result, fx.Node) or result not in full:
        return None
    for n in full:
        if any(u not in full and u is not output for u in n.users):
            return None  # a partly computed node reads a full one: keep the engine's loop
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            inputs.append(a)
            env[a] = graph.placeholder(f"in_{len(inputs)}")
        return env[a]

    outside = [a for n in nodes if n in full for a in n.all_input_nodes if a not in full]
    for a in outside:  # placeholders before any other node
        if a.op != "get_attr":
            arg(a)
    for a in dict.fromkeys(outside):  # parameters stay attributes of the suffix (to be folded)
        if a.op == "get_attr":
            env[a] = graph.node_copy(a, arg)
    for n in nodes:
        if n in full:
            env[n] = graph.node_copy(n, arg)
    graph.output(env[result])
    try:
        # The suffix shares the model's modules and tensors (no copy of, e.g., a large linear
        # head); folding adds new tensors, and _channels_last copies the 4-D weights it
        # converts, so nothing of the model is changed.
        suffix = fx.GraphModule(gm, graph)
        if any(_hooked(m) for m in suffix.modules()):
            return None
        folded = _fold_in_graph(suffix) if fold_batchnorm else 0
        _channels_last(suffix, {id(m) for m in gm.modules()})
        with torch.no_grad():
            got = suffix(*(_cl(clean[a]) for a in inputs))
    except Exception as exc:  # anything unexpected: the engine's own loop still works
        log.debug("no fused suffix: %s: %s", type(exc).__name__, exc)
        return None
    ref = clean[result]
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        return None
    got, ref = got.detach(), ref.detach()
    scale = float(ref.abs().amax().clamp_min(1.0))
    err = float((got.float() - ref.float()).abs().amax()) / scale
    if err > 1000 * torch.finfo(torch.float32).eps:
        log.info("fused suffix differs from the model (relative error %.2g); not used", err)
        return None
    return Suffix(suffix, inputs, folded)
