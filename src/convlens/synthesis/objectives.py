"""What a synthesised image maximises, and how the network is run to compute it.

An :class:`Objective` maps the output of the model (``layer=None``: the logits) or of one layer
call to one score per image. :class:`LayerReader` runs the network with a forward hook on that
layer and, once the call index is known, stops the forward pass right after it
(:func:`convlens.hooks.capture_call`), so the rest of the network is never computed.

Scores (per image ``b`` with target ``t_b``):

- :class:`ClassScore`: ``S_c(I)``, the unnormalised class score (logit) of Simonyan et al. 2013,
  or ``log softmax`` with ``kind="log_prob"``;
- :class:`ChannelMean`: ``mean_{y,x} A[b, t_b, y, x]``, a channel of a layer (Olah et al. 2017);
- :class:`Neuron`: ``A[b, t_b, y, x]``, one unit at one position (default: the centre);
- :class:`DreamL2`: ``mean A[b]**2`` over the whole layer, or over channel ``t_b``
  (DeepDream, Mordvintsev et al. 2015, maximises the squared L2 norm of the activations).

Every objective accepts a batch made of ``K`` stacked copies of the ``N`` images (random
transform samples) and returns ``(K * N,)`` scores; the target of sample ``j`` is ``t[j % N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from convlens.architecture import LayerRef, parse_layer, resolve_call
from convlens.errors import InputError, LayerError, TargetError
from convlens.hooks.capture import capture_call, named_module
from convlens.models.classes import ClassList
from convlens.validate import int_text

__all__ = [
    "ChannelMean",
    "ClassScore",
    "DreamL2",
    "LayerReader",
    "Neuron",
    "Objective",
    "class_targets",
]


def _sample_targets(targets: torch.Tensor, batch: int, index: torch.Tensor | None) -> torch.Tensor:
    """The target of each of ``batch`` samples: ``targets[index]``, or ``targets[j % N]``."""
    n = targets.numel()
    if index is None:
        if batch % n:
            raise InputError(f"batch of {batch} is not a multiple of the {n} targets")
        return targets.repeat(batch // n)
    return targets[index.to(targets.device)]


@dataclass
class Objective:
    """Base class: a per-image score to maximise.

    Attributes:
        targets: (N,) class or channel index of each image.
        layer: the layer (and call) whose output is scored; ``None`` scores the model output.
    """

    targets: torch.Tensor
    layer: LayerRef | None = None
    name: str = field(default="objective", init=False)

    def __call__(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,) of a batch output (B, ...).

        Args:
            out: the layer (or model) output of B samples.
            index: (B,) which of the N images (targets) each sample belongs to; default
                ``j % N`` (B must then be a multiple of N).
        """
        raise NotImplementedError

    def _feature_map(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 4:
            raise LayerError(
                f"layer {self.layer} gives a {out.dim()}-D output {tuple(out.shape)}; channel "
                "objectives need a 4-D feature map (B, C, H, W)"
            )
        return out

    def _checked_targets(
        self, out: torch.Tensor, what: str, index: torch.Tensor | None
    ) -> torch.Tensor:
        t = _sample_targets(self.targets.to(out.device), out.shape[0], index)
        limit = out.shape[1]
        bad = [int(v) for v in self.targets if not 0 <= int(v) < limit]
        if bad:
            where = "the model" if self.layer is None else f"layer {self.layer}"
            raise InputError(
                f"{what} {bad[0]} is out of range: {where} has {limit} {what}s (0..{limit - 1})"
            )
        return t


@dataclass
class ClassScore(Objective):
    """``S_c(I)``: the logit of class ``c`` (``kind="logit"``, Simonyan et al. 2013 §2), or its
    log-probability ``S_c - log sum_k exp S_k`` (``kind="log_prob"``), which also pushes the
    other classes down."""

    kind: Literal["logit", "log_prob"] = "logit"

    def __post_init__(self) -> None:
        if self.kind not in ("logit", "log_prob"):
            raise InputError(f"score must be 'logit' or 'log_prob', not {self.kind!r}")
        self.name = self.kind

    def __call__(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if out.dim() != 2:
            raise InputError(
                f"the model output must be (B, classes) logits, got {tuple(out.shape)}"
            )
        t = self._checked_targets(out, "class", index)
        scores = out.float() if self.kind == "logit" else torch.log_softmax(out.float(), dim=1)
        return scores.gather(1, t[:, None])[:, 0]


@dataclass
class ChannelMean(Objective):
    """``mean_{y,x} A_c(y, x)``: the spatial mean of channel ``c`` of a layer."""

    def __post_init__(self) -> None:
        self.name = "channel"

    def __call__(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        a = self._feature_map(out)
        t = self._checked_targets(a, "channel", index)
        return a[torch.arange(a.shape[0], device=a.device), t].float().mean(dim=(-2, -1))


@dataclass
class Neuron(Objective):
    """``A_c(y, x)``: one unit of channel ``c`` at position (y, x) of the feature map (the
    centre when ``position`` is ``None``)."""

    position: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.name = "neuron"

    def __call__(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        a = self._feature_map(out)
        t = self._checked_targets(a, "channel", index)
        h, w = a.shape[-2:]
        y, x = (h // 2, w // 2) if self.position is None else self.position
        if not (0 <= y < h and 0 <= x < w):
            raise InputError(f"neuron position ({y}, {x}) is outside the {h}x{w} feature map")
        return a[torch.arange(a.shape[0], device=a.device), t, y, x].float()


@dataclass
class DreamL2(Objective):
    """``mean A**2``: the mean squared activation of a whole layer (``channel=False``) or of
    channel ``c`` (DeepDream's L2 objective, Mordvintsev et al. 2015)."""

    channel: bool = False

    def __post_init__(self) -> None:
        self.name = "dream_l2"

    def __call__(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if not self.channel:
            return out.float().pow(2).flatten(1).mean(dim=1)
        a = self._feature_map(out)
        t = self._checked_targets(a, "channel", index)
        return a[torch.arange(a.shape[0], device=a.device), t].float().pow(2).mean(dim=(-2, -1))


class LayerReader:
    """Run a network and return its output or the output of one call of one layer.

    Call :meth:`resolve` once (a forward pass of one image without gradients) to find the
    absolute call index of ``layer@call``; later calls then stop the forward pass right after
    that call (``stop_early``). The hook exists only during each call.

    Args:
        net: the network (the caller holds it in :func:`convlens.hooks.model_state`).
        layer: ``"name"``, ``"name@call"`` or a :class:`LayerRef`; ``None`` for the output.
        stop_early: stop the forward pass after the layer once the call index is known.

    Raises:
        LayerError: no such layer (close matches listed).
    """

    def __init__(
        self, net: nn.Module, layer: str | LayerRef | None, *, stop_early: bool = True
    ) -> None:
        self.net = net
        self.ref = None if layer is None else parse_layer(layer)
        self.module = None if self.ref is None else named_module(net, self.ref.name)
        self.stop_early = stop_early
        self.call: int | None = None  # absolute call index once resolved

    def resolve(self, x: torch.Tensor) -> None:
        """Count the layer's calls on one input and fix the absolute call index.

        Raises:
            LayerError: the layer is not used, or has no such call.
        """
        if self.ref is not None:
            self.call = resolve_call(self.net, self.ref, x).call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model output, or the chosen layer call's output (part of the autograd graph)."""
        if self.module is None or self.ref is None:
            out = self.net(x)
            if not isinstance(out, torch.Tensor):
                raise InputError(f"the model must return a tensor, not {type(out).__name__}")
            return out
        if self.call is None:
            self.call = resolve_call(self.net, self.ref, x).call
        with capture_call(self.module, self.ref.name, self.call, stop=self.stop_early) as capture:
            self.net(x)
        return capture.output()


def class_targets(classes: Sequence[int | str], names: ClassList | None) -> list[int]:
    """Resolve class indices, names or synsets with the model's class list.

    Without a class list only indices are accepted (their range is checked by the objective,
    which knows the number of outputs).

    Raises:
        TargetError: no classes; unknown name (close matches listed); index out of range.
    """
    if not classes:
        raise TargetError("give at least one class")
    if names is not None:
        return [names.index(c) for c in classes]
    out: list[int] = []
    for c in classes:
        number = None if isinstance(c, bool) else int_text(str(c))
        if number is None:
            raise TargetError(
                f"class {c!r} is a name, but the model has no class list; give an index"
            )
        out.append(number)
    return out
