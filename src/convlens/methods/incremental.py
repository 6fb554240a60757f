"""Incremental inference for occlusion (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations").

Occluding a patch changes only a box of each feature map: the outputs whose receptive field meets
the changed box of the layer below. The model is traced with :mod:`torch.fx`; one clean forward
pass keeps every node's output (the "materialised views"); then, for a batch of (image, window)
pairs, each layer computes only its changed box, from a crop of its input's clean map (plus the
kernel's halo) with the changed box of the layer below pasted in. For a convolution with kernel
``k``, stride ``s``, dilation ``d``, padding ``p_l`` before and an input box ``[lo, hi]`` (one
axis), the changed outputs are

    lo' = max(0, ceil((lo + p_l - (k - 1) d) / s)),   hi' = min(H' - 1, floor((hi + p_l) / s)).

Every layer uses one box size for all windows (the largest ``hi' - lo' + 1``); a box that would
cross the border is shifted inwards. Recomputing values whose inputs did not change gives the
same values, so this is exact up to floating-point rounding. Where the box covers the whole map,
or at an operation without a rule (global pooling, flatten, linear, custom code), the changed
boxes are pasted into copies of the clean maps and the rest of the network runs normally.

With ``tau`` (Krypton's projective-field threshold, approximate) a box is capped at
``ceil(tau * H')`` rows and columns around its centre: changes outside the cap are dropped.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convlens.methods.incremental_suffix import Suffix, build_suffix
from convlens.models.inference import batchnorm_affine

__all__ = ["Box", "IncrementalEngine", "NotIncrementalError", "window_box"]

log = logging.getLogger(__name__)


class NotIncrementalError(Exception):
    """The model cannot run incrementally (not traceable, several inputs, ...); the message says
    why. Occlusion then falls back to full forward passes."""


@dataclass(frozen=True)
class Box:
    """Fixed-size boxes of one feature-map axis, one per window position along that axis.

    Attributes:
        lo: (P,) first row (or column) of each position's box.
        size: the common box size.
        extent: the size of the map along this axis.
        exact_lo, exact_hi: (P,) the exact changed rows (inclusive), for the FLOP bound.
    """

    lo: torch.Tensor
    size: int
    extent: int
    exact_lo: torch.Tensor
    exact_hi: torch.Tensor

    @property
    def full(self) -> bool:
        return self.size >= self.extent


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _fix(lo: torch.Tensor, hi: torch.Tensor, extent: int, tau: float | None) -> tuple[int, Any]:
    """One box size for all positions; boxes shifted inwards; capped at ``tau * extent``."""
    size = max(1, int((hi - lo + 1).max()))
    if tau is not None:
        cap = max(1, math.ceil(tau * extent))
        if size > cap:
            centre = torch.div(lo + hi - (cap - 1), 2, rounding_mode="floor")
            return cap, centre.clamp(0, extent - cap)
    size = min(size, extent)
    return size, torch.minimum(lo, torch.full_like(lo, extent - size)).clamp_min(0)


def window_box(
    box: Box,
    kernel: int,
    stride: int,
    pad_before: int,
    pad_after: int,
    dilation: int = 1,
    tau: float | None = None,
) -> Box:
    """The box of a sliding-window layer's output (convolution, pooling) from its input's box.

    Args:
        box: the input's box along one axis.
        kernel, stride, dilation: the window along this axis.
        pad_before, pad_after: padding at the start and end of the axis.
        tau: cap of the output box as a fraction of the output size (approximate).

    Returns:
        The output box: ``lo' = max(0, ceil((lo + p - (k - 1) d) / s))``,
        ``hi' = min(H' - 1, floor((hi + p) / s))`` per position, one size for all.
    """
    span = (kernel - 1) * dilation
    extent = (box.extent + pad_before + pad_after - span - 1) // stride + 1

    def out(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = _ceil_div(lo + pad_before - span, stride).clamp_min(0)
        b = torch.div(hi + pad_before, stride, rounding_mode="floor").clamp_max(extent - 1)
        return a, torch.maximum(b, a - 1)  # an empty box where no output sees the input box

    lo, hi = out(box.lo, box.lo + box.size - 1)
    size, lo = _fix(lo, hi, extent, tau)
    elo, ehi = out(box.exact_lo, box.exact_hi)
    return Box(lo, size, extent, elo, ehi)


def _union(boxes: Sequence[Box], tau: float | None) -> Box:
    lo = torch.stack([b.lo for b in boxes]).min(0).values
    hi = torch.stack([b.lo + b.size - 1 for b in boxes]).max(0).values
    extent = boxes[0].extent
    size, lo = _fix(lo, hi, extent, tau)
    elo = torch.stack([b.exact_lo for b in boxes]).min(0).values
    ehi = torch.stack([b.exact_hi for b in boxes]).max(0).values
    return Box(lo, size, extent, elo, ehi)


def _shift(box: Box, by: int, extent: int) -> Box:
    return Box(box.lo + by, box.size, extent, box.exact_lo + by, box.exact_hi + by)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(v)
    return (int(t[0]), int(t[0])) if len(t) == 1 else (int(t[0]), int(t[1]))


# --------------------------------------------------------------------------------------------
# Operation tables
# --------------------------------------------------------------------------------------------

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)

_POINTWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    operator.neg,
    torch.clamp,
    F.dropout,
    F.dropout2d,
    F.batch_norm,
}

_POINTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "abs",
    "neg",
    "clamp",
    "clamp_min",
    "clamp_max",
    "contiguous",
}

_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}

_BINARY_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}

_BINARY_METHODS = {"add", "sub", "mul", "div"}

_SHAPE_METHODS = {"size", "dim"}


def _bind(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str], defaults: dict[str, Any]
) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_MAX_NAMES = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
_MAX_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "ceil_mode": False,
    "return_indices": False,
}
_AVG_NAMES = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_AVG_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


@dataclass
class _Window:
    """A sliding-window operation, run with padding 0 on a padded crop."""

    kind: str  # "conv", "max", "avg"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    pad_value: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    divisor: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            assert self.weight is not None
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, 0, self.dilation)
        return F.avg_pool2d(x, self.kernel, self.stride, 0, divisor_override=self.divisor)


def _conv_pads(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> Any:
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, str):
        return None
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class _Step:
    node: fx.Node
    kind: str  # input, const, point, window, pad, binary, cat, shape, full, output
    ry: Box | None = None
    rx: Box | None = None
    call: Callable[..., Any] | None = None  # pointwise/binary/cat: the op with region args
    window: _Window | None = None
    pad: tuple[int, int] = (0, 0)  # top, left shift of a pad op
    src: fx.Node | None = None  # the region argument of a pointwise op


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


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


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


def _hooked(m: nn.Module) -> bool:
    """Whether a module has forward (pre-)hooks: its call is more than its ``forward``."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _hook_problem(net: nn.Module) -> str | None:
    """Why hooks prevent tracing the model faithfully: global module hooks (they run around
    every module call, not around the operations the boxes recompute), or hooks on the model
    itself or on a module that torch.fx traces through (they would run on proxies)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    tracer = fx.Tracer()
    for name, m in net.named_modules():
        if _hooked(m) and (m is net or not tracer.is_leaf_module(m, name)):
            return f"{'the model' if m is net else repr(name)} has forward hooks"
    return None


class IncrementalEngine:
    """Materialised clean activations of a traced model and incremental re-evaluation of
    occluded copies.

    Args:
        net: the model (eval mode).
        x: the clean batch (B, C, H, W).
        patch: side of the occluding square.
        ys, xs: top rows and left columns of the windows.
        tau: projective-field cap (approximate); ``None`` is exact.

    Raises:
        NotIncrementalError: the model cannot be traced, has several inputs, does not return a
            tensor, has hooks that tracing would skip or run on proxies (global hooks, hooks on
            the model or on a module traced through; a hooked leaf module is computed in full
            instead), changes a value in place that is read again (or the model's input), or
            the traced graph does not reproduce the model's output.
    """

    def __init__(
        self,
        net: nn.Module,
        x: torch.Tensor,
        patch: int,
        ys: Sequence[int],
        xs: Sequence[int],
        tau: float | None = None,
    ) -> None:
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
        self.input = placeholders[0]
        with torch.inference_mode(False):  # version counters, to see in-place operations
            clean_x = x.detach().clone()  # the model may change its input in place
        self.gm, self.x, self.tau = gm, clean_x, tau
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.clean: dict[fx.Node, Any] = {}
        self._cl: dict[Any, torch.Tensor] = {}
        self._same: dict[tuple[fx.Node, fx.Node], bool] = {}
        self.hooked: list[str] = []
        """Modules with forward hooks, computed in full from their node on."""
        self._run_clean()
        out = self.clean[self.nodes[-1]]
        if not _is_tensor(out) or out.dim() != 2:
            raise NotIncrementalError("the model does not return a (B, classes) tensor")
        self.steps = self._plan(patch, ys, xs)
        self._fold_batch_norms()
        self._check_mutations()
        with torch.no_grad():
            ref = net(x.clone())
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6):
            raise NotIncrementalError("the traced graph does not reproduce the model's output")
        self.logits = ref
        tau, self.tau = self.tau, None
        try:
            bound = self._plan(patch, ys, xs, switch=False)
        finally:
            self.tau = tau
        self.macs = self._count(bound)
        """Multiply-accumulates of the convolution and linear layers per (image, window) pair:
        ``executed``, ``full`` (one forward pass) and ``bound`` (only the exact changed
        regions of each convolution recomputed)."""
        self.suffix: Suffix | None = None
        """The fully computed end of the network as one fused ``channels_last`` module
        (:mod:`convlens.methods.incremental_suffix`), when it could be built."""
        if not self.hooked:
            full = {n for n, st in self.steps.items() if st.kind == "full"}
            self.suffix = build_suffix(self.gm, self.nodes, full, self.clean)

    # -- clean pass ---------------------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def _execute(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        target = node.target
        if node.op == "call_module":
            return self._module(node)(*args, **kwargs)
        if node.op == "call_function":
            assert callable(target)
            return _INPLACE_FUNCTIONS.get(target, target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(node.op)

    def _run_clean(self) -> None:
        """One pass through the graph on the clean batch, keeping a copy of every node's output,
        and noting in-place changes: ``_mutations`` holds (node, input it changed, whether the
        change was only virtual: ``x += y`` runs as ``x + y`` here), ``_alias`` the inputs whose
        memory a node's output shares (views, in-place modules)."""
        env = self.clean
        self.dependent: set[fx.Node] = set()
        self._mutations: list[tuple[fx.Node, fx.Node, bool]] = []
        self._alias: dict[fx.Node, list[fx.Node]] = {}
        with torch.no_grad(), torch.inference_mode(False):
            for node in self.nodes:
                if node is self.input:
                    env[node] = self.x
                    self.dependent.add(node)
                    continue
                if node.op == "placeholder":  # an argument specialised to its default
                    env[node] = node.args[0]
                    continue
                if node.op == "output":
                    env[node] = fx.node.map_arg(node.args[0], lambda a: env[a])
                    continue
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                ins = [a for a in node.all_input_nodes if _is_tensor(env[a])]
                before = [_version(env[a]) for a in ins]
                out = self._execute(node, args, kwargs)  # type: ignore[arg-type]
                for a, v in zip(ins, before, strict=True):
                    if v is not None and _version(env[a]) != v:
                        self._mutations.append((node, a, False))
                first = node.args[0] if node.args else None
                if (
                    node.op == "call_function"
                    and node.target in _INPLACE_FUNCTIONS
                    and first in ins
                ):
                    self._mutations.append((node, first, True))
                if _is_tensor(out):
                    ptr = _storage(out)
                    shared = [a for a in ins if ptr is not None and _storage(env[a]) == ptr]
                    if shared:
                        self._alias[node] = shared
                env[node] = out.clone() if _is_tensor(out) else out
                if any(a in self.dependent for a in node.all_input_nodes):
                    self.dependent.add(node)

    def _check_mutations(self) -> None:
        """Refuse in-place changes that the incremental pass would not reproduce.

        The clean pass runs in-place operations for real on its copies, the incremental pass
        out of place on the boxes. Both agree only when nothing else reads the changed value:
        the changed node (and every node whose memory it shares) has no other user, and the
        operation reads only the node's box (an element-wise step) or a fully computed value.
        ``x += y`` (run as ``x + y`` in both passes) only needs the first condition.

        Raises:
            NotIncrementalError: naming the operation, what it changes and who reads it.
        """
        self._mutators = {m for m, _, virtual in self._mutations if not virtual}
        for node, changed, virtual in self._mutations:
            readers = [u for u in changed.users if u is not node]
            bases, seen = list(self._alias.get(changed, ())), set()
            while bases and not readers:  # the memory of the views' bases changes as well
                base = bases.pop()
                if base not in seen:
                    seen.add(base)
                    readers = list(base.users) if len(base.users) > 1 else []
                    bases.extend(self._alias.get(base, ()))
            problem = None
            if readers:
                problem = f"which {', '.join(u.name for u in readers)} reads as well"
            elif not virtual:
                step, src = self.steps[node], self.steps[changed]
                if not (
                    (step.kind == "point" and step.src is changed)
                    or (step.kind == "full" and src.kind == "full")
                    or (step.kind == "const" and src.kind == "const")
                ):
                    problem = "and needs more of it than the changed box"
            if problem is not None:
                what = "the model's input" if changed is self.input else changed.name
                raise NotIncrementalError(
                    f"the in-place operation {node.name} changes {what}, {problem}"
                )

    def _clean_cl(
        self, node: fx.Node, pads: tuple[int, int, int, int] = (0, 0, 0, 0), value: float = 0.0
    ) -> torch.Tensor:
        """The clean map of ``node``, padded, channels-last (B, H, W, C), cached."""
        key = (node, pads, value)
        if key not in self._cl:
            t = self.clean[node]
            if any(pads):
                t = F.pad(t, (pads[2], pads[3], pads[0], pads[1]), value=value)
            self._cl[key] = t.permute(0, 2, 3, 1).contiguous()
        return self._cl[key]

    # -- planning ---------------------------------------------------------------------------

    def _plan(
        self, patch: int, ys: Sequence[int], xs: Sequence[int], *, switch: bool = True
    ) -> dict[fx.Node, _Step]:
        steps: dict[fx.Node, _Step] = {}
        dev = self.x.device
        h, w = self.x.shape[-2:]
        for node in self.nodes:
            step = self._plan_node(node, steps, patch, ys, xs, h, w, dev)
            if switch and step.kind in ("point", "window", "pad", "binary", "cat"):
                assert step.ry is not None and step.rx is not None
                if step.ry.full and step.rx.full:
                    step = _Step(node, "full")
            steps[node] = step
        return steps

    def _fold_batch_norms(self) -> None:
        """Fold an eval-mode ``BatchNorm2d`` into the convolution before it when the batch
        norm is that convolution's only user: ``w' = w g / sqrt(v + eps)``,
        ``b' = (b - m) g / sqrt(v + eps) + beta``; the batch norm's step then passes the
        boxes on. Equal up to rounding; one pass over the boxes fewer."""
        for node, step in self.steps.items():
            win = step.window
            if step.kind != "window" or win is None or win.kind != "conv" or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            after = self.steps.get(user)
            if after is None or after.kind != "point" or user.op != "call_module":
                continue
            bn = self._module(user)
            if type(bn) is not nn.BatchNorm2d or bn.running_var is None or bn.training:
                continue
            assert win.weight is not None
            scale, bias = batchnorm_affine(bn)
            if win.bias is not None:
                bias = bias + win.bias * scale
            step.window = dataclasses.replace(
                win, weight=win.weight * scale.view(-1, 1, 1, 1), bias=bias
            )
            self.steps[user] = _Step(user, "pad", after.ry, after.rx, pad=(0, 0))

    def _region(self, node: Any, steps: dict[fx.Node, _Step]) -> bool:
        return isinstance(node, fx.Node) and steps[node].kind not in ("const", "full", "shape")

    def _plan_node(
        self,
        node: fx.Node,
        steps: dict[fx.Node, _Step],
        patch: int,
        ys: Sequence[int],
        xs: Sequence[int],
        h: int,
        w: int,
        dev: torch.device,
    ) -> _Step:
        if node is self.input:
            ty = torch.tensor(list(ys), device=dev)
            tx = torch.tensor(list(xs), device=dev)
            ph, pw = min(patch, h), min(patch, w)
            ry = Box(ty, ph, h, ty, ty + ph - 1)
            rx = Box(tx, pw, w, tx, tx + pw - 1)
            if ry.full and rx.full:
                raise NotIncrementalError("the patch covers the whole image")
            return _Step(node, "input", ry, rx)
        if node.op == "output":
            return _Step(node, "output")
        if node not in self.dependent:
            return _Step(node, "const")
        if node.op == "call_module" and _hooked(self._module(node)):
            if str(node.target) not in self.hooked:
                self.hooked.append(str(node.target))
            return _Step(node, "full")  # the hooks run only when the module is called
        region_args = [a for a in node.all_input_nodes if self._region(a, steps)]
        if not region_args:
            return _Step(node, "full")
        target = node.target
        value = self.clean[node]
        if node.op == "call_method" and target in _SHAPE_METHODS:
            return _Step(node, "shape")
        if node.op == "call_function" and target is getattr and node.args[1] in ("shape", "ndim"):
            return _Step(node, "shape")
        if not _is_tensor(value) or value.dim() != 4:
            return _Step(node, "full")
        if len(region_args) == 1:
            first = region_args[0]
            src = steps[first]
            if self._pointwise(node, first, value):
                return _Step(node, "point", src.ry, src.rx, src=first)
            win = self._window(node) if node.args[0] is first else None
            if win is not None:
                assert src.ry is not None and src.rx is not None
                t, b, left, r = win.pads
                ry = window_box(
                    src.ry, win.kernel[0], win.stride[0], t, b, win.dilation[0], self.tau
                )
                rx = window_box(
                    src.rx, win.kernel[1], win.stride[1], left, r, win.dilation[1], self.tau
                )
                if (ry.extent, rx.extent) != tuple(value.shape[-2:]):
                    return _Step(node, "full")
                return _Step(node, "window", ry, rx, window=win)
            pad = self._pad(node) if node.args[0] is first else None
            if pad is not None:
                assert src.ry is not None and src.rx is not None
                hh, ww = value.shape[-2:]
                return _Step(
                    node, "pad", _shift(src.ry, pad[0], hh), _shift(src.rx, pad[1], ww), pad=pad
                )
        binary = self._binary(node, region_args, steps, value)
        if binary is not None:
            return binary
        return _Step(node, "full")

    def _const_ok(self, v: Any) -> bool:
        """A constant argument that broadcasts the same way over every box."""
        if isinstance(v, (list, tuple)):
            return all(self._const_ok(e) for e in v)
        if isinstance(v, fx.Node):
            if v in self.dependent:
                return False
            v = self.clean[v]
        if not _is_tensor(v):
            return isinstance(v, (int, float, bool, str, type(None), torch.dtype))
        if v.numel() == 1:
            return True
        return (
            v.dim() >= 3
            and v.shape[-1] == 1
            and v.shape[-2] == 1
            and (v.dim() < 4 or v.shape[0] == 1)
        )

    def _others_const(self, node: fx.Node, region: fx.Node) -> bool:
        others = [a for a in node.args if a is not region] + list(node.kwargs.values())
        return all(self._const_ok(a) for a in others)

    def _pointwise(self, node: fx.Node, region: fx.Node, value: torch.Tensor) -> bool:
        target = node.target
        src_value = self.clean[region]
        if not _is_tensor(src_value) or src_value.shape != value.shape:
            return False
        if node.op == "call_module":
            m = self._module(node)
            if type(m) not in _POINTWISE_MODULES or node.kwargs or len(node.args) != 1:
                return False
            if isinstance(m, nn.BatchNorm2d):
                return not m.training and m.running_mean is not None
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                return not m.training
            return True
        if node.args[0] is not region and not (
            node.op == "call_function" and target in _BINARY_FUNCTIONS | set(_INPLACE_FUNCTIONS)
        ):
            return False
        if node.op == "call_function" and target in (F.dropout, F.dropout2d):
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            return training is False and self._others_const(node, region)
        if node.op == "call_function" and target is F.batch_norm:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            return training is False and self._others_const(node, region)
        if node.op == "call_function" and (
            target in _POINTWISE_FUNCTIONS
            or target in _BINARY_FUNCTIONS
            or target in _INPLACE_FUNCTIONS
        ):
            return self._others_const(node, region)
        if node.op == "call_method":
            name = str(target).rstrip("_")
            if name in _POINTWISE_METHODS or name in _BINARY_METHODS:
                return self._others_const(node, region)
        return False

    def _window(self, node: fx.Node) -> _Window | None:
        target = node.target
        if node.op == "call_module":
            m = self._module(node)
            if len(node.args) != 1 or node.kwargs:
                return None
            if type(m) is nn.Conv2d:
                if m.padding_mode != "zeros":
                    return None
                k, d = _pair(m.kernel_size), _pair(m.dilation)
                pads = _conv_pads(m.padding, k, d)
                if pads is None:
                    return None
                return _Window("conv", k, _pair(m.stride), d, pads, 0.0, m.weight, m.bias, m.groups)
            if type(m) is nn.MaxPool2d:
                p = dict(
                    kernel_size=m.kernel_size,
                    stride=m.stride,
                    padding=m.padding,
                    dilation=m.dilation,
                    ceil_mode=m.ceil_mode,
                    return_indices=m.return_indices,
                )
                return self._max(p)
            if type(m) is nn.AvgPool2d:
                p = dict(
                    kernel_size=m.kernel_size,
                    stride=m.stride,
                    padding=m.padding,
                    ceil_mode=m.ceil_mode,
                    count_include_pad=m.count_include_pad,
                    divisor_override=m.divisor_override,
                )
                return self._avg(p)
            return None
        if node.op != "call_function":
            return None
        if target in (F.conv2d, torch.conv2d):
            p = _bind(node.args, dict(node.kwargs), _CONV_NAMES, _CONV_DEFAULTS)
            weight, bias = p["weight"], p["bias"]
            if any(isinstance(a, fx.Node) and a in self.dependent for a in (weight, bias)):
                return None
            weight = self.clean[weight] if isinstance(weight, fx.Node) else weight
            bias = self.clean[bias] if isinstance(bias, fx.Node) else bias
            if not _is_tensor(weight) or weight.dim() != 4:
                return None
            k, d = tuple(weight.shape[-2:]), _pair(p["dilation"])
            pads = _conv_pads(p["padding"], k, d)  # type: ignore[arg-type]
            if pads is None:
                return None
            return _Window(
                "conv",
                k,
                _pair(p["stride"]),
                d,
                pads,
                0.0,
                weight,
                bias,
                int(p["groups"]),  # type: ignore[arg-type]
            )
        if target in (F.max_pool2d, torch.max_pool2d):
            return self._max(_bind(node.args, dict(node.kwargs), _MAX_NAMES, _MAX_DEFAULTS))
        if target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
            return self._avg(_bind(node.args, dict(node.kwargs), _AVG_NAMES, _AVG_DEFAULTS))
        return None

    def _consts(self, p: dict[str, Any]) -> bool:
        return not any(isinstance(v, fx.Node) for k, v in p.items() if k != "input")

    def _max(self, p: dict[str, Any]) -> _Window | None:
        if not self._consts(p) or p["ceil_mode"] or p["return_indices"]:
            return None
        k = _pair(p["kernel_size"])
        s = _pair(p["stride"]) if p["stride"] not in (None, ()) else k
        ph, pw = _pair(p["padding"])
        return _Window("max", k, s, _pair(p["dilation"]), (ph, ph, pw, pw), -math.inf)

    def _avg(self, p: dict[str, Any]) -> _Window | None:
        if not self._consts(p) or p["ceil_mode"]:
            return None
        k = _pair(p["kernel_size"])
        s = _pair(p["stride"]) if p["stride"] not in (None, ()) else k
        ph, pw = _pair(p["padding"])
        if (ph or pw) and not p["count_include_pad"]:
            return None
        return _Window("avg", k, s, (1, 1), (ph, ph, pw, pw), 0.0, divisor=p["divisor_override"])

    def _pad(self, node: fx.Node) -> tuple[int, int] | None:
        if node.op == "call_module":
            m = self._module(node)
            if type(m) not in (nn.ZeroPad2d, nn.ConstantPad2d) or len(node.args) != 1:
                return None
            left, _r, top, _b = m.padding  # type: ignore[misc]
        elif node.op == "call_function" and node.target is F.pad:
            p = _bind(node.args, dict(node.kwargs), ("input", "pad", "mode", "value"), {})
            if p.get("mode", "constant") != "constant" or not self._consts(p):
                return None
            pad = list(p["pad"])
            if len(pad) == 2:
                pad += [0, 0]
            if len(pad) != 4:
                return None
            left, _r, top, _b = pad
            if min(pad) < 0:
                return None
        else:
            return None
        return int(top), int(left)

    def _binary(
        self,
        node: fx.Node,
        region_args: list[fx.Node],
        steps: dict[fx.Node, _Step],
        value: torch.Tensor,
    ) -> _Step | None:
        target = node.target
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(tensors, (list, tuple)) or dim not in (1, -3):
                return None
            if not all(isinstance(t, fx.Node) and self._region(t, steps) for t in tensors):
                return None
            inputs = list(tensors)
        elif (
            node.op == "call_function" and target in _BINARY_FUNCTIONS | set(_INPLACE_FUNCTIONS)
        ) or (node.op == "call_method" and str(target).rstrip("_") in _BINARY_METHODS):
            if len(region_args) != 2 or (
                node.args[:2] != tuple(region_args) and node.args[:2] != tuple(region_args[::-1])
            ):
                return None
            if not all(self._const_ok(a) for a in [*node.args[2:], *node.kwargs.values()]):
                return None
            inputs = list(node.args[:2])  # type: ignore[arg-type]
        else:
            return None
        shapes = {tuple(self.clean[a].shape[-2:]) for a in inputs}
        if shapes != {tuple(value.shape[-2:])}:
            return None
        ry = _union([steps[a].ry for a in inputs], self.tau)  # type: ignore[misc]
        rx = _union([steps[a].rx for a in inputs], self.tau)  # type: ignore[misc]
        return _Step(node, "cat" if target in (torch.cat, torch.concat) else "binary", ry, rx)

    # -- cost accounting ---------------------------------------------------------------------

    def _macs_per_output(self, node: fx.Node) -> float:
        """Multiply-accumulates per output pixel of a convolution, per output of a linear layer
        (then negative: counted once per image), 0 for anything else."""
        if node.op == "call_module":
            m = self._module(node)
            if type(m) is nn.Conv2d:
                return float(m.weight.shape[0] * m.weight[0].numel())
            if type(m) is nn.Linear:
                return -float(m.in_features * m.out_features)
            return 0.0
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            wt = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            wt = self.clean[wt] if isinstance(wt, fx.Node) else wt
            if _is_tensor(wt) and wt.dim() == 4:
                return float(wt.shape[0] * wt[0].numel())
        if node.op == "call_function" and node.target is F.linear:
            wt = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            wt = self.clean[wt] if isinstance(wt, fx.Node) else wt
            if _is_tensor(wt):
                return -float(wt.numel())
        return 0.0

    def _count(self, bound: dict[fx.Node, _Step]) -> dict[str, float]:
        executed = full = exact = 0.0
        for node, step in self.steps.items():
            value = self.clean.get(node)
            if step.kind == "const" or not _is_tensor(value) or node.op == "output":
                continue
            per = self._macs_per_output(node)
            if per < 0:  # linear layer
                executed, full, exact = executed - per, full - per, exact - per
                continue
            if not per or value.dim() != 4:
                continue
            whole = per * value.shape[-2] * value.shape[-1]
            full += whole
            if step.kind == "window" and step.ry is not None and step.rx is not None:
                executed += per * step.ry.size * step.rx.size
            else:
                executed += whole
            b = bound[node]
            if b.kind == "window" and b.ry is not None and b.rx is not None:
                sy = (b.ry.exact_hi - b.ry.exact_lo + 1).clamp_min(0).double().mean()
                sx = (b.rx.exact_hi - b.rx.exact_lo + 1).clamp_min(0).double().mean()
                exact += per * float(sy * sx)
            else:
                exact += whole
        return {"executed": executed, "full": full, "bound": exact}

    # -- execution --------------------------------------------------------------------------

    def bytes_per_pair(self) -> int:
        """Bytes of all intermediate results of one (image, window) pair (an upper bound of the
        live memory; crops count twice)."""
        total = 0
        for step in self.steps.values():
            v = self.clean.get(step.node)
            if not _is_tensor(v) or step.kind in ("const", "output"):
                continue
            per = v[0].numel() * v.element_size()
            if step.ry is not None and step.rx is not None:
                per = 2 * per * step.ry.size * step.rx.size // (v.shape[-2] * v.shape[-1])
            total += per
        return max(1, total)

    def compile_suffix(self, owner: nn.Module, batch_size: int) -> bool:
        """Run the fully computed end of the network compiled by ``torch.compile`` for
        ``batch_size`` pairs per pass (see :meth:`Suffix.compile`); ``False`` when there is no
        fused suffix."""
        if self.suffix is None:
            return False
        if not self.suffix.compiled:
            self.suffix.compile(owner, batch_size, self.x.device)
        return True

    def full_from(self) -> str | None:
        """The first node computed in full (where the incremental part ends)."""
        for step in self.steps.values():
            if step.kind == "full":
                return step.node.name
        return None

    def _same_box(self, a: _Step, b: _Step) -> bool:
        """Whether two steps have the same boxes at every position (cached: one sync)."""
        key = (a.node, b.node)
        if key not in self._same:
            assert a.ry is not None and a.rx is not None and b.ry is not None and b.rx is not None
            self._same[key] = (
                a.ry.size == b.ry.size
                and a.rx.size == b.rx.size
                and torch.equal(a.ry.lo, b.ry.lo)
                and torch.equal(a.rx.lo, b.rx.lo)
            )
        return self._same[key]

    @torch.no_grad()
    def run(
        self, fill: torch.Tensor, img: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor
    ) -> torch.Tensor:
        """The model's output on occluded copies.

        Args:
            fill: (B, C, H, W) the fill of each image.
            img: (N,) image of each pair; iy, ix: (N,) window index along each axis.

        Returns:
            (N, classes) outputs of the occluded images.
        """
        n = img.shape[0]
        env: dict[fx.Node, Any] = {}
        full: dict[fx.Node, torch.Tensor] = {}
        last_use = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        ar = torch.arange(n, device=img.device)
        fill_cl = (
            fill.permute(0, 2, 3, 1).contiguous()
            if self.steps[self.input].kind == "input"
            else None
        )

        def origin(step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
            assert step.ry is not None and step.rx is not None
            return step.ry.lo[iy], step.rx.lo[ix]

        def gather(
            src: torch.Tensor, r0: torch.Tensor, c0: torch.Tensor, hh: int, ww: int
        ) -> torch.Tensor:
            rows = r0[:, None] + torch.arange(hh, device=r0.device)
            cols = c0[:, None] + torch.arange(ww, device=r0.device)
            return src[img[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, h, w, C)

        def overlay(
            base: torch.Tensor,
            r0: torch.Tensor,
            c0: torch.Tensor,
            data: torch.Tensor,
            d0: torch.Tensor,
            e0: torch.Tensor,
        ) -> torch.Tensor:
            hh, ww = base.shape[1:3]
            dh, dw = data.shape[-2:]
            ri = (r0 - d0)[:, None] + torch.arange(hh, device=r0.device)
            ci = (c0 - e0)[:, None] + torch.arange(ww, device=r0.device)
            vr = (ri >= 0) & (ri < dh)
            vc = (ci >= 0) & (ci < dw)
            d = data.permute(0, 2, 3, 1)
            g = d[
                ar[:, None, None], ri.clamp(0, dh - 1)[:, :, None], ci.clamp(0, dw - 1)[:, None, :]
            ]
            return torch.where((vr[:, :, None] & vc[:, None, :])[..., None], g, base)

        def crop(
            node: fx.Node,
            target: _Step,
            pads: tuple[int, int, int, int] = (0, 0, 0, 0),
            value: float = 0.0,
            window: _Window | None = None,
        ) -> torch.Tensor:
            """Node's map on the input crop of ``target``'s box (NCHW view, channels-last)."""
            src = steps[node]
            ty, tx = origin(target)
            assert target.ry is not None and target.rx is not None
            if window is None:
                r0, c0, hh, ww = ty, tx, target.ry.size, target.rx.size
            else:
                (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
                r0, c0 = ty * sh, tx * sw
                hh = (target.ry.size - 1) * sh + (kh - 1) * dh + 1
                ww = (target.rx.size - 1) * sw + (kw - 1) * dw + 1
            sy, sx = origin(src)
            assert src.ry is not None and src.rx is not None
            if window is None and self._same_box(src, target):
                return env[node]
            base = gather(self._clean_cl(node, pads, value), r0, c0, hh, ww)
            out = overlay(base, r0, c0, env[node], sy + pads[0], sx + pads[2])
            return out.permute(0, 3, 1, 2)

        def materialise(node: fx.Node) -> Any:
            step = steps[node]
            if step.kind in ("const",):
                return self.clean[node]
            if step.kind in ("full", "shape"):
                return env[node]
            if node in full:
                return full[node]
            t = self.clean[node][img]
            sy, sx = origin(step)
            assert step.ry is not None and step.rx is not None
            rows = sy[:, None] + torch.arange(step.ry.size, device=sy.device)
            cols = sx[:, None] + torch.arange(step.rx.size, device=sy.device)
            t[ar[:, None, None], :, rows[:, :, None], cols[:, None, :]] = env[node].permute(
                0, 2, 3, 1
            )
            full[node] = t
            return t

        steps = self.steps
        suffix = self.suffix
        for i, node in enumerate(self.nodes):
            step = steps[node]
            kind = step.kind
            if suffix is not None and kind == "full":
                continue  # the suffix computes it; its inputs stay in env until the output
            if kind == "output" and suffix is not None:
                return suffix(*(materialise(a) for a in suffix.inputs))
            if kind == "input":
                sy, sx = origin(step)
                assert fill_cl is not None and step.ry is not None and step.rx is not None
                env[node] = gather(fill_cl, sy, sx, step.ry.size, step.rx.size).permute(0, 3, 1, 2)
            elif kind == "const":
                pass
            elif kind == "output":
                out = materialise(node.args[0])  # type: ignore[arg-type]
                return out
            elif kind == "point":
                region = step.src

                def value(a: fx.Node, region: fx.Node | None = region, node: fx.Node = node) -> Any:
                    if a is not region:
                        return self.clean[a]
                    return env[a].clone() if node in self._mutators else env[a]

                args = fx.node.map_arg(node.args, value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                if node.op == "call_module" and getattr(self._module(node), "inplace", False):
                    args = (args[0].clone(),)  # type: ignore[index]
                if node.op == "call_method":
                    env[node] = getattr(args[0], str(node.target).rstrip("_"))(*args[1:], **kwargs)  # type: ignore[index]
                else:
                    if node.op == "call_function" and kwargs.get("inplace"):
                        kwargs = {**kwargs, "inplace": False}
                    env[node] = self._execute(node, args, kwargs)  # type: ignore[arg-type]
            elif kind == "window":
                assert step.window is not None
                src = node.args[0]
                assert isinstance(src, fx.Node)
                win = step.window
                env[node] = win(crop(src, step, win.pads, win.pad_value, win))
            elif kind == "pad":
                env[node] = env[node.args[0]]  # type: ignore[index]
            elif kind in ("binary", "cat"):

                def sub(a: Any, step: _Step = step) -> Any:
                    return crop(a, step) if a in steps and self._region(a, steps) else self.clean[a]

                args = fx.node.map_arg(node.args, sub)
                kwargs = fx.node.map_arg(node.kwargs, sub)
                if node.op == "call_method":
                    env[node] = getattr(args[0], str(node.target).rstrip("_"))(*args[1:], **kwargs)  # type: ignore[index]
                else:
                    env[node] = self._execute(node, args, kwargs)  # type: ignore[arg-type]
            elif kind == "shape":

                def meta(a: Any) -> Any:
                    if self._region(a, steps):
                        v = self.clean[a]
                        return torch.empty((n, *v.shape[1:]), device="meta", dtype=v.dtype)
                    return materialise(a)

                args = fx.node.map_arg(node.args, meta)
                kwargs = fx.node.map_arg(node.kwargs, meta)
                env[node] = self._execute(node, args, kwargs)  # type: ignore[arg-type]
            else:  # full
                args = fx.node.map_arg(node.args, materialise)
                kwargs = fx.node.map_arg(node.kwargs, materialise)
                env[node] = self._execute(node, args, kwargs)  # type: ignore[arg-type]
            for a in node.all_input_nodes:
                if last_use.get(a) == i:
                    env.pop(a, None)
                    full.pop(a, None)
        raise AssertionError("graph without output")
