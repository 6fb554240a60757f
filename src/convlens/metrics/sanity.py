"""Sanity checks for saliency maps (Adebayo et al. 2018): cascading randomisation of the model's
parameters from the top layer down, and how much each method's maps change."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from convlens.accel.settings import Acceleration
from convlens.errors import BlankMapWarning
from convlens.hooks.capture import hooks
from convlens.hooks.state import model_state
from convlens.methods.base import Method
from convlens.methods.registry import get_method
from convlens.metrics.faithfulness import metrics_accel
from convlens.models.base import ConvlensModel, unwrap
from convlens.validate import positive_int
from convlens.validate import seed as check_seed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SanityResult",
    "cascading_randomization",
    "map_similarity",
    "parameter_layers",
    "relative_range",
]

METRICS = ("spearman_abs", "ssim", "hog")


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Similarity of two (H, W) maps, as in Adebayo et al. 2018, §3.

    - ``spearman_abs``: Spearman rank correlation of the absolute values;
    - ``ssim``: structural similarity of the maps rescaled to [0, 1];
    - ``hog``: Pearson correlation of their histograms of oriented gradients.
    """
    from scipy.stats import pearsonr, spearmanr
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    x = a.detach().float().cpu().numpy()
    y = b.detach().float().cpu().numpy()
    out: dict[str, float] = {}
    if np.ptp(np.abs(x)) == 0 or np.ptp(np.abs(y)) == 0:
        out["spearman_abs"] = float("nan")
    else:
        out["spearman_abs"] = float(spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0])
    ux, uy = _unit(x), _unit(y)
    out["ssim"] = float(structural_similarity(ux, uy, data_range=1.0))
    cell = max(4, min(x.shape) // 14)
    hx = hog(ux, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
    hy = hog(uy, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
    if np.ptp(hx) == 0 or np.ptp(hy) == 0:
        out["hog"] = float("nan")
    else:
        out["hog"] = float(pearsonr(hx, hy)[0])
    return out


def relative_range(maps: torch.Tensor) -> torch.Tensor:
    """(B,) ``(max - min) / max |m|`` of each (B, H, W) map; 0 for an all-zero map.

    Near 0 the map is (almost) constant: similarity scores between such a map and another one
    rank or compare a ripple (e.g. a padding pattern) and say little about the model.
    """
    flat = maps.detach().reshape(maps.shape[0], -1).double()
    spread = flat.amax(1) - flat.amin(1)
    return (spread / flat.abs().amax(1).clamp_min(1e-300)).float().cpu()


def parameter_layers(net: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules that own parameters, in the order a forward pass first reaches them."""
    names = {m: n for n, m in net.named_modules()}
    owners = [m for m in net.modules() if any(True for _ in m.parameters(recurse=False))]
    order: list[str] = []

    def seen(m: nn.Module, *_: Any) -> None:
        if names[m] not in order:
            order.append(names[m])

    regs = [lambda m=m: m.register_forward_hook(seen) for m in owners]
    with model_state(net, eval_mode=True, grads=False), torch.no_grad(), hooks(regs):
        net(x[:1])
    return order


@dataclass
class SanityResult:
    """Similarity between each method's maps on the original and the randomised models.

    Attributes:
        steps: names of the last layer randomised at each step (cumulative, top first).
        scores: ``{method: {metric: (steps, B) array}}``.
        ranges: ``{method: (steps, B) array}``: :func:`relative_range` of the randomised maps;
            where it is near 0 the maps are nearly constant and their similarity is not
            meaningful.
    """

    steps: list[str]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    ranges: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, method: str, metric: str) -> np.ndarray:
        """(steps,) mean similarity over images."""
        return np.nanmean(self.scores[method][metric], axis=1)

    def figure(self) -> Figure:
        """One panel per metric: mean similarity against the randomised depth, one line per
        method (Adebayo et al. 2018, Fig. 4)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2 * len(METRICS), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(METRICS), squeeze=False)[0]
        ticks = list(range(len(self.steps)))
        for ax, metric in zip(axes, METRICS, strict=True):
            for method in self.scores:
                ax.plot(ticks, self.mean(method, metric), marker="o", label=method)
            ax.set_title(metric.replace("_", " "))
            ax.set_ylim(-0.2, 1.05)
            ax.set_xticks(ticks)
            ax.set_xticklabels(self.steps, rotation=70, fontsize=7)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel("randomised down to (cumulative)")
        axes[0].set_ylabel("similarity to the original map")
        axes[-1].legend(fontsize=8)
        return fig


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = float(p.std()) if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((noise * (std if std > 0 else 0.01)).to(p))


def cascading_randomization(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    methods: Sequence[str | Method],
    *,
    targets: torch.Tensor | None = None,
    checkpoints: int = 8,
    seed: int = 0,
    accel: Acceleration | None = None,
) -> SanityResult:
    """Cascading parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency
    Maps", §3.1), on a copy of the model: the user's model is not touched.

    Layers that own parameters are re-initialised one after another from the output down
    (weights drawn from a normal distribution with the original tensor's standard deviation,
    seeded); after every ``len(layers) / checkpoints`` layers each method's maps are recomputed
    for the *original* targets and compared with the maps of the intact model by
    :func:`map_similarity`. A method whose maps stay similar while the model becomes random does
    not explain the model.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        methods: method names or objects.
        targets: (B,) classes; default the intact model's top-1.
        checkpoints: number of randomisation depths evaluated.
        seed: seed of the random weights.
        accel: the accelerators of the methods' calls (default: the wrapper's
            :attr:`~convlens.models.ConvlensModel.accel`, else ``Acceleration()``; the copy
            being randomised keeps it).
    """
    checkpoints = positive_int(checkpoints, "checkpoints")
    seed = check_seed(seed, "seed")
    net, wrapper = unwrap(model)
    accel = metrics_accel(model, accel)
    method_objs = [get_method(m) if isinstance(m, str) else m for m in methods]
    if targets is None:
        with model_state(net, eval_mode=True, grads=False), torch.no_grad():
            targets = net(x).argmax(dim=1)
    targets = targets.view(-1)
    clone = copy.deepcopy(net)
    probe = (
        ConvlensModel(clone, wrapper.preprocess, wrapper.classes, wrapper.name, accel=accel)
        if wrapper is not None
        else clone
    )
    originals = {m.name: m(probe, x, targets, accel=accel).maps[:, 0] for m in method_objs}
    layers = list(reversed(parameter_layers(clone, x)))
    modules = dict(clone.named_modules())
    stops = sorted({round(i * len(layers) / checkpoints) for i in range(1, checkpoints + 1)})
    result = SanityResult(steps=[])
    for m in method_objs:
        result.scores[m.name] = {k: np.zeros((len(stops), x.shape[0])) for k in METRICS}
        result.ranges[m.name] = np.zeros((len(stops), x.shape[0]))
    gen = torch.Generator().manual_seed(seed)
    done = 0
    for s, stop in enumerate(stops):
        for name in layers[done:stop]:
            _randomize(modules[name], gen)
        done = stop
        result.steps.append(layers[stop - 1] or "<root>")
        for m in method_objs:
            with warnings.catch_warnings():
                # a randomised model giving blank maps is a finding measured here (ranges),
                # not a result shown to the user
                warnings.simplefilter("ignore", BlankMapWarning)
                maps = m(probe, x, targets, accel=accel).maps[:, 0]
            result.ranges[m.name][s] = relative_range(maps).numpy()
            for i in range(x.shape[0]):
                sim = map_similarity(originals[m.name][i], maps[i])
                for k in METRICS:
                    result.scores[m.name][k][s, i] = sim[k]
    return result
