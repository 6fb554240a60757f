"""Transformer-native methods: attention rollout and gradient-weighted attention relevance.

Both read the attention matrices of every block of a vision transformer, made explicit for the
call by :func:`convlens.hooks.attention.explicit_attention` (also where the model runs fused
``scaled_dot_product_attention``), and return the class token's row over the patch tokens,
laid out on the patch grid. Models without recognised attention modules (CNNs) are refused
with an :class:`~convlens.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from convlens.errors import UnsupportedModelError
from convlens.hooks.attention import SUPPORTED_ATTENTION, AttentionRecord, explicit_attention
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.registry import register
from convlens.tokens import MAX_PREFIX, patch_grid
from convlens.validate import Bound

__all__ = ["AttentionRelevance", "AttentionRollout", "attention_relevance", "attention_rollout"]

#: A fraction in [0, 1).
_DiscardRatio = Annotated[float, Bound(low=0, high=1, high_open=True)]

_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class _Tokens:
    """Where the patch tokens are: ``prefix`` tokens first (the class token at index 0, then
    distillation or register tokens), then the ``grid`` (rows, columns) of patches row by row."""

    prefix: int
    grid: tuple[int, int]


def _patch_grid(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """The patch grid of a vision transformer for input ``x``, observed
    (:func:`convlens.tokens.patch_grid`: the patch-embedding convolution's output size).

    Raises:
        UnsupportedModelError: the model shows no patch grid.
    """
    grid = patch_grid(net, x)
    if grid is None:
        raise UnsupportedModelError(
            f"cannot find the patch grid of {type(net).__name__} (no patch-embedding convolution "
            f"before its token sequence); attention methods support {SUPPORTED_ATTENTION}"
        )
    return grid


def _attentions(
    record: AttentionRecord, grid: tuple[int, int], batch: int, net: nn.Module
) -> tuple[list[torch.Tensor], _Tokens]:
    """The recorded (B, heads, N, N) matrices, checked against the patch grid, and the token
    layout they imply: ``N - h w`` prefix tokens (at least the class token) before the patches.
    """
    if not record.weights:
        raise UnsupportedModelError(
            f"the model's attention modules computed no attention weights; attention methods "
            f"support {SUPPORTED_ATTENTION}"
        )
    n = int(record.weights[0].shape[-1])
    tokens = _Tokens(n - grid[0] * grid[1], grid)
    for name, a in zip(record.names, record.weights, strict=True):
        if a.dim() != 4 or a.shape[0] != batch or a.shape[-2:] != (n, n) or tokens.prefix < 0:
            raise UnsupportedModelError(
                f"attention of {name!r} has shape {tuple(a.shape)}, not (B, heads, N, N) over "
                f"prefix tokens and a {grid[0]}x{grid[1]} patch grid; attention methods support "
                "global self-attention over the tokens"
            )
    if tokens.prefix > MAX_PREFIX:
        raise UnsupportedModelError(
            f"the attention matrices are {n}x{n}, {tokens.prefix} more than the "
            f"{grid[0]}x{grid[1]} patch grid; attention methods support global self-attention "
            "over a class token, a few other prefix tokens and the patches"
        )
    if tokens.prefix == 0 or not _has_class_token(net):
        raise UnsupportedModelError(
            "the model has no class token (its prefix tokens, if any, are registers); "
            "attention rollout and relevance read the class token's attention"
        )
    return list(record.weights), tokens


def _has_class_token(net: nn.Module) -> bool:
    """``False`` when a module of ``net`` states it has no class token (timm's
    ``has_class_token`` / ``cls_token = None``; its prefix tokens are then registers)."""
    for m in net.modules():
        if getattr(m, "has_class_token", True) is False:
            return False
        if hasattr(m, "cls_token") and m.cls_token is None:
            return False
    return True


def attention_rollout(
    attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-block attention matrices.

    Per block, ``A`` (B, heads, N, N) is fused over heads (mean, max or min); with
    ``discard_ratio`` the smallest ``int(discard_ratio N^2)`` entries of each image's fused
    matrix, never the class token's attention to itself, are set to 0; then
    ``A_hat = 0.5 A + 0.5 I`` with rows renormalised to sum to 1, and
    ``R = A_hat_L ... A_hat_2 A_hat_1``.

    Returns:
        ``R`` (B, N, N); row 0 is the class token's attention flow to every input token.
    """
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand(b, n, n)
    for a in attentions:
        if head_fusion == "mean":
            fused = a.mean(dim=1)
        elif head_fusion == "max":
            fused = a.amax(dim=1)
        else:
            fused = a.amin(dim=1)
        drop = int(discard_ratio * n * n)
        if drop > 0:
            flat = fused.flatten(1)
            keyed = flat.clone()
            keyed[:, 0] = torch.inf  # the class token's attention to itself is kept
            lowest = keyed.topk(drop, dim=1, largest=False).indices
            fused = flat.scatter(1, lowest, 0.0).view(b, n, n)
        step = 0.5 * fused + 0.5 * eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    return result


def attention_relevance(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, eq. 5-6, self-attention).

    ``R = I``; per block, ``Abar = mean_h ReLU(dS/dA * A)`` and ``R = R + Abar R``.

    Args:
        attentions: per block, (B, heads, N, N) attention matrices.
        gradients: per block, the target score's gradient with respect to them.

    Returns:
        ``R`` (B, N, N); row 0 is the class token's relevance of every input token.
    """
    b, _, n, _ = attentions[0].shape
    r = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(b, n, n)
    for a, g in zip(attentions, gradients, strict=True):
        abar = (g * a).clamp_min(0).mean(dim=1)
        r = r + abar @ r
    return r


def _patch_map(r: torch.Tensor, tokens: _Tokens) -> torch.Tensor:
    """Row 0 of (B, N, N) over the patch tokens, as (B, rows, columns)."""
    return r[:, 0, tokens.prefix :].reshape(r.shape[0], *tokens.grid)


class _AttentionMethod(Method):
    """Methods that read the attention matrices of a vision transformer."""

    needs_attention = True


@register("rollout")
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    Per block the attention ``A`` is fused over heads (``head_fusion``: mean, max or min),
    ``A_hat = 0.5 A + 0.5 I`` (the residual connection) with rows renormalised to sum to 1;
    ``R = A_hat_L ... A_hat_1`` and the map is the class token's row of ``R`` over the patch
    tokens, on the patch grid. ``discard_ratio`` zeroes the smallest fraction of each block's
    fused attention first (as common implementations do; the class token's attention to itself
    is kept). Class-agnostic: every target gets the same map (``meta["class_agnostic"]``).

    Args:
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: fraction of the fused attention entries set to 0, in [0, 1).

    Raises:
        UnsupportedModelError: the model is not a supported vision transformer.
    """

    title = "Attention rollout"
    paper = "Abnar & Zuidema 2020"
    uses_gradients = False

    def __init__(
        self,
        head_fusion: Literal["mean", "max", "min"] = "mean",
        discard_ratio: _DiscardRatio = 0.0,
    ) -> None:
        if head_fusion not in _FUSIONS:
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)

    def options(self) -> dict[str, Any]:
        return {"head_fusion": self.head_fusion, "discard_ratio": self.discard_ratio}

    def compute(self, ctx: Context) -> RawResult:
        with torch.no_grad(), explicit_attention(ctx.net) as record:
            grid = _patch_grid(ctx.net, ctx.x)
            record.clear()  # only the explained pass's attention
            logits = ctx.net(ctx.x)
        attentions, tokens = _attentions(record, grid, ctx.x.shape[0], ctx.net)
        targets = ctx.targets(logits)
        r = attention_rollout(attentions, self.head_fusion, self.discard_ratio)
        m = _patch_map(r, tokens).unsqueeze(1)
        maps = m.expand(-1, targets.shape[1], -1, -1)
        meta = {"class_agnostic": True, "attention_layers": list(record.names)}
        return RawResult(maps, logits, targets, meta=meta)


