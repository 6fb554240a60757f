"""Wrappers that apply to any method: SmoothGrad."""

from __future__ import annotations

from typing import Any

import torch

from convlens.methods.base import Context, Method, RawResult
from convlens.methods.gradient import Saliency
from convlens.methods.registry import register

__all__ = ["SmoothGrad"]


@register("smoothgrad")
class SmoothGrad(Method):
    """SmoothGrad (Smilkov et al. 2017): average a method's maps over noisy copies of the input.

    ``M = 1/n sum_i M_inner(x + eps_i)``, ``eps_i ~ N(0, sigma^2)``, with
    ``sigma = noise * (max(x) - min(x))`` per image. The targets are resolved once on the clean
    input, so every noisy copy explains the same class. Wraps any method (default: saliency),
    e.g. ``SmoothGrad(GradCAM())``.

    Args:
        inner: the method to smooth.
        samples: number of noisy copies ``n``.
        noise: noise level as a fraction of each image's value range (the paper uses 0.1-0.2).
        batch_size: noisy copies per image evaluated in one batch.
        seed: seed of the noise (results are deterministic for a seed).
    """

    title = "SmoothGrad"
    paper = "Smilkov et al. 2017"

    def __init__(
        self,
        inner: Method | None = None,
        samples: int = 25,
        noise: float = 0.15,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self.inner = inner if inner is not None else Saliency()
        self.samples, self.noise, self.batch_size, self.seed = samples, noise, batch_size, seed
        self.uses_gradients = self.inner.uses_gradients  # type: ignore[misc]
        self.uses_layer = self.inner.uses_layer  # type: ignore[misc]

    def options(self) -> dict[str, Any]:
        return {
            "inner": self.inner.name,
            "samples": self.samples,
            "noise": self.noise,
            "seed": self.seed,
        }

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        b = x.shape[0]
        with torch.no_grad():
            logits = ctx.net(x)
        targets = ctx.targets(logits)
        span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(b, 1, 1, 1)
        sigma = self.noise * span
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        total: torch.Tensor | None = None
        layer = None
        done = 0
        while done < self.samples:
            s = min(self.batch_size, self.samples - done)
            eps = torch.randn((s, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
            noisy = (x.unsqueeze(0) + eps * sigma.unsqueeze(0)).flatten(0, 1)
            inner_ctx = Context(
                net=ctx.net,
                x=noisy,
                target=targets.repeat(s, 1),
                top_k=None,
                classes=ctx.classes,
                layer=ctx.layer,
            )
            raw = self.inner.compute(inner_ctx)
            part = raw.maps.view(s, b, *raw.maps.shape[1:]).sum(dim=0)
            total = part if total is None else total + part
            layer = raw.layer
            done += s
        assert total is not None
        return RawResult(total / self.samples, logits, targets, layer=layer, meta=raw.meta)
