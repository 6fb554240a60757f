"""Planning incremental occlusion: what each node of the traced graph computes for a batch of
occluded copies.

Each node gets a :class:`Step`: the changed box (:mod:`~convlens.accel.incremental.regions`) of
an element-wise operation, a sliding window, a padding or an operation on several maps of the
same size, recomputed on crops; or the whole map (``FULL``) from the first node where the box
covers the whole map, or that has no rule (global pooling, flatten, linear, custom code). A
value that does not depend on the input is the clean one (``CONST``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convlens.accel.folded import batchnorm_affine
from convlens.accel.incremental.ops import (
    AVG_DEFAULTS,
    AVG_NAMES,
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CONV_DEFAULTS,
    CONV_NAMES,
    INPLACE_FUNCTIONS,
    MAX_DEFAULTS,
    MAX_NAMES,
    POINTWISE_FUNCTIONS,
    POINTWISE_METHODS,
    POINTWISE_MODULES,
    SHAPE_METHODS,
    Pads,
    Window,
    WindowKind,
    bind,
    conv_pads,
    hooked,
    is_tensor,
    pair,
)
from convlens.accel.incremental.regions import Box, shift_box, union_box, window_box
from convlens.accel.incremental.trace import NotIncrementalError, Traced

__all__ = [
    "Planner",
    "Step",
    "StepKind",
    "carries_region",
    "check_mutations",
    "count_macs",
    "fold_batch_norms",
]


class StepKind(enum.Enum):
    """What a node computes for a batch of occluded copies."""

    INPUT = "input"
    """The occluded image's box: the fill of each window."""
    CONST = "const"
    """A value that does not depend on the input: the clean one."""
    POINT = "point"
    """An element-wise operation of one changed map (and constants): on its box."""
    WINDOW = "window"
    """A convolution or pooling: on the crop of its input that its box reads."""
    PASS = "pass"
    """The input's box passed on: constant padding (shifts the box), or a batch norm folded
    into the convolution before it."""
    BINARY = "binary"
    """An element-wise operation of two changed maps: on the union of their boxes."""
    CAT = "cat"
    """A concatenation of changed maps along channels: on the union of their boxes."""
    SHAPE = "shape"
    """The shape or number of dimensions of a changed map."""
    FULL = "full"
    """The whole map for every occluded copy."""
    OUTPUT = "output"
    """The model's output."""

    @property
    def region(self) -> bool:
        """Whether the step's value is a box of the map (not a constant, shape or whole map)."""
        return self not in (StepKind.CONST, StepKind.FULL, StepKind.SHAPE)


_SWITCHABLE = (StepKind.POINT, StepKind.WINDOW, StepKind.PASS, StepKind.BINARY, StepKind.CAT)
"""Kinds computed in full instead when their box covers the whole map."""


@dataclass
class Step:
    """The plan of one node.

    Attributes:
        node: the node.
        kind: what it computes.
        ry, rx: its box along rows and columns (kinds with a region).
        window: a ``WINDOW`` step's operation.
        src: a ``POINT`` step's changed argument.
    """

    node: fx.Node
    kind: StepKind
    ry: Box | None = None
    rx: Box | None = None
    window: Window | None = None
    src: fx.Node | None = None


def carries_region(node: Any, steps: dict[fx.Node, Step]) -> bool:
    """Whether ``node`` is a node whose planned value is a box (see :attr:`StepKind.region`)."""
    return isinstance(node, fx.Node) and steps[node].kind.region


