"""Faithfulness of maps to the model: deletion/insertion curves, Average Drop / Increase in
Confidence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from convlens.hooks import model_state
from convlens.methods.perturbation import blur
from convlens.models.base import ConvlensModel, unwrap

__all__ = ["Curves", "average_drop", "deletion_insertion", "ranking"]

Baseline = Literal["blur", "zero", "mean"] | torch.Tensor


@dataclass
class Curves:
    """Deletion and insertion curves of a batch (Petsiuk et al. 2018, §4).

    Attributes:
        fractions: (S + 1,) fraction of pixels removed (deletion) or inserted (insertion).
        deletion: (B, S + 1) target score after removing the most important pixels first.
        insertion: (B, S + 1) target score after inserting the most important pixels first.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @staticmethod
    def _auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        return torch.trapezoid(curve, fractions, dim=-1)

    @property
    def deletion_auc(self) -> torch.Tensor:
        """(B,) area under the deletion curve: lower is better."""
        return self._auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> torch.Tensor:
        """(B,) area under the insertion curve: higher is better."""
        return self._auc(self.insertion, self.fractions)


def _baseline(x: torch.Tensor, baseline: Baseline, sigma: float) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "blur":
        return blur(x, sigma)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"baseline must be 'blur', 'zero', 'mean' or a tensor, not {baseline!r}")


def ranking(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel by importance, (B, H, W): 0 for the most important.

    Ties keep raster order (a stable sort), so the result is deterministic.
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1).float()
    order = torch.sort(-flat, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand(b, -1))
    return rank.view(maps.shape)


def deletion_insertion(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 50,
    deletion_baseline: Baseline = "zero",
    insertion_baseline: Baseline = "blur",
    blur_sigma: float = 10.0,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int = 64,
) -> Curves:
    """Deletion and insertion curves (Petsiuk, Das & Saenko 2018, "RISE", §4).

    Deletion replaces the pixels with the baseline in order of decreasing importance, ``HW/steps``
    pixels per step, and records the target's score; a faithful map makes it fall fast (low
    area). Insertion starts from the (blurred) baseline and puts the pixels back in the same
    order; a faithful map makes it rise fast (high area). All steps of all images are evaluated
    together, ``batch_size`` images per forward pass.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        maps: (B, H, W) importance maps at input resolution (e.g. ``exp.maps[:, 0]``).
        targets: (B,) class indices.
        steps: number of steps ``S``.
        deletion_baseline: what removed pixels become (``"zero"``: 0 in model-input space).
        insertion_baseline: the starting image of insertion.
        blur_sigma: for blurred baselines, in pixels.
        score: ``"prob"`` (softmax) or ``"logit"``.
        batch_size: images per forward pass.

    Returns:
        The curves; ``.deletion_auc`` and ``.insertion_auc`` give the areas.
    """
    net, _ = unwrap(model)
    if maps.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"maps must be (B, H, W) = {(x.shape[0], *x.shape[-2:])}")
    b, _, h, w = x.shape
    hw = h * w
    rank = ranking(maps.to(x.device)).view(b, 1, h, w)
    counts = torch.round(torch.linspace(0, hw, steps + 1, device=x.device)).long()
    targets = targets.to(x.device).view(b)
    curves = {}
    with model_state(net, eval_mode=True, grads=False), torch.no_grad():
        for mode, base_spec in (("deletion", deletion_baseline), ("insertion", insertion_baseline)):
            base = _baseline(x, base_spec, blur_sigma)
            out = torch.empty(b * (steps + 1), device=x.device)
            total = b * (steps + 1)
            for start in range(0, total, batch_size):
                idx = torch.arange(start, min(start + batch_size, total), device=x.device)
                img, k = idx // (steps + 1), idx % (steps + 1)
                chosen = rank[img] < counts[k].view(-1, 1, 1, 1)
                if mode == "deletion":
                    batch = torch.where(chosen, base[img], x[img])
                else:
                    batch = torch.where(chosen, x[img], base[img])
                logits = net(batch).float()
                s = torch.softmax(logits, dim=1) if score == "prob" else logits
                out[idx] = s.gather(1, targets[img].view(-1, 1)).squeeze(1)
            curves[mode] = out.view(b, steps + 1).cpu()
    return Curves(counts.cpu().float() / hw, curves["deletion"], curves["insertion"])


def average_drop(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018, "Grad-CAM++", §5.1).

    Each image is multiplied by its map rescaled to [0, 1] (in [0, 1] pixel space when the
    model's preprocessing is known, else in model-input space) and re-scored:
    ``drop_i = max(0, Y_i - O_i) / Y_i`` and ``increase_i = [O_i > Y_i]``, with ``Y`` the
    target's probability on the image and ``O`` on the masked image.

    Returns:
        ``(drop (B,), increase (B,))``; their means (x100) are the paper's % figures.
    """
    net, wrapper = unwrap(model)
    b = x.shape[0]
    flat = maps.reshape(b, -1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    unit = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(b, 1, *x.shape[-2:]).to(x)
    if wrapper is not None:
        masked = wrapper.preprocess.normalize(wrapper.preprocess.denormalize(x) * unit)
    else:
        masked = x * unit
    t = targets.to(x.device).view(b, 1)
    with model_state(net, eval_mode=True, grads=False), torch.no_grad():
        y = torch.softmax(net(x).float(), 1).gather(1, t).squeeze(1)
        o = torch.softmax(net(masked).float(), 1).gather(1, t).squeeze(1)
    drop = (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return drop.cpu(), (o > y).float().cpu()
