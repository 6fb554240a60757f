"""Step 2 of the feature browser: each top activation projected alone into pixel space and
cropped around its unit, with the image patch under it (:func:`feature_examples`)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from convlens.architecture import LayerRef
from convlens.errors import ImageError, InputError
from convlens.features.receptive_field import ReceptiveField, receptive_field
from convlens.features.results import (
    ChannelExamples,
    FeatureExample,
    FeatureScan,
    LayerScan,
    TopActivation,
)
from convlens.features.scan import _param
from convlens.images import load_image
from convlens.methods.rules import project_units
from convlens.models.base import ConvlensModel
from convlens.models.preprocess import Preprocess
from convlens.tokens import TokenLayout

__all__ = ["TOKEN_RULE", "Crop", "feature_examples", "layer_geometry", "token_cell"]

logger = logging.getLogger(__name__)


class _ImageCache:
    """A few preprocessed images ([0, 1] pixels), least recently used dropped first."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, capacity: int = 64) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.capacity = capacity
        self.items: OrderedDict[int, torch.Tensor | None] = OrderedDict()

    def get(self, image_id: int) -> torch.Tensor | None:
        if image_id in self.items:
            self.items.move_to_end(image_id)
            return self.items[image_id]
        try:
            unit: torch.Tensor | None = self.preprocess.to_unit(load_image(self.paths[image_id]))
        except ImageError as exc:  # changed or removed since the scan
            logger.warning("cannot re-read a top image: %s", exc)
            unit = None
        self.items[image_id] = unit
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return unit


TOKEN_RULE = "gradient"
"""The projection rule on token layers, whatever rule is asked for. The deconvnet and guided
rules change only the backward pass of ReLU-like units and max pooling (Zeiler & Fergus 2014;
Springenberg et al. 2015); through attention (softmax, products of two activations), GELU and
LayerNorm they define no projection of their own, so a token's projection is the plain gradient
of the unit with respect to the input pixels, and the page says so."""