class Planner:
    """Plans the steps of a traced model for a set of windows.

    Args:
        traced: the traced model and its clean pass.
        tau: projective-field cap of every box (approximate); ``None`` is exact.
    """

    def __init__(self, traced: Traced, tau: float | None) -> None:
        self.t = traced
        self.tau = tau
        self.hooked: list[str] = []
        """Modules with forward hooks, computed in full from their node on."""

    def plan(
        self, patch: int, ys: Sequence[int], xs: Sequence[int], *, switch: bool = True
    ) -> dict[fx.Node, Step]:
        """The step of every node, in order.

        Args:
            patch: side of the occluding square.
            ys, xs: top rows and left columns of the windows.
            switch: compute a node in full where its box covers the whole map (else only the
                boxes are planned, as for the bound of the exact changed regions).

        Raises:
            NotIncrementalError: the patch covers the whole image.
        """
        steps: dict[fx.Node, Step] = {}
        x = self.t.x
        h, w = x.shape[-2:]
        for node in self.t.nodes:
            step = self._plan_node(node, steps, patch, ys, xs, h, w, x.device)
            if switch and step.kind in _SWITCHABLE:
                assert step.ry is not None and step.rx is not None
                if step.ry.full and step.rx.full:
                    step = Step(node, StepKind.FULL)
            steps[node] = step
        return steps

    def _plan_node(
        self,
        node: fx.Node,
        steps: dict[fx.Node, Step],
        patch: int,
        ys: Sequence[int],
        xs: Sequence[int],
        h: int,
        w: int,
        dev: torch.device,
    ) -> Step:
        t = self.t
        if node is t.input:
            ty = torch.tensor(list(ys), device=dev)
            tx = torch.tensor(list(xs), device=dev)
            ph, pw = min(patch, h), min(patch, w)
            ry = Box(ty, ph, h, ty, ty + ph - 1)
            rx = Box(tx, pw, w, tx, tx + pw - 1)
            if ry.full and rx.full:
                raise NotIncrementalError("the patch covers the whole image")
            return Step(node, StepKind.INPUT, ry, rx)
        if node.op == "output":
            return Step(node, StepKind.OUTPUT)
        if node not in t.dependent:
            return Step(node, StepKind.CONST)
        if node.op == "call_module" and hooked(t.module(node)):
            if str(node.target) not in self.hooked:
                self.hooked.append(str(node.target))
            return Step(node, StepKind.FULL)  # the hooks run only when the module is called
        region_args = [a for a in node.all_input_nodes if carries_region(a, steps)]
        if not region_args:
            return Step(node, StepKind.FULL)
        target = node.target
        value = t.clean[node]
        if node.op == "call_method" and target in SHAPE_METHODS:
            return Step(node, StepKind.SHAPE)
        if node.op == "call_function" and target is getattr and node.args[1] in ("shape", "ndim"):
            return Step(node, StepKind.SHAPE)
        if not is_tensor(value) or value.dim() != 4:
            return Step(node, StepKind.FULL)
        if len(region_args) == 1:
            step = self._single(node, region_args[0], steps, value)
            if step is not None:
                return step
        binary = self._binary(node, region_args, steps, value)
        if binary is not None:
            return binary
        return Step(node, StepKind.FULL)

    def _single(
        self, node: fx.Node, first: fx.Node, steps: dict[fx.Node, Step], value: torch.Tensor
    ) -> Step | None:
        """The step of a node with one changed argument: element-wise, window or padding."""
        src = steps[first]
        if self._pointwise(node, first, value):
            return Step(node, StepKind.POINT, src.ry, src.rx, src=first)
        if node.args[0] is not first:
            return None
        assert src.ry is not None and src.rx is not None
        win = self._window(node)
        if win is not None:
            t, b, left, r = win.pads
            ry = window_box(src.ry, win.kernel[0], win.stride[0], t, b, win.dilation[0], self.tau)
            rx = window_box(
                src.rx, win.kernel[1], win.stride[1], left, r, win.dilation[1], self.tau
            )
            if (ry.extent, rx.extent) != tuple(value.shape[-2:]):
                return Step(node, StepKind.FULL)
            return Step(node, StepKind.WINDOW, ry, rx, window=win)
        pad = self._pad(node)
        if pad is not None:
            hh, ww = value.shape[-2:]
            ry, rx = shift_box(src.ry, pad[0], hh), shift_box(src.rx, pad[1], ww)
            return Step(node, StepKind.PASS, ry, rx)
        return None

    # -- operation rules ---------------------------------------------------------------------

    def _const_ok(self, v: Any) -> bool:
        """A constant argument that broadcasts the same way over every box."""
        if isinstance(v, (list, tuple)):
            return all(self._const_ok(e) for e in v)
        if isinstance(v, fx.Node):
            if v in self.t.dependent:
                return False
            v = self.t.clean[v]
        if not is_tensor(v):
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
        """Whether ``node`` acts on each element of ``region`` (other arguments constant)."""
        target = node.target
        src_value = self.t.clean[region]
        if not is_tensor(src_value) or src_value.shape != value.shape:
            return False
        if node.op == "call_module":
            m = self.t.module(node)
            if type(m) not in POINTWISE_MODULES or node.kwargs or len(node.args) != 1:
                return False
            if isinstance(m, nn.BatchNorm2d):
                return not m.training and m.running_mean is not None
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                return not m.training
            return True
        if node.args[0] is not region and not (
            node.op == "call_function" and target in BINARY_FUNCTIONS | set(INPLACE_FUNCTIONS)
        ):
            return False
        if node.op == "call_function" and target in (F.dropout, F.dropout2d):
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            return training is False and self._others_const(node, region)
        if node.op == "call_function" and target is F.batch_norm:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            return training is False and self._others_const(node, region)
        if node.op == "call_function" and (
            target in POINTWISE_FUNCTIONS
            or target in BINARY_FUNCTIONS
            or target in INPLACE_FUNCTIONS
        ):
            return self._others_const(node, region)
        if node.op == "call_method":
            name = str(target).rstrip("_")
            if name in POINTWISE_METHODS or name in BINARY_METHODS:
                return self._others_const(node, region)
        return False

    def _window(self, node: fx.Node) -> Window | None:
        """The sliding window of a convolution or pooling node, ``None`` for other nodes."""
        target = node.target
        if node.op == "call_module":
            return self._window_module(node)
        if node.op != "call_function":
            return None
        if target in (F.conv2d, torch.conv2d):
            p = bind(node.args, dict(node.kwargs), CONV_NAMES, CONV_DEFAULTS)
            weight, bias = p["weight"], p["bias"]
            if any(isinstance(a, fx.Node) and a in self.t.dependent for a in (weight, bias)):
                return None
            weight = self.t.clean[weight] if isinstance(weight, fx.Node) else weight
            bias = self.t.clean[bias] if isinstance(bias, fx.Node) else bias
            if not is_tensor(weight) or weight.dim() != 4:
                return None
            k, d = tuple(weight.shape[-2:]), pair(p["dilation"])
            pads = conv_pads(p["padding"], k, d)  # type: ignore[arg-type]
            if pads is None:
                return None
            groups = int(p["groups"])  # type: ignore[arg-type]
            stride = pair(p["stride"])
            return Window(WindowKind.CONV, k, stride, d, pads, 0.0, weight, bias, groups)  # type: ignore[arg-type]
        if target in (F.max_pool2d, torch.max_pool2d):
            return self._max(bind(node.args, dict(node.kwargs), MAX_NAMES, MAX_DEFAULTS))
        if target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
            return self._avg(bind(node.args, dict(node.kwargs), AVG_NAMES, AVG_DEFAULTS))
        return None

    def _window_module(self, node: fx.Node) -> Window | None:
        m = self.t.module(node)
        if len(node.args) != 1 or node.kwargs:
            return None
        if type(m) is nn.Conv2d:
            if m.padding_mode != "zeros":
                return None
            k, d = pair(m.kernel_size), pair(m.dilation)
            pads = conv_pads(m.padding, k, d)
            if pads is None:
                return None
            return Window(
                WindowKind.CONV, k, pair(m.stride), d, pads, 0.0, m.weight, m.bias, m.groups
            )
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

    @staticmethod
    def _consts(p: dict[str, Any]) -> bool:
        return not any(isinstance(v, fx.Node) for k, v in p.items() if k != "input")

    def _max(self, p: dict[str, Any]) -> Window | None:
        if not self._consts(p) or p["ceil_mode"] or p["return_indices"]:
            return None
        k = pair(p["kernel_size"])
        s = pair(p["stride"]) if p["stride"] not in (None, ()) else k
        ph, pw = pair(p["padding"])
        return Window(WindowKind.MAX, k, s, pair(p["dilation"]), Pads(ph, ph, pw, pw), -math.inf)

    def _avg(self, p: dict[str, Any]) -> Window | None:
        if not self._consts(p) or p["ceil_mode"]:
            return None
        k = pair(p["kernel_size"])
        s = pair(p["stride"]) if p["stride"] not in (None, ()) else k
        ph, pw = pair(p["padding"])
        if (ph or pw) and not p["count_include_pad"]:
            return None
        pads = Pads(ph, ph, pw, pw)
        return Window(WindowKind.AVG, k, s, (1, 1), pads, 0.0, divisor=p["divisor_override"])

    def _pad(self, node: fx.Node) -> tuple[int, int] | None:
        """Rows and columns added before the map by a constant padding node, else ``None``."""
        if node.op == "call_module":
            m = self.t.module(node)
            if type(m) not in (nn.ZeroPad2d, nn.ConstantPad2d) or len(node.args) != 1:
                return None
            left, _r, top, _b = m.padding  # type: ignore[misc]
        elif node.op == "call_function" and node.target is F.pad:
            p = bind(node.args, dict(node.kwargs), ("input", "pad", "mode", "value"), {})
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
        steps: dict[fx.Node, Step],
        value: torch.Tensor,
    ) -> Step | None:
        """The step of an element-wise operation on two changed maps, or a concatenation of
        changed maps along channels; ``None`` for other nodes."""
        target = node.target
        cat = node.op == "call_function" and target in (torch.cat, torch.concat)
        if cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(tensors, (list, tuple)) or dim not in (1, -3):
                return None
            if not all(isinstance(a, fx.Node) and carries_region(a, steps) for a in tensors):
                return None
            inputs = list(tensors)
        elif (
            node.op == "call_function" and target in BINARY_FUNCTIONS | set(INPLACE_FUNCTIONS)
        ) or (node.op == "call_method" and str(target).rstrip("_") in BINARY_METHODS):
            if len(region_args) != 2 or (
                node.args[:2] != tuple(region_args) and node.args[:2] != tuple(region_args[::-1])
            ):
                return None
            if not all(self._const_ok(a) for a in [*node.args[2:], *node.kwargs.values()]):
                return None
            inputs = list(node.args[:2])  # type: ignore[arg-type]
        else:
            return None
        shapes = {tuple(self.t.clean[a].shape[-2:]) for a in inputs}
        if shapes != {tuple(value.shape[-2:])}:
            return None
        ry = union_box([steps[a].ry for a in inputs], self.tau)  # type: ignore[misc]
        rx = union_box([steps[a].rx for a in inputs], self.tau)  # type: ignore[misc]
        return Step(node, StepKind.CAT if cat else StepKind.BINARY, ry, rx)


