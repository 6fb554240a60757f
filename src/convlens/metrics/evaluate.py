"""Evaluating methods on a batch: a method x metric table with random and centre baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from convlens.accel.settings import Acceleration
from convlens.hooks.state import model_state
from convlens.methods.base import Method
from convlens.methods.registry import get_method
from convlens.metrics.faithfulness import (
    DEFAULT_STEPS,
    Compile,
    Curves,
    _curves,
    _drop_increase,
    _masked,
    _Scorer,
    metrics_accel,
)
from convlens.metrics.pointing import pointing_game
from convlens.models.base import ConvlensModel, unwrap
from convlens.validate import positive_int
from convlens.validate import seed as check_seed

__all__ = ["BASELINE_MAPS", "EvaluationTable", "baseline_map", "evaluate_methods"]

BASELINE_MAPS = ("random", "centre")
COLUMNS = ("deletion_auc", "insertion_auc", "average_drop", "increase", "pointing")


def baseline_map(kind: str, b: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Reference maps that know nothing of the model: ``"random"`` (uniform noise, seeded) or
    ``"centre"`` (a Gaussian centred in the image, sigma a quarter of the size)."""
    h, w = size
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(b, h, w, generator=g)
    if kind == "centre":
        ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
        xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        d2 = (ys[:, None] / (h / 4)) ** 2 + (xs[None, :] / (w / 4)) ** 2
        return torch.exp(-0.5 * d2).expand(b, h, w).clone()
    raise ValueError(f"unknown baseline map {kind!r}")


@dataclass
class EvaluationTable:
    """Per-image scores of each method (rows) for each metric (columns)."""

    per_image: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    curves: dict[str, Curves] = field(default_factory=dict)

    def add(self, name: str, column: str, values: torch.Tensor) -> None:
        """Append per-image values (for streaming over batches)."""
        row = self.per_image.setdefault(name, {})
        v = values.detach().float().cpu().view(-1)
        row[column] = v if column not in row else torch.cat([row[column], v])

    def means(self) -> dict[str, dict[str, float]]:
        """``{method: {metric: mean over images}}``."""
        return {
            m: {c: float(v.nanmean()) for c, v in cols.items()}
            for m, cols in self.per_image.items()
        }

    def markdown(self) -> str:
        """The table as markdown: means over images, arrows saying which direction is better."""
        means = self.means()
        cols = [c for c in COLUMNS if any(c in r for r in means.values())]
        arrow = {
            "deletion_auc": "↓",
            "insertion_auc": "↑",
            "average_drop": "↓",
            "increase": "↑",
            "pointing": "↑",
        }
        head = "| method | " + " | ".join(f"{c} {arrow[c]}" for c in cols) + " |"
        lines = [head, "|---|" + "---:|" * len(cols)]
        for m, row in means.items():
            cells = ["" if c not in row or math.isnan(row[c]) else f"{row[c]:.3f}" for c in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_methods(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    methods: Sequence[str | Method],
    *,
    targets: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    baselines: bool = True,
    table: EvaluationTable | None = None,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    accel: Acceleration | None = None,
    compile: Compile | None = None,
) -> EvaluationTable:
    """Score each method's maps on one batch: deletion and insertion AUC, Average Drop and
    Increase in Confidence, and the pointing game when object ``masks`` are given; the random and
    centre maps are scored the same way as baselines. Call repeatedly with the same ``table`` to
    accumulate over batches.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        methods: method names or objects.
        targets: (B,) classes; default the top-1 predictions.
        masks: (B, H, W) boolean object masks for the pointing game.
        steps: deletion/insertion steps.
        batch_size: images per forward pass in the curves.
        baselines: also score the random and centre maps.
        table: a table to add to.
        seed: seed of the random baseline.
        autocast: run the metrics' forward passes under ``torch.autocast`` with this dtype.
        accel: the accelerators of the whole call, the methods' and the metrics' (default:
            the wrapper's :attr:`~convlens.models.ConvlensModel.accel`, else
            ``Acceleration()``; equal to float rounding, see
            :func:`convlens.metrics.deletion_insertion_many`).
        compile: shorthand for ``accel.but(compile=compile)``
            (:func:`~convlens.metrics.faithfulness.metrics_accel`).

    Returns:
        ``table`` (a new one when not given) with rows for the methods and the baselines.
    """
    steps = positive_int(steps, "steps")
    batch_size = positive_int(batch_size, "batch_size")
    seed = check_seed(seed, "seed")
    table = table if table is not None else EvaluationTable()
    accel = metrics_accel(model, accel, compile)
    maps: dict[str, torch.Tensor] = {}
    for m in methods:
        method = get_method(m) if isinstance(m, str) else m
        exp = method(model, x, targets, accel=accel)
        targets = exp.targets[:, 0] if targets is None else targets
        maps[method.name] = exp.maps[:, 0]
    net, wrapper = unwrap(model)
    if targets is None:
        with model_state(net, eval_mode=True, grads=False), torch.no_grad():
            targets = net(x).argmax(1)
    if baselines:
        for kind in BASELINE_MAPS:
            maps[f"({kind})"] = baseline_map(kind, x.shape[0], tuple(x.shape[-2:]), seed).to(x)
    targets = targets.to(x.device).view(-1)
    with _Scorer(model, x, accel=accel, autocast=autocast, batch_size=batch_size) as scorer:
        all_curves = _curves(
            scorer,
            x,
            maps,
            targets,
            steps=steps,
            deletion_baseline="zero",
            insertion_baseline="blur",
            blur_sigma=10.0,
            score="prob",
        )
        y = scorer.score(x, targets)
        masked = torch.cat([_masked(x, m, wrapper) for m in maps.values()])
        o = scorer.score(masked, targets.repeat(len(maps))).view(len(maps), -1)
    for j, (name, m) in enumerate(maps.items()):
        curves = all_curves[name]
        table.add(name, "deletion_auc", curves.deletion_auc)
        table.add(name, "insertion_auc", curves.insertion_auc)
        prev = table.curves.get(name)
        table.curves[name] = (
            curves
            if prev is None
            else Curves(
                curves.fractions,
                torch.cat([prev.deletion, curves.deletion]),
                torch.cat([prev.insertion, curves.insertion]),
            )
        )
        drop, inc = _drop_increase(y, o[j])
        table.add(name, "average_drop", drop)
        table.add(name, "increase", inc)
        if masks is not None:
            table.add(name, "pointing", pointing_game(m, masks).float())
    return table
