"""Perturbation methods: occlusion sensitivity."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from convlens.hooks import hooks
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register

__all__ = ["Occlusion", "blur", "window_starts"]


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


@register("occlusion")
class Occlusion(Method):
    """Occlusion sensitivity (Zeiler & Fergus 2014, "Visualizing and Understanding
    Convolutional Networks", §4.2).

    A ``patch x patch`` square slides over the image with step ``stride``; at each position the
    square is replaced by ``fill`` and the model re-run. The map at a pixel is the drop of the
    target's score, ``s_t(x) - s_t(x with window occluded)``, averaged over all windows that
    cover the pixel. The score is the softmax probability (``score="prob"``) or the logit.
    All perturbations of all images are evaluated in batches whose activation memory stays
    under ``memory_mb``.

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
    """

    title = "Occlusion"
    paper = "Zeiler & Fergus 2014"
    uses_gradients = False

    def __init__(
        self,
        patch: int = 32,
        stride: int = 16,
        fill: Literal["mean", "blur", "zero"] | float = "mean",
        score: Literal["prob", "logit"] = "prob",
        batch_size: int | None = None,
        memory_mb: float = 1024.0,
        blur_sigma: float = 10.0,
    ) -> None:
        if patch < 1 or stride < 1:
            raise ValueError("patch and stride must be positive")
        if score not in ("prob", "logit"):
            raise ValueError(f"score must be 'prob' or 'logit', not {score!r}")
        if not isinstance(fill, (int, float)) and fill not in ("mean", "blur", "zero"):
            raise ValueError(f"fill must be 'mean', 'blur', 'zero' or a number, not {fill!r}")
        self.patch, self.stride, self.fill, self.score = patch, stride, fill, score
        self.batch_size, self.memory_mb, self.blur_sigma = batch_size, memory_mb, blur_sigma

    def options(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "stride": self.stride,
            "fill": self.fill,
            "score": self.score,
        }

    def _fill(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        if self.fill == "blur":
            return blur(x, self.blur_sigma)
        value = 0.0 if self.fill == "zero" else float(self.fill)
        return torch.full_like(x, value)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1) if self.score == "prob" else logits.float()

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        b, _, h, w = x.shape
        with torch.no_grad():
            logits, per_sample = _activation_bytes_per_sample(ctx.net, x)
            targets = ctx.targets(logits)
            base = self._scores(logits).gather(1, targets)  # (B, K)
            fill = self._fill(x)
            ys = torch.tensor(window_starts(h, self.patch, self.stride), device=x.device)
            xs = torch.tensor(window_starts(w, self.patch, self.stride), device=x.device)
            rows = torch.arange(h, device=x.device)
            cols = torch.arange(w, device=x.device)
            in_y = (rows >= ys[:, None]) & (rows < ys[:, None] + self.patch)  # (Py, H)
            in_x = (cols >= xs[:, None]) & (cols < xs[:, None] + self.patch)  # (Px, W)
            py, px = len(ys), len(xs)
            n_pos = py * px
            chunk = self.batch_size or max(1, int(self.memory_mb * 2**20 // per_sample))
            drops = torch.empty(b * n_pos, targets.shape[1], device=x.device)
            for start in range(0, b * n_pos, chunk):
                idx = torch.arange(start, min(start + chunk, b * n_pos), device=x.device)
                img, pos = idx // n_pos, idx % n_pos
                mask = in_y[pos // px][:, :, None] & in_x[pos % px][:, None, :]  # (n, H, W)
                batch = torch.where(mask[:, None], fill[img], x[img])
                s = self._scores(ctx.net(batch)).gather(1, targets[img])
                drops[idx] = base[img] - s
            drops = drops.view(b, py, px, -1)
            fy, fx = in_y.float(), in_x.float()
            total = torch.einsum("byxk,yh,xw->bkhw", drops, fy, fx)
            count = torch.outer(fy.sum(0), fx.sum(0))
            maps = total / count.clamp_min(1.0)
        meta = {"forward_passes": b * n_pos + b, "perturbations_per_batch": chunk}
        return RawResult(maps, logits, targets, meta=meta)


@register("rise")
class RISE(Method):
    """RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation").

    ``N`` random masks are drawn: binary ``s x s`` grids (each cell kept with probability
    ``p``), upsampled bilinearly to ``(s + 1) cell`` and cropped at a random shift. The model
    scores each masked image ``x * m_i``; the saliency is the score-weighted mean of the masks,
    ``M_t = 1 / (N p) sum_i s_t(x * m_i) m_i``, accumulated in one matrix product per batch.
    Seeded: the same seed gives the same masks.

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
        masks: int = 2000,
        cells: int = 7,
        p: float = 0.5,
        score: Literal["prob", "logit"] = "prob",
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if masks < 1 or cells < 1 or not 0 < p <= 1:
            raise ValueError("masks and cells must be positive and p in (0, 1]")
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
            grid, dy, dx = self.draw((h, w), gen, x.device)
            done = 0
            while done < self.n:
                sl = slice(done, min(done + self.batch_size, self.n))
                m = self.masks(grid[sl], dy[sl], dx[sl], (h, w))
                n = m.shape[0]
                masked = (x.unsqueeze(1) * m.unsqueeze(0).to(x.dtype)).flatten(0, 1)
                out = ctx.net(masked).float().view(b, n, -1)
                s = torch.softmax(out, dim=2) if self.score == "prob" else out
                s = s.gather(2, targets.unsqueeze(1).expand(b, n, k))  # (B, n, K)
                sal += torch.einsum("bnk,np->bkp", s, m.flatten(1))
                done += n
        maps = (sal / (self.n * self.p)).view(b, k, h, w)
        return RawResult(maps, logits, targets, meta={"forward_passes": b * (self.n + 1)})