def fold_batch_norms(traced: Traced, steps: dict[fx.Node, Step]) -> None:
    """Fold an eval-mode ``BatchNorm2d`` into the convolution before it when the batch norm is
    that convolution's only user: ``w' = w g / sqrt(v + eps)``,
    ``b' = (b - m) g / sqrt(v + eps) + beta``; the batch norm's step then passes the boxes on
    (``PASS``). Equal up to rounding; one pass over the boxes fewer. Changes ``steps`` in
    place."""
    for node, step in steps.items():
        win = step.window
        if (
            step.kind is not StepKind.WINDOW
            or win is None
            or win.kind is not WindowKind.CONV
            or len(node.users) != 1
        ):
            continue
        user = next(iter(node.users))
        after = steps.get(user)
        if after is None or after.kind is not StepKind.POINT or user.op != "call_module":
            continue
        bn = traced.module(user)
        if type(bn) is not nn.BatchNorm2d or bn.running_var is None or bn.training:
            continue
        assert win.weight is not None
        scale, bias = batchnorm_affine(bn)
        if win.bias is not None:
            bias = bias + win.bias * scale
        step.window = dataclasses.replace(
            win, weight=win.weight * scale.view(-1, 1, 1, 1), bias=bias
        )
        steps[user] = Step(user, StepKind.PASS, after.ry, after.rx)