@register("chefer")
class AttentionRelevance(_AttentionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    ``R = I``; per block, in order, ``Abar = mean_h ReLU(dS_t/dA * A)`` and
    ``R = R + Abar R``, where ``A`` is the block's attention (B, heads, N, N) and ``S_t`` the
    target's logit; the map is the class token's row of ``R`` over the patch tokens, on the
    patch grid. Class-specific through the gradient: one backward pass per target.

    Raises:
        UnsupportedModelError: the model is not a supported vision transformer.
    """

    title = "Attention relevance"
    paper = "Chefer et al. 2021"
    multiclass_rank = 1

    def compute(self, ctx: Context) -> RawResult:
        # The input requires gradients so that the attention matrices are in the graph (the
        # parameters are frozen for the call); no gradient is taken with respect to it.
        x = ctx.x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), explicit_attention(ctx.net) as record:
            grid = _patch_grid(ctx.net, ctx.x)
            record.clear()  # only the explained pass's attention
            logits = ctx.net(x)
            attentions, tokens = _attentions(record, grid, x.shape[0], ctx.net)
            targets = ctx.targets(logits.detach())
            k = targets.shape[1]
            maps = []
            for j in range(k):
                score = logits.gather(1, targets[:, j : j + 1]).sum()
                grads = torch.autograd.grad(
                    score, attentions, retain_graph=j < k - 1, allow_unused=True
                )
                g = [
                    torch.zeros_like(a) if d is None else d
                    for a, d in zip(attentions, grads, strict=True)
                ]
                r = attention_relevance([a.detach() for a in attentions], g)
                maps.append(_patch_map(r, tokens))
        meta = {"attention_layers": list(record.names)}
        return RawResult(torch.stack(maps, dim=1), logits.detach(), targets, meta=meta)
