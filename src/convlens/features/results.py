"""What a feature scan finds: the top activations of every channel, and their projections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from convlens.architecture import LayerRef
from convlens.errors import InputError, LayerError
from convlens.features.topk import RunningTopK
from convlens.tokens import TokenLayout

__all__ = [
    "ChannelExamples",
    "ChannelSpec",
    "FeatureExample",
    "FeatureScan",
    "LayerScan",
    "Progress",
    "TopActivation",
]


ChannelSpec = Sequence[int] | Literal["auto"]
"""Channels to show: explicit indices, or ``"auto"`` for the most active ones."""

Progress = Callable[[int, int], None]
"""Progress callback: called with ``(done, total)``."""


@dataclass
class LayerScan:
    """The running top-k of one layer after a scan.

    Attributes:
        layer: the layer as requested (``"name"`` or ``"name@call"``).
        ref: the parsed layer reference.
        shape: ``(C, h, w)`` of the layer's output for one input image (of a token layer:
            of its patch tokens on their grid).
        top: per channel, the ``k`` strongest activations (one per image), on the CPU; covers
            all ``C`` channels.
        channels: the channels to show, in display order (for ``"auto"``: most active first).
        source: the module output actually ranked and projected, with an absolute call index:
            the layer itself, or, for a saturating activation module (``nn.ReLU6``), the module
            that produced its input (see ``clip``).
        clip: for a saturating activation, its upper bound ``u``: its output
            ``clamp(a, 0, u)`` ties every unit in saturation, so units are ranked by their value
            ``a`` before clipping (the output of ``source``); ``None`` otherwise.
        layout: for a token layer of a vision transformer (``(B, N, C)`` tokens, or Swin's
            channels-last ``(B, H, W, C)``), how its output maps to the ``(C, h, w)`` map that
            is ranked (:class:`convlens.tokens.TokenLayout`: prefix tokens dropped, patch
            tokens on their grid); ``None`` for a ``(B, C, H, W)`` feature map. A unit
            ``(y, x)`` of a token layer is the token of grid cell ``(y, x)``.
    """

    layer: str
    ref: LayerRef
    shape: tuple[int, int, int]
    top: RunningTopK
    channels: list[int]
    source: LayerRef
    clip: float | None = None
    layout: TokenLayout | None = None


@dataclass(frozen=True)
class TopActivation:
    """One of a channel's strongest activations.

    Attributes:
        rank: 0 for the strongest.
        value: the activation.
        image_id: index of the image in :attr:`FeatureScan.paths`.
        path: the image file.
        y: row of the unit in the layer's output.
        x: column of the unit.
    """

    rank: int
    value: float
    image_id: int
    path: Path
    y: int
    x: int


@dataclass
class FeatureScan:
    """What :func:`scan_features` found.

    Attributes:
        paths: the image files scanned; image ids index this list.
        layers: layer spec -> :class:`LayerScan`, in the requested order.
        k: activations kept per channel.
        input_size: ``(H, W)`` of the model inputs (the preprocessing crop).
        scanned: number of images read and passed through the model.
        skipped: ``(path, reason)`` of each image that could not be read.
        seconds: wall time of the scan.
        model_name: name of the model scanned with.
    """

    paths: list[Path]
    layers: dict[str, LayerScan]
    k: int
    input_size: tuple[int, int]
    scanned: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    model_name: str = "model"

    def top(self, layer: str, channel: int) -> list[TopActivation]:
        """The strongest activations of one channel, strongest first (at most ``k``).

        Raises:
            LayerError: the layer was not scanned.
            InputError: the channel is out of range.
        """
        scan = self._layer(layer)
        channels = scan.shape[0]
        if not 0 <= channel < channels:
            raise InputError(
                f"channel {channel} is out of range for layer {layer!r}, which has "
                f"{channels} channels (0-{channels - 1})"
            )
        t = scan.top
        ok = t.valid()[channel]
        out = []
        for r in range(t.k):
            if not bool(ok[r]):
                continue
            i = int(t.image_ids[channel, r])
            out.append(
                TopActivation(
                    rank=len(out),
                    value=float(t.values[channel, r]),
                    image_id=i,
                    path=self.paths[i],
                    y=int(t.ys[channel, r]),
                    x=int(t.xs[channel, r]),
                )
            )
        return out

    def _layer(self, layer: str) -> LayerScan:
        if layer not in self.layers:
            raise LayerError(
                f"layer {layer!r} was not scanned; scanned layers: {', '.join(self.layers)}"
            )
        return self.layers[layer]


@dataclass(frozen=True)
class FeatureExample:
    """One top activation, with its image patch and its pixel-space projection.

    Attributes:
        activation: which activation (value, image, position).
        box: ``(top, left, bottom, right)`` of the unit's receptive field in the model input,
            clipped to the image, bottom/right exclusive.
        patch: (3, h, w) image crop under ``box``, RGB in [0, 1].
        projection: (3, h, w) deconvnet (or guided) projection of the single activation, cropped
            to ``box``; signed, in model-input units (display with
            :func:`convlens.render.rgb_attribution`). On a token layer: the gradient of the
            unit with respect to the input, cropped to the token's cell.
        inside: on a token layer, the share of the (uncropped) projection's L1 norm that lies
            inside ``box``: how much of what the token depends on the crop shows (a token's
            receptive field reaches beyond its cell); ``None`` on a feature map.
    """

    activation: TopActivation
    box: tuple[int, int, int, int]
    patch: torch.Tensor
    projection: torch.Tensor
    inside: float | None = None


@dataclass(frozen=True)
class ChannelExamples:
    """A channel's top activations with patches and projections, strongest first.

    ``window`` is the ``(height, width)`` of the crops before clipping to the image: the
    receptive field's size, or the layer's effective patch size; on a token layer, the size of
    a token's grid cell.
    """

    layer: str
    channel: int
    examples: list[FeatureExample]
    window: tuple[int, int]