def check_mutations(traced: Traced, steps: dict[fx.Node, Step]) -> set[fx.Node]:
    """Refuse in-place changes that the incremental pass would not reproduce.

    The clean pass runs in-place operations for real on its copies, the incremental pass
    out of place on the boxes. Both agree only when nothing else reads the changed value:
    the changed node (and every node whose memory it shares) has no other user, and the
    operation reads only the node's box (an element-wise step) or a fully computed value.
    ``x += y`` (run as ``x + y`` in both passes) only needs the first condition.

    Returns:
        The nodes that change an input in place (their box is copied before the operation).

    Raises:
        NotIncrementalError: naming the operation, what it changes and who reads it.
    """
    mutators = {m.node for m in traced.mutations if not m.virtual}
    for m in traced.mutations:
        node, changed = m.node, m.changed
        readers = [u for u in changed.users if u is not node]
        bases, seen = list(traced.alias.get(changed, ())), set()
        while bases and not readers:  # the memory of the views' bases changes as well
            base = bases.pop()
            if base not in seen:
                seen.add(base)
                readers = list(base.users) if len(base.users) > 1 else []
                bases.extend(traced.alias.get(base, ()))
        problem = None
        if readers:
            problem = f"which {', '.join(u.name for u in readers)} reads as well"
        elif not m.virtual:
            step, src = steps[node], steps[changed]
            if not (
                (step.kind is StepKind.POINT and step.src is changed)
                or (step.kind is StepKind.FULL and src.kind is StepKind.FULL)
                or (step.kind is StepKind.CONST and src.kind is StepKind.CONST)
            ):
                problem = "and needs more of it than the changed box"
        if problem is not None:
            what = "the model's input" if changed is traced.input else changed.name
            raise NotIncrementalError(
                f"the in-place operation {node.name} changes {what}, {problem}"
            )
    return mutators


