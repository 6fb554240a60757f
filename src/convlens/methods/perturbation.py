"""Perturbation methods: occlusion sensitivity."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from convlens.accel.folded import has_forward_hooks, inference_copy
from convlens.accel.incremental import IncrementalEngine, NotIncrementalError
from convlens.accel.settings import Acceleration
from convlens.errors import UnsupportedModelError
from convlens.hooks.capture import hooks
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register
from convlens.validate import (
    Bound,
    FiniteFloat,
    Fraction,
    PositiveFloat,
    PositiveInt,
    Seed,
)

__all__ = ["Occlusion", "blur", "window_starts"]

log = logging.getLogger(__name__)

#: A fraction above 0, at most 1.
_OpenFraction = Annotated[float, Bound(low=0, low_open=True, high=1)]


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Top/left coordinates of the windows along one axis.

    Windows step by ``stride`` from 0; a last window flush with the far edge is added when the
    steps do not reach it, so every pixel is covered. A patch larger than the image gives one
    window at 0 (clipped).
    """
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a (B, C, H, W) batch, separable, reflect padding."""
    radius = max(1, min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _activation_bytes_per_sample(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Clean forward pass that also sums the bytes of every leaf module's output per image."""
    total = [0]

    def count(_m: nn.Module, _a: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    with hooks([lambda m=m: m.register_forward_hook(count) for m in leaves]):
        logits = net(x)
    return logits, max(1, total[0] // x.shape[0])


def _naive_forward(
    net: nn.Module, x: torch.Tensor, accel: Acceleration
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What full forward passes of occluded copies run: with ``accel.fold_batchnorm`` or
    ``accel.channels_last``, a copy of the network (:func:`~convlens.accel.folded.inference_copy`:
    eval-mode BatchNorm folded into the convolutions, ``channels_last`` weights and inputs;
    equal to float rounding, checked on the first two images of ``x``); the network itself
    with neither, when a module or a global hook must see the passes or the copy cannot be
    made."""
    layout = accel.uses_channels_last(x.device)
    if has_forward_hooks(net) or not (accel.fold_batchnorm or layout):
        return net
    try:
        fast = inference_copy(net, x.clone(), fold=accel.fold_batchnorm, channels_last=layout)
    except Exception as exc:  # an uncopyable or scripted model: run it as it is
        log.info("occlusion runs the model as it is (%s: %s)", type(exc).__name__, exc)
        return net

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return fast(batch.contiguous(memory_format=torch.channels_last) if layout else batch)

    return forward


@register("occlusion")
class Occlusion(Method):
    """Occlusion sensitivity (Zeiler & Fergus 2014, "Visualizing and Understanding
    Convolutional Networks", §4.2), with incremental inference (Krypton: Nakandala, Kumar &
    Papakonstantinou, SIGMOD 2019).

    A ``patch x patch`` square slides over the image with step ``stride``; at each position the
    square is replaced by ``fill`` and the model re-run. The map at a pixel is the drop of the
    target's score, ``s_t(x) - s_t(x with window occluded)``, averaged over all windows that
    cover the pixel. The score is the softmax probability (``score="prob"``) or the logit.

    With probabilities, where the target's clean probability ``p`` exceeds 1/2 the drop is
    computed as ``q_t(x occluded) - q_t(x)`` with ``q_t = sum_{j != t} p_j = 1 - p_t`` summed
    over the other classes: the same number, but a confident network's ``p`` rounds to exactly
    1 (``1 - p`` below float32's resolution, 6e-8) for the image and for most occluded copies, so
    ``p - p'`` would be an exact 0 (a blank map) where ``q' - q`` keeps the drop.

    How the occluded copies are evaluated (``mode``):

    - ``"exact"``: incremental inference (:mod:`convlens.accel.incremental`). The model is
      traced with torch.fx; one clean pass keeps every layer's output, and each occluded copy
      recomputes only the box of each layer that the patch can change (convolutions, pooling,
      batch norm, activations, residual sums, concatenation, products), then the rest of the
      network from the first layer where the box covers the whole map or that has no rule.
      Equal to ``"naive"`` up to floating-point rounding. Raises
      :class:`~convlens.errors.UnsupportedModelError` when the model cannot be traced.
    - ``"naive"``: every occluded copy goes through the whole network (a copy with BatchNorm
      folded and ``channels_last`` weights, equal to float rounding, unless the model has
      forward hooks).
    - ``"auto"`` (default): ``"exact"`` when the model can be traced and the call's
      ``accel.incremental`` is on (:class:`~convlens.accel.Acceleration`), else ``"naive"``
      (the reason is logged and recorded in ``meta["fallback_reason"]``).
    - ``"approx"``: Krypton's approximations on top of ``"exact"``: each layer's box is capped
      at ``tau`` of the map's side (projective-field threshold), and adaptive drill-down: only
      every ``coarse``-th window along each axis is evaluated first; the drops of the other
      windows are interpolated bilinearly, and the fraction ``drill`` of them with the least
      reliable interpolation (the largest local range of the coarse drops) is then evaluated.
      Falls back to ``"naive"`` like ``"auto"``.

    All perturbations of all images are evaluated in batches whose activation memory stays
    under ``memory_mb``. ``meta`` records the path taken (``occlusion_path``), the
    multiply-accumulates of convolutions and linear layers per occluded copy relative to a full
    pass (``macs_fraction``, and ``macs_bound_fraction`` for the exact changed regions) and
    where full computation starts (``full_from``; ``hooked_modules`` lists modules computed in
    full because they have forward hooks). The caller's ``x`` is never changed.

    Args:
        patch: side of the occluding square, in input pixels.
        stride: step between windows.
        fill: ``"mean"`` (each image's per-channel mean), ``"blur"`` (a Gaussian-blurred copy
            of the image, ``blur_sigma``), ``"zero"`` (0 in model-input space, i.e. the
            normalisation mean colour) or a number (a constant in model-input space).
        score: ``"prob"`` or ``"logit"``.
        batch_size: perturbed images per forward pass; default chosen from ``memory_mb``.
        memory_mb: cap on the activation memory of one forward pass when ``batch_size`` is
            not given.
        blur_sigma: standard deviation of the blur fill, in pixels.
        mode: ``"auto"``, ``"exact"``, ``"naive"`` or ``"approx"`` (see above).
        tau: ``"approx"`` only: cap of each layer's changed box, as a fraction of the map side
            (1 disables it).
        coarse: ``"approx"`` only: step, in windows, of the first (coarse) pass (1 disables
            drill-down).
        drill: ``"approx"`` only: fraction of the remaining windows evaluated after the
            coarse pass.
        compile: ``"exact"``/``"approx"``: run the fully computed end of the network (fused,
            :mod:`convlens.accel.incremental.suffix`) compiled by ``torch.compile`` for the
            batch size used (equal to float rounding, checked on its first batch; kept for
            later calls on the same model): ``True``, ``False``, ``"auto"`` (for calls of at
            least :data:`~convlens.accel.AUTO_COMPILE_PASSES` occluded copies on a CPU with a
            C++ compiler: :meth:`~convlens.accel.Acceleration.compiles`), or ``None``: the
            call's ``accel.compile``. Never when that is ``False``.

    Raises:
        ValueError: an option is out of range.
    """

    title = "Occlusion"
    paper = "Zeiler & Fergus 2014"
    uses_gradients = False

    def __init__(
        self,
        patch: PositiveInt = 32,
        stride: PositiveInt = 16,
        fill: Literal["mean", "blur", "zero"] | FiniteFloat = "mean",
        score: Literal["prob", "logit"] = "prob",
        batch_size: PositiveInt | None = None,
        memory_mb: PositiveFloat = 1024.0,
        blur_sigma: PositiveFloat = 10.0,
        mode: Literal["auto", "exact", "naive", "approx"] = "auto",
        tau: _OpenFraction = 1.0,
        coarse: PositiveInt = 2,
        drill: Fraction = 0.5,
        compile: bool | Literal["auto"] | None = None,
    ) -> None:
        if score not in ("prob", "logit"):
            raise ValueError(f"score must be 'prob' or 'logit', not {score!r}")
        if not isinstance(fill, (int, float)) and fill not in ("mean", "blur", "zero"):
            raise ValueError(f"fill must be 'mean', 'blur', 'zero' or a number, not {fill!r}")
        if mode not in ("auto", "exact", "naive", "approx"):
            raise ValueError(f"mode must be 'auto', 'exact', 'naive' or 'approx', not {mode!r}")
        if compile not in (True, False, "auto", None):
            raise ValueError(f"compile must be True, False, 'auto' or None, not {compile!r}")
        self.compile = compile
        self.patch, self.stride, self.fill, self.score = patch, stride, fill, score
        self.batch_size, self.memory_mb, self.blur_sigma = batch_size, memory_mb, blur_sigma
        self.mode, self.tau, self.coarse, self.drill = mode, tau, coarse, drill

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "patch": self.patch,
            "stride": self.stride,
            "fill": self.fill,
            "score": self.score,
            "mode": self.mode,
        }
        if self.mode == "approx":
            opts.update(tau=self.tau, coarse=self.coarse, drill=self.drill)
        return opts

    def _fill(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        if self.fill == "blur":
            return blur(x, self.blur_sigma)
        value = 0.0 if self.fill == "zero" else float(self.fill)
        return torch.full_like(x, value)

    def _scores(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, K, 2): the targets' scores (probability or logit) and, with probabilities,
        ``1 - p`` summed over the other classes (exact where ``p`` rounds to 1)."""
        logits = logits.float()
        if self.score != "prob":
            s = logits.gather(1, targets)
            return torch.stack([s, torch.zeros_like(s)], dim=2)
        probs = torch.softmax(logits, dim=1)
        p = probs.gather(1, targets)
        others = probs.unsqueeze(1).expand(-1, targets.shape[1], -1)
        q = others.scatter(2, targets.unsqueeze(2), 0.0).sum(dim=2)
        return torch.stack([p, q], dim=2)

    def _drops(self, base: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(n, K) drops of the score from :meth:`_scores` of the clean images (``base``) to
        those of the occluded copies (``s``)."""
        if self.score != "prob":
            return base[..., 0] - s[..., 0]
        return torch.where(base[..., 0] > 0.5, s[..., 1] - base[..., 1], base[..., 0] - s[..., 0])

    def _engine(
        self, ctx: Context, ys: list[int], xs: list[int], meta: dict[str, Any]
    ) -> IncrementalEngine | None:
        if self.mode == "naive" or (self.mode == "auto" and not ctx.accel.incremental):
            meta["occlusion_path"] = "naive"
            return None
        tau = self.tau if self.mode == "approx" and self.tau < 1 else None
        try:
            engine = IncrementalEngine(
                ctx.net,
                ctx.x,
                self.patch,
                ys,
                xs,
                tau=tau,
                fold_batchnorm=ctx.accel.fold_batchnorm,
            )
        except NotIncrementalError as exc:
            if self.mode == "exact":
                raise UnsupportedModelError(
                    f"exact incremental occlusion is not possible: {exc}; use mode='naive' "
                    "or mode='auto'"
                ) from exc
            log.info("occlusion falls back to full forward passes: %s", exc)
            meta["occlusion_path"] = "naive"
            meta["fallback_reason"] = str(exc)
            return None
        meta["occlusion_path"] = "approx" if self.mode == "approx" else "exact"
        meta.update(engine.describe())
        return engine

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        b, _, h, w = x.shape
        meta: dict[str, Any] = {}
        ys_list = window_starts(h, self.patch, self.stride)
        xs_list = window_starts(w, self.patch, self.stride)
        with torch.no_grad():
            engine = self._engine(ctx, ys_list, xs_list, meta)
            if engine is None:
                # a copy: the caller's tensor stays as it is even if the model changes its
                # input in place (the occluded copies are new tensors anyway)
                logits, per_sample = _activation_bytes_per_sample(ctx.net, x.clone())
                forward = _naive_forward(ctx.net, x, ctx.accel)
            else:
                logits, per_sample = engine.logits, engine.bytes_per_pair()
            targets = ctx.targets(logits)
            base = self._scores(logits, targets)  # (B, K, 2)
            fill = self._fill(x)
            ys = torch.tensor(ys_list, device=x.device)
            xs = torch.tensor(xs_list, device=x.device)
            rows = torch.arange(h, device=x.device)
            cols = torch.arange(w, device=x.device)
            in_y = (rows >= ys[:, None]) & (rows < ys[:, None] + self.patch)  # (Py, H)
            in_x = (cols >= xs[:, None]) & (cols < xs[:, None] + self.patch)  # (Px, W)
            py, px = len(ys), len(xs)
            n_pos = py * px
            chunk = self.batch_size or max(1, int(self.memory_mb * 2**20 // per_sample))
            if engine is not None and self._compiles(ctx.accel, x.device, b * n_pos):
                engine.compile_suffix(ctx.net, min(chunk, b * n_pos))

            def evaluate(pairs: torch.Tensor) -> torch.Tensor:
                """Score drops (n, K) of (image * n_pos + position) pairs."""
                out = torch.empty(len(pairs), targets.shape[1], device=x.device)
                for start in range(0, len(pairs), chunk):
                    ctx.pace(start, len(pairs))
                    idx = pairs[start : start + chunk]
                    img, pos = idx // n_pos, idx % n_pos
                    if engine is None:
                        mask = in_y[pos // px][:, :, None] & in_x[pos % px][:, None, :]
                        batch = torch.where(mask[:, None], fill[img], x[img])
                        s = self._scores(forward(batch), targets[img])
                    else:
                        s = self._scores(engine.run(fill, img, pos // px, pos % px), targets[img])
                    out[start : start + len(idx)] = self._drops(base[img], s)
                return out

            all_pairs = torch.arange(b * n_pos, device=x.device)
            if self.mode == "approx" and engine is not None and (self.coarse > 1 or self.drill < 1):
                drops, evaluated = self._drill_down(evaluate, b, py, px, x.device)
            else:
                drops, evaluated = evaluate(all_pairs), b * n_pos
            drops = drops.view(b, py, px, -1)
            fy, fx = in_y.float(), in_x.float()
            total = torch.einsum("byxk,yh,xw->bkhw", drops, fy, fx)
            count = torch.outer(fy.sum(0), fx.sum(0))
            maps = total / count.clamp_min(1.0)
        meta.update(forward_passes=evaluated + b, perturbations_per_batch=chunk)
        return RawResult(maps, logits, targets, meta=meta)

    def _compiles(self, accel: Acceleration, device: torch.device, pairs: int) -> bool:
        """Whether the engine's suffix is compiled for a call of ``pairs`` occluded copies: the
        ``compile`` option, or the call's ``accel.compile`` when it is ``None``
        (:meth:`~convlens.accel.Acceleration.compiles`); never when ``accel.compile`` is
        ``False``."""
        if self.compile is None or accel.compile is False:
            return accel.compiles(device, pairs)
        return accel.but(compile=self.compile).compiles(device, pairs)

    def _drill_down(
        self,
        evaluate: Callable[[torch.Tensor], torch.Tensor],
        b: int,
        py: int,
        px: int,
        dev: torch.device,
    ) -> tuple[torch.Tensor, int]:
        """Adaptive drill-down: drops of a coarse grid of windows, bilinear interpolation to
        every window, then exact drops of the ``drill`` fraction of the others where the coarse
        drops vary most (3 x 3 range on the coarse grid, interpolated)."""
        cy = sorted({*range(0, py, self.coarse), py - 1})
        cx = sorted({*range(0, px, self.coarse), px - 1})
        wy, wx = _interp_matrix(cy, py, dev), _interp_matrix(cx, px, dev)  # (py, cy), (px, cx)
        cyt, cxt = torch.tensor(cy, device=dev), torch.tensor(cx, device=dev)
        img = torch.arange(b, device=dev)[:, None, None]
        coarse_pairs = (img * py * px + cyt[None, :, None] * px + cxt[None, None, :]).flatten()
        coarse = evaluate(coarse_pairs).view(b, len(cy), len(cx), -1)
        drops = torch.einsum("yc,bcdk,xd->byxk", wy, coarse, wx).reshape(b, py * px, -1)
        done = torch.zeros(b, py * px, dtype=torch.bool, device=dev)
        done.view(-1)[coarse_pairs] = True
        drops.view(-1, drops.shape[-1])[coarse_pairs] = coarse.reshape(-1, coarse.shape[-1])
        n_fine = round(self.drill * (py * px - len(cy) * len(cx)))
        evaluated = len(coarse_pairs)
        if n_fine > 0:
            # where interpolation is least reliable: the local range of the coarse drops
            c = coarse.permute(0, 3, 1, 2)  # (B, K, cy, cx)
            spread = F.max_pool2d(c, 3, 1, 1) + F.max_pool2d(-c, 3, 1, 1)
            spread = torch.einsum("yc,bkcd,xd->byxk", wy, spread, wx).reshape(b, py * px, -1)
            priority = spread.amax(dim=2).masked_fill(done, -1.0)
            pick = priority.topk(n_fine, dim=1).indices  # (B, n)
            pairs = (torch.arange(b, device=dev)[:, None] * py * px + pick).flatten()
            drops.view(-1, drops.shape[-1])[pairs] = evaluate(pairs)
            evaluated += len(pairs)
        return drops, evaluated


def _interp_matrix(knots: list[int], n: int, device: torch.device) -> torch.Tensor:
    """(n, len(knots)) weights of 1-D linear interpolation from values at ``knots``."""
    out = torch.zeros(n, len(knots), device=device)
    for i in range(n):
        j = max(k for k in range(len(knots)) if knots[k] <= i)
        if knots[j] == i or j == len(knots) - 1:
            out[i, j] = 1.0
        else:
            t = (i - knots[j]) / (knots[j + 1] - knots[j])
            out[i, j], out[i, j + 1] = 1.0 - t, t
    return out


@register("rise")
class RISE(Method):
    """RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation").

    ``N`` random masks are drawn: binary ``s x s`` grids (each cell kept with probability
    ``p``), upsampled bilinearly to ``(s + 1) cell`` and cropped at a random shift. The model
    scores each masked image ``x * m_i``; the saliency is the score-weighted mean of the masks,
    ``M_t = 1 / (N p) sum_i s_t(x * m_i) m_i``, accumulated in one matrix product per batch.
    Seeded: the same seed gives the same masks.

    With ``score="prob"`` the probabilities are used as log-probabilities, rescaled so that the
    largest weight is 1: the map is the paper's divided by ``exp(L) > 0`` per image and target,
    ``L = max_i log p_t(x * m_i)`` (kept in ``meta["log_scale"]``, (B, K); ``exp(L) M_t`` is the
    paper's map). When every masked copy is confidently another class, the paper's weights all
    underflow to exactly 0 in float32 and its map is blank; these are not.

    Args:
        masks: number of masks ``N``.
        cells: grid size ``s``.
        p: probability of keeping a cell.
        score: ``"prob"`` (the paper) or ``"logit"``.
        batch_size: masked images per forward pass.
        seed: seed of the masks.
    """

    title = "RISE"
    paper = "Petsiuk et al. 2018"
    uses_gradients = False

    def __init__(
        self,
        masks: PositiveInt = 2000,
        cells: PositiveInt = 7,
        p: _OpenFraction = 0.5,
        score: Literal["prob", "logit"] = "prob",
        batch_size: PositiveInt = 64,
        seed: Seed = 0,
    ) -> None:
        self.n, self.cells, self.p, self.score = masks, cells, p, score
        self.batch_size, self.seed = batch_size, seed

    def options(self) -> dict[str, Any]:
        return {
            "masks": self.n,
            "cells": self.cells,
            "p": self.p,
            "score": self.score,
            "seed": self.seed,
        }

    def draw(
        self, size: tuple[int, int], gen: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random part of all ``N`` masks: grids (N, 1, s, s) and shifts (N,), (N,).

        Drawn at once, so the masks do not depend on ``batch_size``."""
        h, w = size
        ch, cw = -(-h // self.cells), -(-w // self.cells)
        grid = (
            torch.rand(self.n, 1, self.cells, self.cells, generator=gen, device=device) < self.p
        ).float()
        dy = torch.randint(0, ch, (self.n,), generator=gen, device=device)
        dx = torch.randint(0, cw, (self.n,), generator=gen, device=device)
        return grid, dy, dx

    def masks(
        self, grid: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Masks (n, 1, H, W) in [0, 1]: grids upsampled bilinearly to ``(s + 1)`` cells and
        cropped at the shifts."""
        h, w = size
        ch, cw = -(-h // self.cells), -(-w // self.cells)
        up = F.interpolate(
            grid,
            size=((self.cells + 1) * ch, (self.cells + 1) * cw),
            mode="bilinear",
            align_corners=False,
        )
        rows = dy[:, None] + torch.arange(h, device=grid.device)  # (n, H)
        cols = dx[:, None] + torch.arange(w, device=grid.device)  # (n, W)
        idx = torch.arange(grid.shape[0], device=grid.device)[:, None, None]
        return up[idx, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        b, _, h, w = x.shape
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        with torch.no_grad():
            logits = ctx.net(x)
            targets = ctx.targets(logits)
            k = targets.shape[1]
            sal = torch.zeros(b, k, h * w, device=x.device, dtype=torch.float32)
            # with probabilities: sal holds sum_i exp(log p_i - log_scale) m_i, the running
            # maximum log_scale of the log-probabilities seen so far (as in a streaming softmax)
            log_scale = torch.full((b, k), float("-inf"), device=x.device)
            grid, dy, dx = self.draw((h, w), gen, x.device)
            done = 0
            while done < self.n:
                ctx.pace(done, self.n)
                sl = slice(done, min(done + self.batch_size, self.n))
                m = self.masks(grid[sl], dy[sl], dx[sl], (h, w))
                n = m.shape[0]
                masked = (x.unsqueeze(1) * m.unsqueeze(0).to(x.dtype)).flatten(0, 1)
                out = ctx.net(masked).float().view(b, n, -1)
                s = torch.log_softmax(out, dim=2) if self.score == "prob" else out
                s = s.gather(2, targets.unsqueeze(1).expand(b, n, k))  # (B, n, K)
                if self.score == "prob":
                    top = torch.maximum(log_scale, s.amax(dim=1))  # (B, K)
                    sal *= torch.exp(log_scale - top).nan_to_num(0.0).unsqueeze(2)
                    s = torch.exp(s - top.unsqueeze(1))
                    log_scale = top
                sal += torch.einsum("bnk,np->bkp", s, m.flatten(1))
                done += n
        maps = (sal / (self.n * self.p)).view(b, k, h, w)
        meta: dict[str, Any] = {"forward_passes": b * (self.n + 1)}
        if self.score == "prob":
            meta["log_scale"] = log_scale
        return RawResult(maps, logits, targets, meta=meta)
