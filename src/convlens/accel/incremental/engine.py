"""Running incremental occlusion: the model's outputs on occluded copies, recomputing only the
changed box of each layer (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations").

For a batch of (image, window) pairs each planned step (:mod:`~convlens.accel.incremental.plan`)
computes only its box, from a crop of its input's clean map (plus the kernel's halo) with the
changed box of the layer below pasted in. Recomputing values whose inputs did not change gives
the same values, so this is exact up to floating-point rounding. The changed boxes are pasted
into copies of the clean maps where the network continues in full, which runs as one fused
module when it can be built (:mod:`~convlens.accel.incremental.suffix`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convlens.accel.incremental.ops import Pads, Window, is_tensor
from convlens.accel.incremental.plan import (
    Planner,
    Step,
    StepKind,
    carries_region,
    check_mutations,
    count_macs,
    fold_batch_norms,
)
from convlens.accel.incremental.suffix import Suffix, build_suffix
from convlens.accel.incremental.trace import NotIncrementalError, trace

__all__ = ["IncrementalEngine"]

log = logging.getLogger(__name__)

_NO_PADS = Pads(0, 0, 0, 0)


class IncrementalEngine:
    """Materialised clean activations of a traced model and incremental re-evaluation of
    occluded copies.

    Args:
        net: the model (eval mode).
        x: the clean batch (B, C, H, W).
        patch: side of the occluding square.
        ys, xs: top rows and left columns of the windows.
        tau: projective-field cap (approximate); ``None`` is exact.
        fold_batchnorm: fold eval-mode BatchNorm into the convolution before it, in the
            incremental part (:func:`~convlens.accel.incremental.plan.fold_batch_norms`) and in
            the fused suffix (:attr:`convlens.accel.Acceleration.fold_batchnorm`); ``False``:
            every BatchNorm runs as a BatchNorm.

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
        *,
        fold_batchnorm: bool = True,
    ) -> None:
        self.traced = trace(net, x)
        t = self.traced
        self.gm, self.x, self.input, self.nodes, self.clean = t.gm, t.x, t.input, t.nodes, t.clean
        out = t.clean[t.nodes[-1]]
        if not is_tensor(out) or out.dim() != 2:
            raise NotIncrementalError("the model does not return a (B, classes) tensor")
        planner = Planner(t, tau)
        self.steps = planner.plan(patch, ys, xs)
        self.hooked = planner.hooked
        """Modules with forward hooks, computed in full from their node on."""
        if fold_batchnorm:
            fold_batch_norms(t, self.steps)
        self._mutators = check_mutations(t, self.steps)
        with torch.no_grad():
            ref = net(x.clone())
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6):
            raise NotIncrementalError("the traced graph does not reproduce the model's output")
        self.logits = ref
        bound = Planner(t, None).plan(patch, ys, xs, switch=False)
        self.macs = count_macs(t, self.steps, bound)
        """Multiply-accumulates of the convolution and linear layers per (image, window) pair:
        ``executed``, ``full`` (one forward pass) and ``bound`` (only the exact changed
        regions of each convolution recomputed)."""
        self.suffix: Suffix | None = None
        """The fully computed end of the network as one fused ``channels_last`` module
        (:mod:`convlens.accel.incremental.suffix`), when it could be built."""
        if not self.hooked:
            full = {n for n, st in self.steps.items() if st.kind is StepKind.FULL}
            self.suffix = build_suffix(
                self.gm, self.nodes, full, self.clean, fold_batchnorm=fold_batchnorm
            )
        self._last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                self._last_use[a] = i
        self._cl: dict[Any, torch.Tensor] = {}
        self._same: dict[tuple[fx.Node, fx.Node], bool] = {}

    # -- what the caller reports -------------------------------------------------------------

    def bytes_per_pair(self) -> int:
        """Bytes of all intermediate results of one (image, window) pair (an upper bound of the
        live memory; crops count twice)."""
        total = 0
        for step in self.steps.values():
            v = self.clean.get(step.node)
            if not is_tensor(v) or step.kind in (StepKind.CONST, StepKind.OUTPUT):
                continue
            per = v[0].numel() * v.element_size()
            if step.ry is not None and step.rx is not None:
                per = 2 * per * step.ry.size * step.rx.size // (v.shape[-2] * v.shape[-1])
            total += per
        return max(1, total)

    def describe(self) -> dict[str, Any]:
        """What the engine does, for a result's ``meta``: the multiply-accumulates per occluded
        copy relative to a full pass (``macs_fraction``; ``macs_bound_fraction`` for the exact
        changed regions), the first node computed in full (``full_from``) and, if any, the
        modules computed in full because they have forward hooks (``hooked_modules``)."""
        macs = self.macs
        out: dict[str, Any] = {
            "macs_fraction": macs["executed"] / max(macs["full"], 1.0),
            "macs_bound_fraction": macs["bound"] / max(macs["full"], 1.0),
            "full_from": self.full_from(),
        }
        if self.hooked:
            out["hooked_modules"] = self.hooked  # computed in full, so their hooks run
        return out

    def full_from(self) -> str | None:
        """The first node computed in full (where the incremental part ends)."""
        for step in self.steps.values():
            if step.kind is StepKind.FULL:
                return step.node.name
        return None

    def compile_suffix(self, owner: nn.Module, batch_size: int) -> bool:
        """Run the fully computed end of the network compiled by ``torch.compile`` for
        ``batch_size`` pairs per pass (see :meth:`Suffix.compile`); ``False`` when there is no
        fused suffix."""
        if self.suffix is None:
            return False
        if not self.suffix.compiled:
            self.suffix.compile(owner, batch_size, self.x.device)
        return True

    # -- caches shared by the passes ---------------------------------------------------------

    def _clean_cl(self, node: fx.Node, pads: Pads = _NO_PADS, value: float = 0.0) -> torch.Tensor:
        """The clean map of ``node``, padded, channels-last (B, H, W, C), cached."""
        key = (node, pads, value)
        if key not in self._cl:
            t = self.clean[node]
            if any(pads):
                t = F.pad(t, (pads.left, pads.right, pads.top, pads.bottom), value=value)
            self._cl[key] = t.permute(0, 2, 3, 1).contiguous()
        return self._cl[key]

    def _same_box(self, a: Step, b: Step) -> bool:
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

    # -- the pass ----------------------------------------------------------------------------

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
        p = _Pass(self, fill, img, iy, ix)
        steps, suffix, last_use = self.steps, self.suffix, self._last_use
        for i, node in enumerate(self.nodes):
            kind = steps[node].kind
            if kind is StepKind.OUTPUT:
                if suffix is not None:
                    return suffix(*(p.materialise(a) for a in suffix.inputs))
                return p.materialise(node.args[0])  # type: ignore[arg-type]
            if kind is StepKind.FULL and suffix is not None:
                continue  # the suffix computes it; its inputs stay in env until the output
            _HANDLERS[kind](p, node, steps[node])
            for a in node.all_input_nodes:
                if last_use.get(a) == i:
                    p.env.pop(a, None)
                    p.full.pop(a, None)
        raise AssertionError("graph without output")


