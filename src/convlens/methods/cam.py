"""The CAM family: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, Layer-CAM, Eigen-CAM."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from convlens.accel.folded import copy_keeping_layer
from convlens.architecture import LayerRef, find_gap_head
from convlens.errors import LayerError
from convlens.hooks.capture import layer_capture, named_module
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register
from convlens.tokens import TokenLayout, layer_layout

__all__ = [
    "CAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "XGradCAM",
    "layer_gradients",
    "layer_layout_of",
    "layout_meta",
]


def layer_layout_of(ctx: Context, ref: LayerRef, a: torch.Tensor) -> TokenLayout:
    """How the output ``a`` of layer ``ref`` maps to a (B, C, h, w) feature map: unchanged for
    a convolutional map, the patch tokens of a (B, N, C) token sequence, or a channels-last
    (B, H, W, C) output moved channels-first (:mod:`convlens.tokens`).

    Raises:
        LayerError: the output is neither (e.g. the (B, classes) output of a linear layer).
    """
    return layer_layout(ctx.net, named_module(ctx.net, ref.name), a, ctx.x, str(ref))


def layout_meta(layout: TokenLayout) -> dict[str, Any]:
    """``{"layout": ...}`` for a result's ``meta`` when the layer is not a plain feature map
    (nothing for one, so results on CNNs are as before)."""
    return {} if layout.kind == "nchw" else {"layout": layout.as_meta()}


def layer_gradients(
    ctx: Context,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, TokenLayout]:
    """Activations and score gradients of one layer.

    Returns ``(A (B, C, h, w), dS/dA (B, K, C, h, w), logits, targets, layer name, layout)``.
    The gradients are taken with respect to the layer's own output (a token sequence for a
    transformer layer) and then mapped to the feature map exactly as the activations are
    (:class:`~convlens.tokens.TokenLayout`: prefix tokens dropped, tokens placed on the patch
    grid). The network runs without recording gradients up to the layer and with from there
    on, so the backward pass stops at the layer and no parameter gradients are computed. With
    the call's ``accel.fold_batchnorm`` the pass runs through the network's BatchNorm-folded
    copy where that copy computes the layer unchanged
    (:func:`convlens.accel.folded.copy_keeping_layer`; ``channels_last`` as ``accel`` says).
    """
    ref = ctx.layer_ref()
    net, x = ctx.net, ctx.x
    if ctx.accel.fold_batchnorm:
        nhwc = ctx.accel.uses_channels_last(x.device)
        fast = copy_keeping_layer(net, x, ref.name, channels_last=nhwc)
        if fast is not None:  # the same function up to float rounding, BatchNorm folded
            net = fast
            x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    with torch.no_grad(), layer_capture(net, ref.name, grad=True) as cap:
        logits = net(x)
        a = cap.output(ref.call)
        targets = ctx.targets(logits.detach())
        k = targets.shape[1]
        raw = []
        for j in range(k):
            score = logits.gather(1, targets[:, j : j + 1]).sum()
            (g,) = torch.autograd.grad(score, a, retain_graph=j < k - 1, allow_unused=True)
            if g is None:
                raise LayerError(f"the output does not depend on layer {str(ref)!r}")
            raw.append(g)
    # after the capture: finding the layout may run a pass of its own (the patch grid)
    layout = layer_layout_of(ctx, ref, a)
    grads = [layout.to_maps(g) for g in raw]
    maps = layout.to_maps(a.detach())
    return maps, torch.stack(grads, dim=1), logits.detach(), targets, str(ref), layout


@register("cam")
class CAM(Method):
    """Class activation mapping (Zhou et al. 2016, "Learning Deep Features for Discriminative
    Localization").

    For a model ending in global average pooling and a linear classifier with weights ``w``,
    ``M_t = sum_c w_tc A_c`` over the last feature map ``A``; the map's spatial mean plus the
    bias is the class score. The layer is found automatically; no gradients are needed.
    """

    title = "CAM"
    paper = "Zhou et al. 2016"
    uses_gradients = False
    uses_layer = True
    finds_own_layer = True
    multiclass_rank = 1

    def compute(self, ctx: Context) -> RawResult:
        if ctx.layer is not None:
            raise LayerError(
                "CAM always uses the feature map feeding global average pooling; "
                "to choose a layer use 'gradcam'"
            )
        head = find_gap_head(ctx.net, ctx.x)
        with torch.no_grad(), layer_capture(ctx.net, head.layer.name) as cap:
            logits = ctx.net(ctx.x)
            a = cap.output(head.layer.call)
        meta: dict[str, Any] = {}
        if head.layout is not None:
            a = head.layout.to_maps(a)
            meta = layout_meta(head.layout)
        targets = ctx.targets(logits)
        w = head.weight.to(a.dtype)[targets]  # (B, K, C)
        maps = torch.einsum("bkc,bchw->bkhw", w, a)
        return RawResult(maps, logits, targets, layer=str(head.layer), meta=meta)


@register("gradcam")
class GradCAM(Method):
    """Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization").

    ``alpha_c = mean_ij dS_t / dA_cij``, ``M_t = ReLU(sum_c alpha_c A_c)``. Works on any layer
    with a spatial output; the default is the last convolutional map.
    """

    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017"
    uses_layer = True
    multiclass_rank = 2

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Channel weights (B, K, C) from activations (B, C, h, w) and gradients (B, K, C, h, w)."""
        return g.mean(dim=(3, 4))

    def compute(self, ctx: Context) -> RawResult:
        a, g, logits, targets, name, layout = layer_gradients(ctx)
        alpha = self.weights(a, g)
        maps = torch.relu(torch.einsum("bkc,bchw->bkhw", alpha, a))
        return RawResult(maps, logits, targets, layer=name, meta=layout_meta(layout))


@register("gradcam++")
class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018).

    With ``g = dS_t/dA`` and the exponential-score closed form,
    ``a_cij = g^2 / (2 g^2 + sum_ab A_cab g^3)``, ``alpha_c = sum_ij a_cij ReLU(g_cij)``,
    ``M_t = ReLU(sum_c alpha_c A_c)``.
    """

    title = "Grad-CAM++"
    paper = "Chattopadhay et al. 2018"
    multiclass_rank = 1

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g2 = g.pow(2)
        g3 = g.pow(3)
        sum_a = a.sum(dim=(2, 3))[:, None, :, None, None]  # (B, 1, C, 1, 1)
        denom = 2 * g2 + sum_a * g3
        safe = torch.where(denom != 0, denom, torch.ones_like(denom))
        coeff = torch.where(denom != 0, g2 / safe, torch.zeros_like(g2))
        return (coeff * torch.relu(g)).sum(dim=(3, 4))


@register("xgradcam")
class XGradCAM(GradCAM):
    """XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM").

    ``alpha_c = sum_ij (A_cij / sum_ab A_cab) dS_t/dA_cij``, ``M_t = ReLU(sum_c alpha_c A_c)``.
    """

    title = "XGrad-CAM"
    paper = "Fu et al. 2020"
    multiclass_rank = 0  # not inherited from Grad-CAM

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        total = a.sum(dim=(2, 3))[:, None, :, None, None]
        safe = torch.where(total != 0, total, torch.ones_like(total))
        norm = torch.where(total != 0, a.unsqueeze(1) / safe, torch.zeros_like(g))
        return (norm * g).sum(dim=(3, 4))


@register("hirescam")
class HiResCAM(GradCAM):
    """HiResCAM (Draelos & Carin 2020): ``M_t = ReLU(sum_c dS_t/dA_c * A_c)`` element-wise, so
    each location keeps its own gradient instead of the channel average. On a GAP + linear head
    it equals Grad-CAM."""

    title = "HiResCAM"
    paper = "Draelos & Carin 2020"
    multiclass_rank = 0  # not inherited from Grad-CAM

    def compute(self, ctx: Context) -> RawResult:
        a, g, logits, targets, name, layout = layer_gradients(ctx)
        maps = torch.relu((g * a.unsqueeze(1)).sum(dim=2))
        return RawResult(maps, logits, targets, layer=name, meta=layout_meta(layout))


@register("layercam")
class LayerCAM(GradCAM):
    """Layer-CAM (Jiang et al. 2021): ``M_t = ReLU(sum_c ReLU(dS_t/dA_c) * A_c)`` element-wise.

    Args:
        layers: fuse several layers: each layer's map is computed, upsampled to the input,
            rescaled to [0, 1] and the maps are combined by element-wise maximum (the paper's
            fusion of shallow and deep maps). ``None`` uses the ``layer`` of the call (or the
            default layer).
    """

    title = "Layer-CAM"
    paper = "Jiang et al. 2021"
    multiclass_rank = 0  # not inherited from Grad-CAM

    def __init__(self, layers: list[str] | None = None) -> None:
        self.layers = layers

    def options(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def _one(self, ctx: Context) -> RawResult:
        a, g, logits, targets, name, layout = layer_gradients(ctx)
        maps = torch.relu((torch.relu(g) * a.unsqueeze(1)).sum(dim=2))
        return RawResult(maps, logits, targets, layer=name, meta=layout_meta(layout))

    def compute(self, ctx: Context) -> RawResult:
        if not self.layers:
            return self._one(ctx)
        size = ctx.x.shape[-2:]
        fused: torch.Tensor | None = None
        first: RawResult | None = None
        for layer in self.layers:
            one = Context(
                ctx.net,
                ctx.x,
                ctx.target if first is None else first.targets,
                None if first is not None else ctx.top_k,
                ctx.classes,
                layer,
                ctx.accel,
                ctx.threads,
            )
            raw = self._one(one)
            first = first or raw
            m = F.interpolate(raw.maps, size=size, mode="bilinear", align_corners=False)
            flat = m.flatten(2)
            lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
            m = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)
            fused = m if fused is None else torch.maximum(fused, m)
        assert fused is not None and first is not None
        return RawResult(fused, first.logits, first.targets, layer="+".join(self.layers))


@register("eigencam")
class EigenCAM(Method):
    """Eigen-CAM (Muhammad & Yeasin 2020): the projection of the layer's activations on their
    first principal component.

    With ``A`` reshaped to (h w, C) and centred per channel, ``M = A v_1`` where ``v_1`` is the
    first right singular vector; the sign is chosen so that the map correlates positively with
    the mean activation, then ``ReLU``. Class-agnostic: every target gets the same map.
    """

    title = "Eigen-CAM"
    paper = "Muhammad & Yeasin 2020"
    uses_gradients = False
    uses_layer = True

    def compute(self, ctx: Context) -> RawResult:
        ref = ctx.layer_ref()
        with torch.no_grad(), layer_capture(ctx.net, ref.name) as cap:
            logits = ctx.net(ctx.x)
            a = cap.output(ref.call)
        layout = layer_layout_of(ctx, ref, a)
        a = layout.to_maps(a)
        targets = ctx.targets(logits)
        b, _, h, w = a.shape
        flat = a.float().flatten(2).transpose(1, 2)  # (B, hw, C)
        centred = flat - flat.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = (centred @ vh[:, 0, :].unsqueeze(2)).squeeze(2)  # (B, hw)
        mean_act = flat.mean(dim=2)
        sign = torch.sign((proj * (mean_act - mean_act.mean(1, keepdim=True))).sum(1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        maps = torch.relu(proj * sign[:, None]).view(b, 1, h, w)
        maps = maps.expand(b, targets.shape[1], h, w)
        return RawResult(maps, logits, targets, layer=str(ref), meta=layout_meta(layout))