def token_cell(info: LayerScan, input_size: tuple[int, int]) -> ReceptiveField:
    """The grid cell of each token of a token layer, as boxes in the model input.

    Token ``(y, x)`` of an ``h x w`` grid on an ``H x W`` input sits on rows
    ``y * (H // h)`` to ``(y + 1) * (H // h)`` and likewise for columns: for a plain ViT or
    DeiT, its ``patch_size x patch_size`` patch; for a Swin stage after ``k`` patch mergings,
    the ``2^k`` patches merged into it. This is *not* a receptive field: attention lets every
    token depend on every pixel, so a ViT token's receptive field is the whole image (and a
    Swin token's, made of shifted windows, reaches far beyond its cell after a few blocks).
    The cell is the token's own patch, the image content the token started from and that its
    position stands for. It is returned as a :class:`ReceptiveField` so that patches are cut
    like those of convolutional units (``size == stride``, ``offset == (0, 0)``).
    """
    _, h, w = info.shape
    big_h, big_w = input_size
    sy, sx = max(1, big_h // h), max(1, big_w // w)
    return ReceptiveField(
        layer=str(info.source),
        size=(sy, sx),
        stride=(sy, sx),
        offset=(0, 0),
        input_size=(big_h, big_w),
        output_size=(h, w),
    )


def layer_geometry(
    model: ConvlensModel,
    info: LayerScan,
    input_size: tuple[int, int],
    receptive: ReceptiveField | None = None,
) -> ReceptiveField:
    """Where a scanned layer's units are cut from the input: the measured receptive field of a
    feature map (:func:`receptive_field`, or ``receptive`` when given), the grid cell of a token
    layer's tokens (:func:`token_cell`)."""
    if info.layout is not None:
        return token_cell(info, input_size)
    return receptive or receptive_field(model.net, info.source, input_size)


Crop = Literal["effective", "field"]
"""How patches are cut: ``"field"``: the unit's whole receptive field; ``"effective"``: a square
around its centre holding most of the projection (see :func:`feature_examples`)."""


def feature_examples(
    scan: FeatureScan,
    model: ConvlensModel,
    layer: str,
    *,
    channels: Sequence[int] | None = None,
    rule: str = "deconvnet",
    crop: Crop = "effective",
    mass: float = 0.9,
    batch_size: int = 32,
    receptive: ReceptiveField | None = None,
) -> Iterator[ChannelExamples]:
    """Project each top activation of a layer's channels into pixel space and crop it.

    For every kept activation ``(image, c, y, x)`` the signal that is 1 at that unit and 0
    elsewhere is sent back to the pixels with :func:`convlens.methods.rules.project_units`
    (Zeiler & Fergus 2014, §2: "to examine a given convnet activation, we set all other
    activations in the layer to zero and pass the feature maps as input to the attached deconvnet
    layer"). Projection and image are then cropped around the unit:

    - ``crop="field"``: to the unit's receptive field (:meth:`ReceptiveField.box`, clipped to
      the image). Deep layers have receptive fields as large as the image (211 px for the middle
      of EfficientNet-Lite0 at 224 px), so patches become whole images.
    - ``crop="effective"`` (default): to a square centred on the receptive field, of the side
      that holds ``mass`` of the projection's L1 norm (the median over the first
      ``batch_size`` examples of the layer, so all patches of a layer share one scale, as in
      Zeiler & Fergus' Fig. 2), at least 32 px and never larger than the receptive field;
      clipped to the image. This is the part of the receptive field that actually drives the
      unit (its "effective receptive field", Luo et al. 2016).

    On a token layer of a vision transformer (:attr:`LayerScan.layout`), the patch under a
    token is its grid cell (:func:`token_cell`: for a ViT, its ``patch_size x patch_size``
    patch), whatever ``crop`` says; the projection is the plain gradient of the unit with
    respect to the input (:data:`TOKEN_RULE`, whatever ``rule`` says), cropped to that cell, and
    :attr:`FeatureExample.inside` says how much of the gradient's L1 norm lies in the cell: a
    ViT token's receptive field is the whole image, so the cell shows where the token sits,
    not all it depends on.

    Work is done a few channels at a time (about ``batch_size`` projections); results are
    yielded one channel at a time, so memory does not grow with the number of channels.

    Args:
        scan: the result of :func:`scan_features`.
        model: the same model.
        layer: a layer of the scan.
        channels: channels to produce; default the layer's chosen channels.
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al. 2015) or
            ``"gradient"``.
        crop: ``"effective"`` or ``"field"`` (see above).
        mass: fraction of the projection's L1 norm inside an effective crop, in (0, 1].
        batch_size: projections per backward pass.
        receptive: the receptive field of ``scan.layers[layer].source`` for
            ``scan.input_size``, if already computed.

    Yields:
        One :class:`ChannelExamples` per channel, in order.

    Raises:
        LayerError: the layer was not scanned.
        InputError: a channel is out of range, or ``crop``/``mass`` invalid.
    """
    cache = _ImageCache(scan.paths, model.preprocess)
    return _examples(scan, model, layer, channels, rule, crop, mass, batch_size, receptive, cache)


def _examples(
    scan: FeatureScan,
    model: ConvlensModel,
    layer: str,
    channels: Sequence[int] | None,
    rule: str,
    crop: Crop,
    mass: float,
    batch_size: int,
    receptive: ReceptiveField | None,
    cache: _ImageCache,
) -> Iterator[ChannelExamples]:
    if crop not in ("effective", "field"):
        raise InputError(f"crop must be 'effective' or 'field', got {crop!r}")
    if not 0.0 < mass <= 1.0:
        raise InputError(f"mass must be in (0, 1], got {mass}")
    info = scan._layer(layer)
    wanted = list(info.channels if channels is None else channels)
    tops = {c: scan.top(layer, c) for c in wanted}  # validates the channels
    rf = layer_geometry(model, info, scan.input_size, receptive)
    tokens = info.layout is not None
    if tokens:
        rule, crop = TOKEN_RULE, "field"
    step = max(1, batch_size)
    window: tuple[int, int] | None = None if crop == "effective" else rf.size
    group: list[int] = []
    for n, c in enumerate(wanted):
        group.append(c)
        if sum(len(tops[g]) for g in group) < step and n < len(wanted) - 1:
            continue
        owners, images, projections = _project(
            model, info.source, group, tops, cache, rule, step, info.layout
        )
        if window is None and owners:
            window = _effective_window(owners, projections, rf, mass)
            logger.debug("layer %s: effective patch %s of receptive field %s", layer, window, rf)
        per_channel: dict[int, list[FeatureExample]] = {g: [] for g in group}
        for k, (c_, act, slot) in enumerate(owners):
            box = _window_box(rf, act.y, act.x, window or rf.size)
            top, left, bottom, right = box
            projection = projections[k, :, top:bottom, left:right]
            inside = None
            if tokens:
                total = float(projections[k].abs().sum())
                inside = float(projection.abs().sum()) / total if total > 0 else 0.0
            per_channel[c_].append(
                FeatureExample(
                    activation=act,
                    box=box,
                    patch=images[slot][:, top:bottom, left:right].clone(),
                    projection=projection.clone(),
                    inside=inside,
                )
            )
        for g in group:
            yield ChannelExamples(
                layer=layer, channel=g, examples=per_channel[g], window=window or rf.size
            )
        group = []


def _project(
    model: ConvlensModel,
    source: LayerRef,
    group: Sequence[int],
    tops: Mapping[int, list[TopActivation]],
    cache: _ImageCache,
    rule: str,
    batch_size: int,
    layout: TokenLayout | None = None,
) -> tuple[list[tuple[int, TopActivation, int]], list[torch.Tensor], torch.Tensor]:
    """Projections of the top activations of a few channels: ``(owners, images, projections)``
    with ``owners[k] = (channel, activation, index in images)`` for projection ``k``; images in
    [0, 1] and projections (float32) on the CPU. ``layout``: that of a token layer."""
    device, dtype = _param(model.net)
    slots: dict[int, int] = {}
    images: list[torch.Tensor] = []
    units: list[tuple[int, int, int, int]] = []
    owners: list[tuple[int, TopActivation, int]] = []
    for c in group:
        for act in tops[c]:
            unit = cache.get(act.image_id)
            if unit is None:
                continue
            if act.image_id not in slots:
                slots[act.image_id] = len(images)
                images.append(unit)
            slot = slots[act.image_id]
            units.append((slot, c, act.y, act.x))
            owners.append((c, act, slot))
    if not units:
        return owners, images, torch.empty(0)
    x = model.preprocess.normalize(torch.stack(images)).to(device=device, dtype=dtype)
    index = torch.tensor(units, dtype=torch.long, device=device)
    out = project_units(
        model.net, x, source, index, rule=rule, batch_size=batch_size, layout=layout
    )
    return owners, images, out.detach().float().cpu()


def _centre(rf: ReceptiveField, y: int, x: int) -> tuple[int, int]:
    """The centre of unit ``(y, x)``'s receptive field, inside the image. A ``clipped`` field
    (larger than the largest input measured, e.g. after attention or global pooling: stride 0,
    a box of 1024 px) has no reliable geometry beyond the image, so the centre of its part in
    the image is used; a window around the unclipped centre could miss the image entirely."""
    top, left, bottom, right = rf.box(y, x, clip=rf.clipped)
    h, w = rf.input_size
    cy, cx = (top + bottom - 1) // 2, (left + right - 1) // 2
    return min(max(cy, 0), h - 1), min(max(cx, 0), w - 1)


def _window_box(
    rf: ReceptiveField, y: int, x: int, window: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A ``window``-sized box centred on unit ``(y, x)``'s receptive field, clipped to the
    image (the whole clipped receptive field when ``window`` is its size)."""
    if window == rf.size:
        return rf.box(y, x)
    cy, cx = _centre(rf, y, x)
    h, w = rf.input_size
    top, left = cy - (window[0] - 1) // 2, cx - (window[1] - 1) // 2
    return max(top, 0), max(left, 0), min(top + window[0], h), min(left + window[1], w)


def _mass_side(magnitude: torch.Tensor, cy: int, cx: int, mass: float) -> int:
    """Side of the smallest square centred at ``(cy, cx)`` holding ``mass`` of the map's sum."""
    h, w = magnitude.shape
    integral = torch.zeros(h + 1, w + 1, dtype=torch.float64)
    integral[1:, 1:] = magnitude.double().cumsum(0).cumsum(1)
    total = float(integral[-1, -1])
    if total <= 0.0:
        return 1
    r = torch.arange(max(h, w))
    cy, cx = min(max(cy, 0), h - 1), min(max(cx, 0), w - 1)
    t, b = (cy - r).clamp(min=0), (cy + r + 1).clamp(max=h)
    lf, rt = (cx - r).clamp(min=0), (cx + r + 1).clamp(max=w)
    inside = integral[b, rt] - integral[t, rt] - integral[b, lf] + integral[t, lf]
    enough = (inside >= mass * total - 1e-12 * total).nonzero()
    radius = int(enough[0]) if enough.numel() else max(h, w)
    return 2 * radius + 1


_MIN_WINDOW = 32
"""Effective patches are never smaller than this (or than the receptive field, if smaller):
tiny crops of early layers lose the context that shows what the unit sees."""


def _effective_window(
    owners: Sequence[tuple[int, TopActivation, int]],
    projections: torch.Tensor,
    rf: ReceptiveField,
    mass: float,
) -> tuple[int, int]:
    """The effective patch size of a layer: the median :func:`_mass_side` of some examples,
    at least :data:`_MIN_WINDOW` pixels and at most the receptive field."""
    sides = []
    for k, (_, act, _) in enumerate(owners):
        cy, cx = _centre(rf, act.y, act.x)
        sides.append(_mass_side(projections[k].abs().sum(dim=0), cy, cx, mass))
    side = max(int(torch.tensor(sides, dtype=torch.float64).median()), _MIN_WINDOW)
    return min(side, rf.size[0]), min(side, rf.size[1])