def _macs_per_output(traced: Traced, node: fx.Node) -> float:
    """Multiply-accumulates per output pixel of a convolution, per output of a linear layer
    (then negative: counted once per image), 0 for anything else."""
    if node.op == "call_module":
        m = traced.module(node)
        if type(m) is nn.Conv2d:
            return float(m.weight.shape[0] * m.weight[0].numel())
        if type(m) is nn.Linear:
            return -float(m.in_features * m.out_features)
        return 0.0
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d, F.linear):
        wt = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        wt = traced.clean[wt] if isinstance(wt, fx.Node) else wt
        if node.target is F.linear:
            return -float(wt.numel()) if is_tensor(wt) else 0.0
        if is_tensor(wt) and wt.dim() == 4:
            return float(wt.shape[0] * wt[0].numel())
    return 0.0


def count_macs(
    traced: Traced, steps: dict[fx.Node, Step], bound: dict[fx.Node, Step]
) -> dict[str, float]:
    """Multiply-accumulates of the convolution and linear layers per (image, window) pair.

    Args:
        traced: the traced model.
        steps: the plan that runs.
        bound: the plan of the exact changed regions (``tau=None``, no switch to full maps).

    Returns:
        ``executed`` (by ``steps``), ``full`` (one forward pass) and ``bound`` (only the exact
        changed region of each convolution recomputed, mean over windows).
    """
    executed = full = exact = 0.0
    for node, step in steps.items():
        value = traced.clean.get(node)
        if step.kind is StepKind.CONST or not is_tensor(value) or node.op == "output":
            continue
        per = _macs_per_output(traced, node)
        if per < 0:  # linear layer
            executed, full, exact = executed - per, full - per, exact - per
            continue
        if not per or value.dim() != 4:
            continue
        whole = per * value.shape[-2] * value.shape[-1]
        full += whole
        if step.kind is StepKind.WINDOW and step.ry is not None and step.rx is not None:
            executed += per * step.ry.size * step.rx.size
        else:
            executed += whole
        b = bound[node]
        if b.kind is StepKind.WINDOW and b.ry is not None and b.rx is not None:
            sy = (b.ry.exact_hi - b.ry.exact_lo + 1).clamp_min(0).double().mean()
            sx = (b.rx.exact_hi - b.rx.exact_lo + 1).clamp_min(0).double().mean()
            exact += per * float(sy * sx)
        else:
            exact += whole
    return {"executed": executed, "full": full, "bound": exact}
