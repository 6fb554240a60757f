"""Backprop-rule methods: deconvnet, guided backpropagation, guided Grad-CAM, and the projection
of single activations into pixel space (Zeiler & Fergus' feature visualisation).

The rules change only the backward pass of ReLU-like units, for one call, through
:func:`convlens.hooks.backprop_rule`; see :data:`convlens.hooks.RULES`. Why the deconvnet needs
no explicit "unpooling": the gradient of a max-pool routes each value to the position of the
window's maximum, which is exactly unpooling with the switches recorded on the way up; the
gradient of a convolution is the transposed convolution with the same filters. So the gradient
with ReLUs rectifying the backward signal *is* Zeiler & Fergus' deconvnet (checked against the
literal implementation in :mod:`convlens.methods.reference`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.architecture import LayerRef, resolve_call
from convlens.errors import LayerError
from convlens.hooks.rules import backprop_rule
from convlens.hooks.state import model_state
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.cam import GradCAM
from convlens.methods.gradient import input_gradients
from convlens.methods.registry import register
from convlens.tokens import TokenLayout

__all__ = ["Deconvnet", "GuidedBackprop", "GuidedGradCAM", "project_units"]

RGB = {"display": "rgb"}


class _RuleMethod(Method):
    rule = "gradient"

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict

    def options(self) -> dict[str, Any]:
        return {"strict": self.strict}

    def compute(self, ctx: Context) -> RawResult:
        g, logits, targets = input_gradients(ctx, rule=self.rule, strict=self.strict)
        return RawResult(g.abs().amax(dim=2), logits, targets, meta=dict(RGB), attributions=g)


@register("deconvnet")
class Deconvnet(_RuleMethod):
    """Deconvnet (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional
    Networks").

    The class score is projected back to pixels through the network: transposed convolutions
    with the layer's own filters, unpooling with the max-pool switches, and a ReLU applied to the
    reconstruction at every ReLU (``R_in = ReLU(R_out)``, independent of the forward input).
    Computed as the gradient with that rule. For ReLU6 the reconstruction is rectified the same
    way. ``maps`` is ``max_c |R_c|``; ``attributions`` holds the RGB reconstruction.
    """

    title = "Deconvnet"
    paper = "Zeiler & Fergus 2014"
    rule = "deconvnet"


@register("guided")
class GuidedBackprop(_RuleMethod):
    """Guided backpropagation (Springenberg et al. 2015, "Striving for Simplicity").

    At every ReLU-like unit ``y = clamp(x, 0, u)`` the backward signal is
    ``R_in = ReLU(R_out) * [0 < x < u]``: only positive signal, only through units that were
    active (for ReLU6, not saturated) in the forward pass.
    """

    title = "Guided backprop"
    paper = "Springenberg et al. 2015"
    rule = "guided"


@register("guided-gradcam")
class GuidedGradCAM(Method):
    """Guided Grad-CAM (Selvaraju et al. 2017, §3.1): guided backpropagation multiplied
    element-wise by the Grad-CAM map upsampled to the input, fine-grained and
    class-discriminative. Costs one Grad-CAM and one guided pass.
    """

    title = "Guided Grad-CAM"
    paper = "Selvaraju et al. 2017"
    uses_layer = True

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict

    def options(self) -> dict[str, Any]:
        return {"strict": self.strict}

    def compute(self, ctx: Context) -> RawResult:
        cam = GradCAM().compute(ctx)
        fixed = Context(
            net=ctx.net,
            x=ctx.x,
            target=cam.targets,
            top_k=None,
            classes=ctx.classes,
            layer=ctx.layer,
            accel=ctx.accel,
            threads=ctx.threads,
        )
        g, _, _ = input_gradients(fixed, rule="guided", strict=self.strict)
        up = F.interpolate(cam.maps, size=ctx.x.shape[-2:], mode="bilinear", align_corners=False)
        attr = g * up.unsqueeze(2)
        return RawResult(
            attr.abs().amax(dim=2),
            cam.logits,
            cam.targets,
            layer=cam.layer,
            meta=dict(RGB),
            attributions=attr,
        )


def project_units(
    net: nn.Module,
    x: torch.Tensor,
    layer: str | LayerRef,
    units: torch.Tensor,
    *,
    rule: str = "deconvnet",
    batch_size: int = 16,
    layout: TokenLayout | None = None,
) -> torch.Tensor:
    """Project single activations into pixel space (Zeiler & Fergus 2014, Fig. 2).

    For each unit ``(b, c, y, x)`` of the layer's output, the signal that is 1 at that unit and
    0 elsewhere is sent back to the input of image ``b`` under ``rule`` (deconvnet by default).
    The forward pass stops at the layer. The model is left as found.

    Args:
        net: the model.
        x: (B, 3, H, W) inputs.
        layer: layer name, optionally ``name@call``.
        units: (N, 4) long tensor of ``(image index, channel, y, x)``.
        rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"``.
        batch_size: projections computed per backward pass.
        layout: for a token layer, how its output maps to ``(B, C, h, w)``
            (:class:`convlens.tokens.TokenLayout`); ``(y, x)`` is then a token's grid cell.

    Returns:
        (N, 3, H, W) projections.
    """
    units = units.to(torch.long)
    out = torch.empty(units.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    with model_state(net, eval_mode=True, grads=True):
        target = resolve_call(net, layer, x)
        for start in range(0, units.shape[0], batch_size):
            chunk = units[start : start + batch_size]
            xs = x[chunk[:, 0]].detach().clone().requires_grad_(True)
            with torch.enable_grad(), target.capture() as capture, backprop_rule(rule):
                net(xs)
            a = capture.output()
            if layout is not None:
                a = layout.to_maps(a)
            if a.dim() != 4:
                raise LayerError(f"layer {str(target.ref)!r} has no (B, C, H, W) output")
            idx = torch.arange(chunk.shape[0], device=a.device)
            picked = a[idx, chunk[:, 1], chunk[:, 2], chunk[:, 3]]
            (g,) = torch.autograd.grad(picked.sum(), xs)
            out[start : start + chunk.shape[0]] = g
    return out
