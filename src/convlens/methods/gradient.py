"""Input-gradient methods: saliency, gradient x input, integrated gradients."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import torch

from convlens.accel.folded import cached_inference_copy
from convlens.accel.lean_graph import InputGradientMode
from convlens.errors import InputError
from convlens.hooks.rules import backprop_rule
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register
from convlens.validate import PositiveFloat, PositiveInt

__all__ = ["GradientXInput", "IntegratedGradients", "Saliency", "input_gradients"]

#: With ``Acceleration.lean_graph``, input gradients through the folded copy use plain autograd
#: while its estimated graph (128x the input's bytes) stays below this; the lean graph above it.
PLAIN_GRAPH_BYTES = 4 * 2**30

#: Pixel-gradient maps have a few extreme values; views clip them at this percentile.
DISPLAY = {"display_percentile": 99.0}


def input_gradients(
    ctx: Context, *, rule: str | None = None, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dS_t/dx for every target: ``(grads (B, K, 3, H, W), logits (B, N), targets (B, K))``.

    One forward pass, then one backward pass per target column (K of them). Only the input
    requires gradients; parameters stay frozen, so no parameter gradient is computed.

    Accelerators (``ctx.accel``), without a rule: with ``fold_batchnorm`` the pass runs through
    the network's BatchNorm-folded copy (:func:`convlens.accel.folded.cached_inference_copy`:
    the same function up to float rounding; the network itself when a forward or backward hook
    must see the pass), in ``channels_last`` layout where ``channels_last`` says so; with
    ``lean_graph`` the graph is built by :class:`convlens.accel.lean_graph.InputGradientMode`
    on the network itself, and on the copy above an estimated 4 GiB of graph (128x the input's
    bytes). The logits (and the targets resolved against them) are then the copy's, equal to
    the network's up to float rounding.

    Args:
        ctx: the call's context.
        rule: a backward rule for ReLU-like units (:data:`convlens.hooks.RULES`), e.g.
            ``"guided"``; ``None`` for the true gradient.
        strict: with a rule, refuse models that also use activations without a rule.

    Raises:
        UnsupportedModelError: ``rule`` cannot apply to the model (see
            :meth:`convlens.hooks.BackpropRuleMode.check`).
    """
    accel = ctx.accel
    layout = accel.uses_channels_last(ctx.x.device)
    if rule is None and accel.fold_batchnorm:
        fast = cached_inference_copy(ctx.net, ctx.x, channels_last=layout)
        if fast is not None:
            return _copy_gradients(ctx, fast, channels_last=layout)
    x = ctx.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if rule is None:
            lean = InputGradientMode() if accel.lean_graph else contextlib.nullcontext()
            with lean:  # the true gradient, with a leaner graph
                logits = ctx.net(x)
        else:
            with backprop_rule(rule) as mode:
                logits = ctx.net(x)
            mode.check(rule, strict=strict)
        targets = ctx.targets(logits.detach())
        k = targets.shape[1]
        grads = []
        for j in range(k):
            score = logits.gather(1, targets[:, j : j + 1]).sum()
            (g,) = torch.autograd.grad(score, x, retain_graph=j < k - 1)
            grads.append(g.contiguous())
    return torch.stack(grads, dim=1), logits.detach(), targets