class _Pass:
    """One :meth:`IncrementalEngine.run`: the (image, window) pairs and the values computed so
    far (``env``: a node's box, channels-first, or its whole value; ``full``: boxes pasted
    into the clean maps)."""

    def __init__(
        self,
        engine: IncrementalEngine,
        fill: torch.Tensor,
        img: torch.Tensor,
        iy: torch.Tensor,
        ix: torch.Tensor,
    ) -> None:
        self.e, self.fill, self.img, self.iy, self.ix = engine, fill, img, iy, ix
        self.n = img.shape[0]
        self.ar = torch.arange(self.n, device=img.device)
        self.env: dict[fx.Node, Any] = {}
        self.full: dict[fx.Node, torch.Tensor] = {}

    # -- crops -------------------------------------------------------------------------------

    def origin(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) first row and column of ``step``'s box for each pair."""
        assert step.ry is not None and step.rx is not None
        return step.ry.lo[self.iy], step.rx.lo[self.ix]

    def gather(
        self, src: torch.Tensor, r0: torch.Tensor, c0: torch.Tensor, hh: int, ww: int
    ) -> torch.Tensor:
        """(N, hh, ww, C): each pair's ``hh x ww`` crop at ``(r0, c0)`` of its image's map
        ``src`` (B, H, W, C)."""
        rows = r0[:, None] + torch.arange(hh, device=r0.device)
        cols = c0[:, None] + torch.arange(ww, device=r0.device)
        return src[self.img[:, None, None], rows[:, :, None], cols[:, None, :]]

    def overlay(
        self,
        base: torch.Tensor,
        r0: torch.Tensor,
        c0: torch.Tensor,
        data: torch.Tensor,
        d0: torch.Tensor,
        e0: torch.Tensor,
    ) -> torch.Tensor:
        """``base`` (N, h, w, C), a crop at ``(r0, c0)``, with the boxes ``data`` (N, C, dh, dw)
        at ``(d0, e0)`` pasted in where they overlap."""
        hh, ww = base.shape[1:3]
        dh, dw = data.shape[-2:]
        ri = (r0 - d0)[:, None] + torch.arange(hh, device=r0.device)
        ci = (c0 - e0)[:, None] + torch.arange(ww, device=r0.device)
        vr = (ri >= 0) & (ri < dh)
        vc = (ci >= 0) & (ci < dw)
        d = data.permute(0, 2, 3, 1)
        g = d[
            self.ar[:, None, None],
            ri.clamp(0, dh - 1)[:, :, None],
            ci.clamp(0, dw - 1)[:, None, :],
        ]
        return torch.where((vr[:, :, None] & vc[:, None, :])[..., None], g, base)

    def crop(
        self,
        node: fx.Node,
        target: Step,
        pads: Pads = _NO_PADS,
        value: float = 0.0,
        window: Window | None = None,
    ) -> torch.Tensor:
        """``node``'s map on the input crop of ``target``'s box (NCHW view, channels-last):
        the box itself, or, for a window, the box grown by the kernel's halo on the padded
        map."""
        e = self.e
        src = e.steps[node]
        ty, tx = self.origin(target)
        assert target.ry is not None and target.rx is not None
        if window is None:
            if e._same_box(src, target):
                return self.env[node]
            r0, c0, hh, ww = ty, tx, target.ry.size, target.rx.size
        else:
            r0, c0 = ty * window.stride[0], tx * window.stride[1]
            hh, ww = window.input_size(target.ry.size, target.rx.size)
        sy, sx = self.origin(src)
        base = self.gather(e._clean_cl(node, pads, value), r0, c0, hh, ww)
        out = self.overlay(base, r0, c0, self.env[node], sy + pads.top, sx + pads.left)
        return out.permute(0, 3, 1, 2)

    def materialise(self, node: fx.Node) -> Any:
        """``node``'s whole value for every pair: its box pasted into its clean map."""
        e = self.e
        step = e.steps[node]
        if step.kind is StepKind.CONST:
            return e.clean[node]
        if step.kind in (StepKind.FULL, StepKind.SHAPE):
            return self.env[node]
        if node in self.full:
            return self.full[node]
        t = e.clean[node][self.img]
        sy, sx = self.origin(step)
        assert step.ry is not None and step.rx is not None
        rows = sy[:, None] + torch.arange(step.ry.size, device=sy.device)
        cols = sx[:, None] + torch.arange(step.rx.size, device=sy.device)
        t[self.ar[:, None, None], :, rows[:, :, None], cols[:, None, :]] = self.env[node].permute(
            0, 2, 3, 1
        )
        self.full[node] = t
        return t

    def call(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        """Run ``node``'s operation (a method call with its in-place form run out of place)."""
        if node.op == "call_method":
            return getattr(args[0], str(node.target).rstrip("_"))(*args[1:], **kwargs)
        return self.e.traced.execute(node, args, kwargs)

    # -- one handler per step kind -----------------------------------------------------------

    def input(self, node: fx.Node, step: Step) -> None:
        """The fill on each window's box."""
        sy, sx = self.origin(step)
        assert step.ry is not None and step.rx is not None
        fill_cl = self.fill.permute(0, 2, 3, 1).contiguous()
        self.env[node] = self.gather(fill_cl, sy, sx, step.ry.size, step.rx.size).permute(
            0, 3, 1, 2
        )

    def const(self, node: fx.Node, step: Step) -> None:
        """Nothing: the clean value is read where needed."""

    def point(self, node: fx.Node, step: Step) -> None:
        """The operation on the box of its changed argument (a copy if it changes it in
        place), with the other arguments' clean values."""
        e, region = self.e, step.src
        copy = node in e._mutators

        def value(a: fx.Node) -> Any:
            if a is not region:
                return e.clean[a]
            return self.env[a].clone() if copy else self.env[a]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module" and getattr(e.traced.module(node), "inplace", False):
            args = (args[0].clone(),)  # type: ignore[index]
        if node.op == "call_function" and kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        self.env[node] = self.call(node, args, kwargs)

    def window(self, node: fx.Node, step: Step) -> None:
        """The window on the crop of its input that its box reads."""
        win = step.window
        src = node.args[0]
        assert win is not None and isinstance(src, fx.Node)
        self.env[node] = win(self.crop(src, step, win.pads, win.pad_value, win))

    def pass_on(self, node: fx.Node, step: Step) -> None:
        """The input's box (the box's position already shifted in the plan)."""
        self.env[node] = self.env[node.args[0]]  # type: ignore[index]

    def binary(self, node: fx.Node, step: Step) -> None:
        """The operation on the changed arguments' crops of the union box."""
        e = self.e

        def sub(a: Any) -> Any:
            return self.crop(a, step) if a in e.steps and carries_region(a, e.steps) else e.clean[a]

        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        self.env[node] = self.call(node, args, kwargs)

    def shape(self, node: fx.Node, step: Step) -> None:
        """The operation on empty ``meta`` tensors of the whole maps' shapes."""
        e = self.e

        def meta(a: Any) -> Any:
            if carries_region(a, e.steps):
                v = e.clean[a]
                return torch.empty((self.n, *v.shape[1:]), device="meta", dtype=v.dtype)
            return self.materialise(a)

        args = fx.node.map_arg(node.args, meta)
        kwargs = fx.node.map_arg(node.kwargs, meta)
        self.env[node] = e.traced.execute(node, args, kwargs)  # type: ignore[arg-type]

    def whole(self, node: fx.Node, step: Step) -> None:
        """The operation on whole maps (boxes pasted into the clean maps)."""
        args = fx.node.map_arg(node.args, self.materialise)
        kwargs = fx.node.map_arg(node.kwargs, self.materialise)
        self.env[node] = self.e.traced.execute(node, args, kwargs)  # type: ignore[arg-type]


_HANDLERS: dict[StepKind, Callable[[_Pass, fx.Node, Step], None]] = {
    StepKind.INPUT: _Pass.input,
    StepKind.CONST: _Pass.const,
    StepKind.POINT: _Pass.point,
    StepKind.WINDOW: _Pass.window,
    StepKind.PASS: _Pass.pass_on,
    StepKind.BINARY: _Pass.binary,
    StepKind.CAT: _Pass.binary,
    StepKind.SHAPE: _Pass.shape,
    StepKind.FULL: _Pass.whole,
}
"""What each step kind computes in a pass (``OUTPUT`` ends the pass)."""
