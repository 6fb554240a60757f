"""Wrappers that apply to any method: SmoothGrad, VarGrad, test-time augmentation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from convlens.errors import InputError
from convlens.methods.base import _SHAPE_ERRORS, Context, Method, RawResult
from convlens.methods.gradient import Saliency
from convlens.methods.registry import register
from convlens.validate import NonNegativeFloat, PositiveFloat, PositiveInt, Seed

__all__ = ["TTA", "SmoothGrad", "VarGrad"]


class _MapSums:
    """Running sums of maps and of their squares, over samples that may each carry their own
    positive scale: inner methods that keep ``meta["log_scale"] = L`` (Score-CAM, RISE) return
    ``M / exp(L)`` for the paper's map ``M``. The sums are kept on one common scale, the running
    maximum ``L*`` (as a streaming softmax does), so that ``total * exp(L*)`` is the sum of the
    paper's maps without ever forming ``exp(L)`` (which underflows in float32).
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.log_scale: torch.Tensor | None = None  # (B, K): L*

    def add(self, maps: torch.Tensor, log_scale: torch.Tensor | None) -> None:
        """Add samples ``maps`` (S, B, K, H, W) with scales ``log_scale`` (S, B, K) or none."""
        if log_scale is not None:
            top = log_scale.amax(dim=0)
            if self.log_scale is not None:
                top = torch.maximum(top, self.log_scale)
                old = torch.exp(self.log_scale - top).nan_to_num(0.0)[..., None, None]
                assert self.total is not None and self.squares is not None
                self.total = self.total * old
                self.squares = self.squares * old.square()
            maps = maps * torch.exp(log_scale - top).nan_to_num(0.0)[..., None, None]
            self.log_scale = top
        part, part2 = maps.sum(dim=0), maps.square().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.squares = part2 if self.squares is None else self.squares + part2

    def meta(self, inner: dict[str, Any], *, squared: bool = False) -> dict[str, Any]:
        """The inner method's ``meta`` with the common scale (doubled for a variance)."""
        meta = {k: v for k, v in inner.items() if k not in ("log_scale", "blank", "nonfinite")}
        if self.log_scale is not None:
            meta["log_scale"] = 2 * self.log_scale if squared else self.log_scale
        return meta


@register("smoothgrad")
class SmoothGrad(Method):
    """SmoothGrad (Smilkov et al. 2017): average a method's maps over noisy copies of the input.

    ``M = 1/n sum_i M_inner(x + eps_i)``, ``eps_i ~ N(0, sigma^2)``, with
    ``sigma = noise * (max(x) - min(x))`` per image. The targets are resolved once on the clean
    input, so every noisy copy explains the same class. Wraps any method (default: saliency),
    e.g. ``SmoothGrad(GradCAM())``.

    Seeded per image: the ``i``-th noisy copy of every image takes the ``i``-th draw of one
    image's shape from a generator seeded with ``seed`` (``eps_i = sigma z_i``, the same ``z_i``
    for each image), as if each image had its own generator. An image's map is therefore the
    same, to float tolerance (the inner forward passes batch other images with it), alone or in
    any batch, at any position and any ``batch_size``.

    Args:
        inner: the method to smooth.
        samples: number of noisy copies ``n``.
        noise: noise level as a fraction of each image's value range (the paper uses 0.1-0.2).
        batch_size: noisy images per forward pass, all input images together (at least one
            noisy copy of each image per pass).
        seed: seed of each image's noise (results are deterministic for a seed).
        aggregate: ``"mean"`` (SmoothGrad) or ``"var"`` (VarGrad: the variance of the maps over
            the noisy copies, Adebayo et al. 2018).
    """

    title = "SmoothGrad"
    paper = "Smilkov et al. 2017"

    def __init__(
        self,
        inner: Method | None = None,
        samples: PositiveInt = 25,
        noise: NonNegativeFloat = 0.15,
        batch_size: PositiveInt = 8,
        seed: Seed = 0,
        aggregate: str = "mean",
    ) -> None:
        if aggregate not in ("mean", "var"):
            raise ValueError(f"aggregate must be 'mean' or 'var', not {aggregate!r}")
        self.aggregate = aggregate
        self.inner = inner if inner is not None else Saliency()
        self.samples, self.noise, self.batch_size, self.seed = samples, noise, batch_size, seed
        self.uses_gradients = self.inner.uses_gradients  # type: ignore[misc]
        self.uses_layer = self.inner.uses_layer  # type: ignore[misc]
        self.finds_own_layer = self.inner.finds_own_layer  # type: ignore[misc]

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
        sums = _MapSums()
        layer = None
        done = 0
        per_pass = max(1, self.batch_size // b)
        while done < self.samples:
            ctx.pace(done, self.samples)
            s = min(per_pass, self.samples - done)
            # z_i of one image's shape, one draw per copy (the same whatever the passes):
            # (s, 1, C, H, W), shared by the batch's images
            z = torch.stack(
                [
                    torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)
                    for _ in range(s)
                ]
            ).unsqueeze(1)
            noisy = (x.unsqueeze(0) + z * sigma.unsqueeze(0)).flatten(0, 1)
            inner_ctx = Context(
                net=ctx.net,
                x=noisy,
                target=targets.repeat(s, 1),
                top_k=None,
                classes=ctx.classes,
                layer=ctx.layer,
                accel=ctx.accel,
                threads=ctx.threads,
            )
            raw = self.inner.compute(inner_ctx)
            scale = raw.meta.get("log_scale")
            sums.add(
                raw.maps.view(s, b, *raw.maps.shape[1:]),
                None if scale is None else scale.view(s, b, -1),
            )
            layer = raw.layer
            done += s
        assert sums.total is not None and sums.squares is not None
        mean = sums.total / self.samples
        out = (
            mean
            if self.aggregate == "mean"
            else (sums.squares / self.samples - mean.pow(2)).clamp_min(0)
        )
        meta = sums.meta(raw.meta, squared=self.aggregate != "mean")
        if self.aggregate != "mean" and meta.get("display") == "signed":
            del meta["display"]  # a variance is not signed
        return RawResult(out, logits, targets, layer=layer, meta=meta)