def _copy_gradients(
    ctx: Context, fast: torch.nn.Module, *, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`input_gradients` through the folded copy ``fast``: one forward pass of the copy,
    then a backward pass per target column."""
    x = ctx.x.detach().clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    big = ctx.accel.lean_graph and x.numel() * x.element_size() * 128 > PLAIN_GRAPH_BYTES
    with torch.enable_grad():
        with InputGradientMode() if big else contextlib.nullcontext():
            out = fast(x)
        logits = out.detach()
        targets = ctx.targets(logits)
        k = targets.shape[1]
        grads = []
        for j in range(k):
            score = out.gather(1, targets[:, j : j + 1]).sum()
            (g,) = torch.autograd.grad(score, x, retain_graph=j < k - 1)
            grads.append(g.contiguous())
    return torch.stack(grads, dim=1), logits, targets


@register("saliency")
class Saliency(Method):
    """Gradient saliency (Simonyan, Vedaldi & Zisserman 2013, "Deep Inside Convolutional
    Networks", §3).

    ``M_ij = max_c |dS_t / dI_cij|``: the magnitude of the derivative of the unnormalised class
    score with respect to each pixel, maximised over colour channels.
    """

    title = "Gradient saliency"
    paper = "Simonyan et al. 2013"

    def compute(self, ctx: Context) -> RawResult:
        grads, logits, targets = input_gradients(ctx)
        return RawResult(
            grads.abs().amax(dim=2), logits, targets, meta=dict(DISPLAY), attributions=grads
        )


@register("gradxinput")
class GradientXInput(Method):
    """Gradient x input (Shrikumar et al. 2016).

    ``M_ij = sum_c x_cij * dS_t / dx_cij``: each pixel's first-order contribution to the score
    (signed; positive supports the target).
    """

    title = "Gradient × input"
    paper = "Shrikumar et al. 2016"

    def compute(self, ctx: Context) -> RawResult:
        grads, logits, targets = input_gradients(ctx)
        attr = grads * ctx.x.unsqueeze(1)
        meta = {**DISPLAY, "display": "signed"}
        return RawResult(attr.sum(dim=2), logits, targets, meta=meta, attributions=attr)


def _path_rule(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha`` in [0, 1] and weights of a quadrature of int_0^1 f(alpha) d alpha
    (fresh float64 tensors; the nodes are computed once per rule and step count)."""
    a, w = _path_rule_cached(rule, steps)
    return a.clone(), w.clone()


@functools.lru_cache(maxsize=32)
def _path_rule_cached(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2))
    if rule == "left":
        a = torch.arange(steps, dtype=torch.float64) / steps
    elif rule == "right":
        a = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    elif rule == "middle":
        a = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    elif rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        a = torch.linspace(0, 1, steps, dtype=torch.float64)
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return a, w
    else:
        raise ValueError(
            f"rule must be gausslegendre, left, right, middle or trapezoid, not {rule!r}"
        )
    return a, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


@register("intgrad")
class IntegratedGradients(Method):
    """Integrated gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep
    Networks").

    ``IG_i(x) = (x_i - x'_i) int_0^1 dS_t(x' + a (x - x')) / dx_i da``, computed with a
    quadrature rule over ``steps`` points (Gauss-Legendre by default, which converges much faster
    than Riemann sums). Completeness: ``sum_i IG_i = S_t(x) - S_t(x')``; the difference (the
    *convergence delta*) is reported per image and target in ``meta["delta"]``; it needs only
    the scores at the two endpoints (no-grad forward passes of the images and of the baseline,
    one image for the shared zero baseline). The path points go through
    the model in chunks of ``batch_size`` images, so memory does not grow with ``steps``: per
    chunk, one backward pass per target column of the weighted score
    ``sum_{m, b} w_m S_t(x'_b + a_m (x_b - x'_b))`` gives every image's weighted gradient at
    once, summed in place into one (B, K, 3, H, W) buffer of the input's dtype. ``maps`` is
    ``sum_c IG_c`` (signed); ``attributions`` keeps every channel.

    Accelerators (the call's :class:`~convlens.accel.Acceleration`, each also limited by the
    option of the same purpose below): the path points run through a copy of the network with
    eval-mode BatchNorm folded into the convolutions (``fold_batchnorm``;
    :func:`convlens.accel.folded.cached_inference_copy`, the same function up to float
    rounding; the network itself when hooks must see the passes), in ``channels_last`` layout,
    and with ``graph="lean"`` through :class:`convlens.accel.lean_graph.InputGradientMode` (one
    byte kept per activation instead of float tensors). Measured against Captum's
    ``IntegratedGradients`` at the same steps and points per pass: ``benchmarks/RESULTS.md``.

    Args:
        steps: number of points on the path.
        rule: ``"gausslegendre"``, ``"left"``, ``"right"``, ``"middle"`` or ``"trapezoid"``.
        baseline: ``"zero"`` (0 in model-input space), ``"blur"`` (a Gaussian-blurred copy,
            ``blur_sigma``), or a tensor broadcastable to the input.
        batch_size: path points x images evaluated per forward/backward pass (at least one
            point of every image). Default: 32 on CPU, where small passes stay in cache; on
            other devices, which are busier the larger the pass, as many as fit in
            ``memory_mb`` (all of them when they fit). Off the CPU the first pass also carries
            the endpoints (the B images and the baseline: B + 1 rows, 2 B for per-image
            baselines), unless the target is given as a tensor.
        memory_mb: cap on one pass's estimated graph memory when ``batch_size`` is ``None``
            off the CPU (estimate per path point: 128x the input's bytes with the plain graph
            through the folded copy, 192x through the network itself, 32x with the lean
            graph; above what a conv-BN-ReLU network needs).
        blur_sigma: standard deviation of the blurred baseline, in pixels.
        graph: ``"plain"`` or ``"lean"``: how the autograd graph of a pass is built (see
            above; ``"lean"`` only where the call's ``accel.lean_graph`` allows it); the
            gradients are equal up to float rounding.
        fuse: run the path points through the BatchNorm-folded copy of the network (where
            the call's ``accel.fold_batchnorm`` allows it).
        channels_last: feed the passes in ``channels_last`` layout (with the copy's weights
            converted to match); ``None``: as the call's ``accel.channels_last`` says (on CPUs
            only by default); ``True`` only where that is not ``False``.
    """

    title = "Integrated gradients"
    paper = "Sundararajan et al. 2017"
    #: Evaluate the endpoints (images and baseline) in the first path pass instead of a
    #: no-grad pass of their own; ``None``: off the CPU only.
    merge_endpoints: bool | None = None

    def __init__(
        self,
        steps: PositiveInt = 32,
        rule: str = "gausslegendre",
        baseline: str | torch.Tensor = "zero",
        batch_size: PositiveInt | None = None,
        blur_sigma: PositiveFloat = 10.0,
        memory_mb: PositiveFloat = 4096.0,
        graph: str = "plain",
        fuse: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        _path_rule(rule, steps)  # validates
        if isinstance(baseline, str) and baseline not in ("zero", "blur"):
            raise ValueError(f"baseline must be 'zero', 'blur' or a tensor, not {baseline!r}")
        self.steps, self.rule, self.baseline = steps, rule, baseline
        if graph not in ("plain", "lean"):
            raise ValueError(f"graph must be 'plain' or 'lean', not {graph!r}")
        self.batch_size, self.blur_sigma, self.memory_mb = batch_size, blur_sigma, memory_mb
        self.graph, self.fuse, self.channels_last = graph, fuse, channels_last

    def points_per_pass(
        self, x: torch.Tensor, *, fused: bool = True, lean: bool | None = None
    ) -> int:
        """Path points x images per forward/backward pass for the batch ``x`` (a multiple of
        its size B, between B and ``steps * B``); ``fused``: through the folded copy (a
        smaller plain graph than the network's own); ``lean``: with the lean graph (default:
        ``graph == "lean"``)."""
        b = x.shape[0]
        n = self.batch_size
        if lean is None:
            lean = self.graph == "lean"
        if n is None:
            if x.device.type == "cpu":
                n = 32
            else:
                factor = 32 if lean else 128 if fused else 192
                n = int(self.memory_mb * 2**20 // (x[0].numel() * x.element_size() * factor))
        return min(self.steps, max(1, n // b)) * b

    def options(self) -> dict[str, Any]:
        base = self.baseline if isinstance(self.baseline, str) else "tensor"
        return {"steps": self.steps, "rule": self.rule, "baseline": base}

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.baseline, torch.Tensor):
            try:
                return self.baseline.to(x).expand_as(x)
            except RuntimeError:
                raise InputError(
                    f"the baseline's shape {tuple(self.baseline.shape)} does not broadcast to "
                    f"the input's {tuple(x.shape)}"
                ) from None
        if self.baseline == "blur":
            from convlens.methods.perturbation import blur

            return blur(x, self.blur_sigma)
        return torch.zeros_like(x)

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        b = x.shape[0]
        base = self._baseline(x)
        alphas, weights = _path_rule(self.rule, self.steps)
        alphas, weights = alphas.to(x), weights.to(x)
        shared = isinstance(self.baseline, str) and self.baseline == "zero"
        # The endpoints, for the targets and S(x) - S(x') of the delta. One all-zero baseline
        # serves every image (eval mode: images are independent).
        ends = torch.cat([x, base[:1] if shared else base])
        diff = x - base
        accel = ctx.accel
        lean = self.graph == "lean" and accel.lean_graph
        graph = "lean" if lean else "plain"
        mode = InputGradientMode() if lean else contextlib.nullcontext()
        layout = accel.uses_channels_last(x.device)
        if self.channels_last is not None:
            layout = self.channels_last and accel.channels_last is not False
        fold = self.fuse and accel.fold_batchnorm
        net = cached_inference_copy(ctx.net, x, channels_last=layout) if fold else None
        fused = net is not None
        if net is None:
            net, layout = ctx.net, False
        per = self.points_per_pass(x, fused=fused, lean=lean) // b  # path points per pass
        # Off the CPU the endpoints ride along in the first path pass (their rows get no
        # weight): a pass of a few images costs kernel launches, not arithmetic. On a CPU the
        # arithmetic counts, and a no-grad pass is a third of a forward + backward one.
        # A target tensor's range check synchronises with the device: done between the forward
        # and backward halves of the first pass, it would stall the queue, so then not merged.
        merged = self.merge_endpoints
        if merged is None:
            merged = x.device.type != "cpu" and not isinstance(ctx.target, torch.Tensor)
        # (the first pass then carries b + 1 rows, or 2 b with per-image baselines, on top of
        # batch_size: a few launch-bound rows more beat a pass of their own)
        if not merged:
            with torch.no_grad():
                end_logits = net(
                    ends.contiguous(memory_format=torch.channels_last) if layout else ends
                )
        targets = total = None
        for start in range(0, self.steps, per):
            ctx.pace(start, self.steps)
            a = alphas[start : start + per]
            n = len(a)
            pts = torch.addcmul(base.unsqueeze(0), a.view(-1, 1, 1, 1, 1), diff.unsqueeze(0))
            pts = pts.flatten(0, 1)
            if merged and start == 0:
                pts = torch.cat([pts, ends])
            if layout:
                pts = pts.contiguous(memory_format=torch.channels_last)
            pts.requires_grad_(True)
            # One weighted score per target column: the weights fold the quadrature into the
            # backward pass, and summing over images and points gives every image's gradient
            # in one call (the images of a batch are independent in eval mode).
            wts = weights[start : start + n].repeat_interleave(b)
            with torch.enable_grad(), mode:
                out = net(pts)
                if merged and start == 0:
                    end_logits = out[n * b :].detach()
                    out = out[: n * b]
                if targets is None:
                    targets = ctx.targets(end_logits[:b])
                    # sum_m w_m dS_t(x' + a_m (x - x'))/dx, summed in place in x's dtype
                    total = x.new_zeros(b, targets.shape[1], *x.shape[1:])
                assert total is not None
                k = targets.shape[1]
                scores = [
                    (out.gather(1, targets[:, j].repeat(n)[:, None]).squeeze(1) * wts).sum()
                    for j in range(k)
                ]
                del out
                for j in range(k):
                    (g,) = torch.autograd.grad(scores[j], pts, retain_graph=j < k - 1)
                    total[:, j] += g[: n * b].view(n, b, *x.shape[1:]).sum(dim=0)
                    del g
            del pts, scores  # the graph goes with the last score
        assert targets is not None and total is not None
        logits = end_logits[:b]
        base_logits = end_logits[b:].expand(b, -1) if shared else end_logits[b:]
        attr = total * diff.unsqueeze(1)
        gap = (logits.gather(1, targets) - base_logits.gather(1, targets)).float()
        delta = attr.flatten(2).sum(dim=2).float() - gap
        return RawResult(
            attr.sum(dim=2),
            logits,
            targets,
            attributions=attr,
            meta={
                "delta": delta.cpu(),
                "display_percentile": 99.0,
                "display": "signed",
                "forward_passes": b + (1 if shared else b) + self.steps * b,
                "points_per_pass": per * b,
                "graph": graph,
                "fused": fused,
            },
        )
