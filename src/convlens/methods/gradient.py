"""Input-gradient methods: saliency and gradient x input."""

from __future__ import annotations

import torch

from convlens.hooks import backprop_rule
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register

__all__ = ["GradientXInput", "Saliency", "input_gradients"]

#: Pixel-gradient maps have a few extreme values; views clip them at this percentile.
DISPLAY = {"display_percentile": 99.0}


def input_gradients(
    ctx: Context, *, rule: str | None = None, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dS_t/dx for every target: ``(grads (B, K, 3, H, W), logits (B, N), targets (B, K))``.

    One forward pass, then one backward pass per target column (K of them). Only the input
    requires gradients; parameters stay frozen, so no parameter gradient is computed.

    Args:
        ctx: the call's context.
        rule: a backward rule for ReLU-like units (:data:`convlens.hooks.RULES`), e.g.
            ``"guided"``; ``None`` for the true gradient.
        strict: with a rule, refuse models that also use activations without a rule.

    Raises:
        UnsupportedModelError: ``rule`` cannot apply to the model (see
            :meth:`convlens.hooks.BackpropRuleMode.check`).
    """
    x = ctx.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if rule is None:
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
            grads.append(g)
    return torch.stack(grads, dim=1), logits.detach(), targets


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
        return RawResult(grads.abs().amax(dim=2), logits, targets, meta=DISPLAY)


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
        return RawResult((grads * ctx.x.unsqueeze(1)).sum(dim=2), logits, targets, meta=DISPLAY)
