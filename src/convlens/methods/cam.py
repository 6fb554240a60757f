"""The CAM family: CAM, Grad-CAM, Grad-CAM++."""

from __future__ import annotations

import torch

from convlens.architecture import find_gap_head
from convlens.errors import LayerError
from convlens.hooks import layer_capture
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register

__all__ = ["CAM", "GradCAM", "GradCAMPlusPlus", "layer_gradients"]


def _check_spatial(a: torch.Tensor, name: str) -> None:
    if a.dim() != 4:
        raise LayerError(
            f"layer {name!r} has output shape {tuple(a.shape)}; CAM methods need a "
            "(B, C, H, W) feature map. Pick a convolutional layer (`convlens layers MODEL`)."
        )


def layer_gradients(
    ctx: Context,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Activations and score gradients of one layer.

    Returns ``(A (B, C, h, w), dS/dA (B, K, C, h, w), logits, targets, layer name)``. The
    autograd graph starts at the layer, so the backward pass stops there and no parameter
    gradients are computed.
    """
    ref = ctx.layer_ref()
    with torch.enable_grad(), layer_capture(ctx.net, ref.name, grad=True) as cap:
        logits = ctx.net(ctx.x)
        a = cap.output(ref.call)
        _check_spatial(a, ref.name)
        targets = ctx.targets(logits.detach())
        k = targets.shape[1]
        grads = []
        for j in range(k):
            score = logits.gather(1, targets[:, j : j + 1]).sum()
            (g,) = torch.autograd.grad(score, a, retain_graph=j < k - 1, allow_unused=True)
            if g is None:
                raise LayerError(f"the output does not depend on layer {str(ref)!r}")
            grads.append(g)
    return a.detach(), torch.stack(grads, dim=1), logits.detach(), targets, str(ref)


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
        targets = ctx.targets(logits)
        w = head.weight.to(a.dtype)[targets]  # (B, K, C)
        maps = torch.einsum("bkc,bchw->bkhw", w, a)
        return RawResult(maps, logits, targets, layer=str(head.layer))


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

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Channel weights (B, K, C) from activations (B, C, h, w) and gradients (B, K, C, h, w)."""
        return g.mean(dim=(3, 4))

    def compute(self, ctx: Context) -> RawResult:
        a, g, logits, targets, name = layer_gradients(ctx)
        alpha = self.weights(a, g)
        maps = torch.relu(torch.einsum("bkc,bchw->bkhw", alpha, a))
        return RawResult(maps, logits, targets, layer=name)


@register("gradcam++")
class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018).

    With ``g = dS_t/dA`` and the exponential-score closed form,
    ``a_cij = g^2 / (2 g^2 + sum_ab A_cab g^3)``, ``alpha_c = sum_ij a_cij ReLU(g_cij)``,
    ``M_t = ReLU(sum_c alpha_c A_c)``.
    """

    title = "Grad-CAM++"
    paper = "Chattopadhay et al. 2018"

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g2 = g.pow(2)
        g3 = g.pow(3)
        sum_a = a.sum(dim=(2, 3))[:, None, :, None, None]  # (B, 1, C, 1, 1)
        denom = 2 * g2 + sum_a * g3
        safe = torch.where(denom != 0, denom, torch.ones_like(denom))
        coeff = torch.where(denom != 0, g2 / safe, torch.zeros_like(g2))
        return (coeff * torch.relu(g)).sum(dim=(3, 4))