@register("vargrad")
class VarGrad(SmoothGrad):
    """VarGrad (Adebayo et al. 2018): the variance of a method's maps over noisy copies of the
    input, ``M = Var_i M_inner(x + eps_i)``; SmoothGrad with ``aggregate="var"``."""

    title = "VarGrad"
    paper = "Adebayo et al. 2018"

    def __init__(
        self,
        inner: Method | None = None,
        samples: PositiveInt = 25,
        noise: NonNegativeFloat = 0.15,
        batch_size: PositiveInt = 8,
        seed: Seed = 0,
    ) -> None:
        super().__init__(inner, samples, noise, batch_size, seed, aggregate="var")


@register("tta")
class TTA(Method):
    """Test-time augmentation of any method: the method's maps averaged over transformed copies
    of the input (horizontal flip, rescaling), each mapped back to the original frame.

    ``M = 1/|T| sum_T T^-1(M_inner(T(x)))``. Targets are fixed on the unchanged input.

    Args:
        inner: the method to average (default Grad-CAM).
        flips: also use the horizontally flipped image.
        scales: input scale factors (bilinear resize; 1.0 is the original).
    """

    title = "Test-time augmentation"
    paper = "(wrapper)"

    def __init__(
        self,
        inner: Method | None = None,
        flips: bool = True,
        scales: tuple[PositiveFloat, ...] = (1.0,),
    ) -> None:
        from convlens.methods.cam import GradCAM

        self.inner = inner if inner is not None else GradCAM()
        self.flips, self.scales = flips, tuple(scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError("scales must be positive")
        self.uses_gradients = self.inner.uses_gradients  # type: ignore[misc]
        self.uses_layer = self.inner.uses_layer  # type: ignore[misc]
        self.finds_own_layer = self.inner.finds_own_layer  # type: ignore[misc]

    def options(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "flips": self.flips, "scales": list(self.scales)}

    def compute(self, ctx: Context) -> RawResult:
        x = ctx.x
        h, w = x.shape[-2:]
        with torch.no_grad():
            logits = ctx.net(x)
        targets = ctx.targets(logits)
        sums = _MapSums()
        count = 0
        layer = None
        for scale in self.scales:
            size = (max(8, round(h * scale)), max(8, round(w * scale)))
            xs = (
                x
                if size == (h, w)
                else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            )
            for flip in (False, True) if self.flips else (False,):
                xt = xs.flip(-1) if flip else xs
                try:
                    raw = self.inner.compute(
                        Context(
                            ctx.net,
                            xt,
                            targets,
                            None,
                            ctx.classes,
                            ctx.layer,
                            ctx.accel,
                            ctx.threads,
                        )
                    )
                except RuntimeError as exc:
                    if size == (h, w) or not any(p in str(exc) for p in _SHAPE_ERRORS):
                        raise
                    first = str(exc).strip().splitlines()[0]
                    raise InputError(
                        f"TTA scale {scale} makes {size[0]}x{size[1]} inputs, on which the "
                        f"model fails: {first}; choose scales the model can take"
                    ) from exc
                m = raw.maps.float()
                if flip:
                    m = m.flip(-1)
                if m.shape[-2:] != (h, w):
                    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                scale = raw.meta.get("log_scale")
                sums.add(m.unsqueeze(0), None if scale is None else scale.unsqueeze(0))
                count += 1
                layer = raw.layer
        # the inner method's display settings (signed, percentile) hold for the average too
        assert sums.total is not None
        return RawResult(sums.total / count, logits, targets, layer=layer, meta=sums.meta(raw.meta))
