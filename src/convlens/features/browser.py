"""The Zeiler & Fergus feature browser: what each channel of a layer responds to in a dataset.

Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional Networks", §2 and Fig. 2)
show, for a feature map, its 9 strongest activations over a dataset, each projected back into
pixel space with the deconvnet, next to the image patches under those activations. Two steps:

1. :func:`scan_features` streams once over an image folder (a ``DataLoader``, batched, with
   memory independent of the folder's size) and keeps, for every channel of every requested
   layer, the ``k`` images where it fires most (:class:`~convlens.features.topk.RunningTopK`).
   All layers are captured by forward hooks in one forward pass per batch.
2. :func:`feature_examples` / :func:`render_features` project each of those activations into
   pixel space alone (:func:`convlens.methods.rules.project_units`, deconvnet rule by default),
   crop projection and image around the unit, within its receptive field
   (:func:`~convlens.features.receptive_field.receptive_field`), and write one grid PNG per layer
   and an ``index.html`` that works offline.

Models without max pooling (EfficientNet, MobileNet) make the deconvnet ignore the image: its
only image-dependent step is unpooling with the max-pool switches. The page says so when it
happens; ``rule="guided"`` (Springenberg et al. 2015) then shows image-specific projections.

Example:
    >>> import convlens
    >>> from convlens.features import scan_features, render_features
    >>> from convlens.images import list_images
    >>> model = convlens.load_model("lite0")
    >>> files = list_images("photos/")                                     # doctest: +SKIP
    >>> scan = scan_features(model, files, ["_blocks.1", "_swish"])         # doctest: +SKIP
    >>> render_features(scan, model, "features-out")                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from convlens.architecture import LayerRef, parse_layer
from convlens.atomic import atomic_write_text, save_image
from convlens.errors import ImageError, InputError, LayerError
from convlens.features.receptive_field import ReceptiveField, receptive_field
from convlens.features.topk import RunningTopK
from convlens.hooks import hooks, model_state, named_module
from convlens.images import load_image
from convlens.methods.rules import project_units
from convlens.models.base import ConvlensModel
from convlens.models.preprocess import Preprocess
from convlens.outputs import lock_folder
from convlens.templating import render_page
from convlens.validate import non_negative_int, positive_int

__all__ = [
    "ChannelExamples",
    "ChannelSpec",
    "Crop",
    "FeatureExample",
    "FeatureScan",
    "LayerScan",
    "Progress",
    "TopActivation",
    "feature_examples",
    "parse_channels",
    "render_features",
    "scan_features",
]

logger = logging.getLogger(__name__)

ChannelSpec = Sequence[int] | Literal["auto"]
"""Channels to show: explicit indices, or ``"auto"`` for the most active ones."""

Progress = Callable[[int, int], None]
"""Progress callback: called with ``(done, total)``."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class LayerScan:
    """The running top-k of one layer after a scan.

    Attributes:
        layer: the layer as requested (``"name"`` or ``"name@call"``).
        ref: the parsed layer reference.
        shape: ``(C, h, w)`` of the layer's output for one input image.
        top: per channel, the ``k`` strongest activations (one per image), on the CPU; covers
            all ``C`` channels.
        channels: the channels to show, in display order (for ``"auto"``: most active first).
        source: the module output actually ranked and projected, with an absolute call index:
            the layer itself, or, for a saturating activation module (``nn.ReLU6``), the module
            that produced its input (see ``clip``).
        clip: for a saturating activation, its upper bound ``u``: its output
            ``clamp(a, 0, u)`` ties every unit in saturation, so units are ranked by their value
            ``a`` before clipping (the output of ``source``); ``None`` otherwise.
    """

    layer: str
    ref: LayerRef
    shape: tuple[int, int, int]
    top: RunningTopK
    channels: list[int]
    source: LayerRef
    clip: float | None = None


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
            :func:`convlens.render.rgb_attribution`).
    """

    activation: TopActivation
    box: tuple[int, int, int, int]
    patch: torch.Tensor
    projection: torch.Tensor


@dataclass(frozen=True)
class ChannelExamples:
    """A channel's top activations with patches and projections, strongest first.

    ``window`` is the ``(height, width)`` of the crops before clipping to the image: the
    receptive field's size, or the layer's effective patch size.
    """

    layer: str
    channel: int
    examples: list[FeatureExample]
    window: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------------


def parse_channels(text: str) -> ChannelSpec:
    """Parse a channel selection: ``"auto"``, ``"0-15"``, ``"0,3,7"`` or mixed ``"0-3,8"``.

    Returns:
        ``"auto"`` or the list of channel indices (duplicates removed, order kept).

    Raises:
        InputError: the text is not such a selection.
    """
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise InputError(
                f"cannot read channel selection {text!r}: use 'auto', a range like '0-15', "
                "a list like '0,3,7', or both ('0-3,8')"
            )
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise InputError(f"channel range {part!r} is empty: write the smaller index first")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def _explicit_channels(
    spec: ChannelSpec | Mapping[str, ChannelSpec], layer: str
) -> ChannelSpec | None:
    """The spec for one layer (``None``: not given for it, i.e. ``"auto"``)."""
    if isinstance(spec, Mapping):
        return spec.get(layer)
    return spec


def _check_channels(spec: ChannelSpec, layer: str, channels: int) -> list[int] | None:
    if isinstance(spec, str):
        if spec != "auto":
            raise InputError(f"channels must be 'auto' or a list of indices, got {spec!r}")
        return None
    chosen = [int(c) for c in spec]
    if not chosen:
        raise InputError(f"no channels chosen for layer {layer!r}")
    bad = [c for c in chosen if not 0 <= c < channels]
    if bad:
        raise InputError(
            f"channel {bad[0]} is out of range for layer {layer!r}, which has {channels} "
            f"channels (0-{channels - 1})"
        )
    return list(dict.fromkeys(chosen))


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


class _Images(Dataset):
    """Image files as model inputs; unreadable files become ``(index, None, reason)``."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(load_image(self.paths[i])), None
        except ImageError as exc:
            return i, None, str(exc)


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, e or "unreadable") for i, x, e in items if x is None]
    ids = torch.tensor([i for i, _ in good], dtype=torch.long)
    x = torch.stack([x for _, x in good]) if good else None
    return ids, x, bad


class _Stop(BaseException):
    """Ends a forward pass once every requested layer has been captured."""


def _param(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in net.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class _Probed:
    """What one forward pass of a blank image says about a requested layer."""

    shape: tuple[int, int, int, int]
    source: LayerRef  # what is captured and projected; the call index is absolute
    clip: float | None  # upper bound of a saturating activation whose input is used instead


def _saturating(module: nn.Module) -> float | None:
    """The upper bound of a ReLU6-like module (``clamp(x, 0, u)``), else ``None``."""
    if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
        return float(module.max_val)
    return None


def _probe(
    net: nn.Module, refs: Mapping[str, LayerRef], size: tuple[int, int]
) -> dict[str, _Probed]:
    """One forward pass of a blank image: each requested layer's shape and source.

    A layer that is a saturating activation module (``nn.ReLU6``, ``nn.Hardtanh(0, u)``) caps its
    strongest activations at the same value ``u``, so ranking them would be a tie among every
    unit in saturation, and guided backpropagation would zero them. When its input is the output
    of a module (e.g. a BatchNorm), that module's output is ranked and projected instead: the
    same units before clipping.
    """
    device, dtype = _param(net)
    requested = {r.name for r in refs.values()}
    modules = [(n, m) for n, m in net.named_modules() if n]
    calls: dict[str, int] = {}
    produced: list[tuple[str, int, Any]] = []  # (module name, call index, output)
    shapes: dict[tuple[str, int], Any] = {}
    inputs: dict[tuple[str, int], Any] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, args: Any, out: Any) -> None:
            index = calls.get(name, 0)
            calls[name] = index + 1
            if name in requested:
                shapes[name, index] = tuple(out.shape) if isinstance(out, torch.Tensor) else out
                inputs[name, index] = (args[0] if args else None, len(produced))
            produced.append((name, index, out))

        return record

    regs = [(lambda n=n, m=m: m.register_forward_hook(recorder(n))) for n, m in modules]
    with hooks(regs):
        net(torch.zeros(1, 3, *size, device=device, dtype=dtype))
    found: dict[str, _Probed] = {}
    for spec, r in refs.items():
        count = calls.get(r.name, 0)
        if count == 0:
            raise LayerError(f"layer {r.name!r} is not used in the model's forward pass")
        index = r.call if r.call >= 0 else count + r.call
        if not 0 <= index < count:
            raise LayerError(
                f"layer {r.name!r} is called {count} time(s) per forward pass; there is no "
                f"call {r.call} (use 'name@0' .. 'name@{count - 1}', or 'name' for the last)"
            )
        shape = shapes[r.name, index]
        if not isinstance(shape, tuple) or len(shape) != 4:
            kind = f"shape {shape}" if isinstance(shape, tuple) else type(shape).__name__
            raise LayerError(
                f"layer {str(r)!r} outputs {kind}; the feature browser needs a (B, C, H, W) "
                "feature map: choose a convolutional layer (`convlens layers MODEL`)"
            )
        source, clip = LayerRef(r.name, index), _saturating(named_module(net, r.name))
        if clip is not None:
            inp, position = inputs[r.name, index]
            producer = next(
                (LayerRef(n, i) for n, i, out in reversed(produced[:position]) if out is inp),
                None,
            )
            if producer is None:
                clip = None
            else:
                source = producer
        found[spec] = _Probed(shape=shape, source=source, clip=clip)
    return found


def _progress_callback(progress: bool | Progress, what: str) -> tuple[Progress | None, Any]:
    """A ``(done, total)`` callback and the object to close afterwards (a tqdm bar)."""
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(desc=what, unit="img" if what == "scanning" else "ch", leave=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar


def scan_features(
    model: ConvlensModel,
    paths: Sequence[str | Path],
    layers: Sequence[str],
    channels: ChannelSpec | Mapping[str, ChannelSpec] = "auto",
    *,
    top: int = 9,
    num_channels: int = 16,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool | Progress = True,
) -> FeatureScan:
    """Find, for each channel of each layer, the images where it fires most.

    One streaming pass over ``paths``: a ``DataLoader`` reads each file with
    :func:`convlens.images.load_image` and ``model.preprocess``; forward hooks on every requested
    layer (registered for this call only) capture all of them in one forward pass per batch,
    under ``torch.no_grad()`` and in eval mode (the model is left as found). Each feature map is
    reduced right away to its per-channel maximum and merged into a
    :class:`~convlens.features.topk.RunningTopK`, so memory does not grow with the number of
    images. As in Zeiler & Fergus (2014), §2, a channel's top ``k`` are ``k`` different images.

    Layers and channels are checked with one forward pass of a blank image before any file is
    read, so mistakes fail fast. Unreadable images are skipped and listed in
    :attr:`FeatureScan.skipped`. A layer that is a saturating activation module (``nn.ReLU6``,
    as EfficientNet-Lite's ``_swish``) is ranked by its input, the value before clipping (see
    :attr:`LayerScan.clip`): after the clip every unit in saturation ties at the bound.

    Args:
        model: the model with its preprocessing.
        paths: image files (see :func:`convlens.images.list_images` to expand folders).
        layers: layer names, ``name@call`` for a module called several times per forward pass
            (``convlens layers MODEL`` lists them).
        channels: channels to show, for every layer or per layer (a mapping; layers left out
            use ``"auto"``): explicit indices, or ``"auto"`` for the ``num_channels`` channels
            with the highest mean of their top-``k`` activations. All channels are scanned
            either way.
        top: activations (images) kept per channel, ``k``.
        num_channels: channels picked by ``"auto"``.
        batch_size: images per forward pass.
        workers: ``DataLoader`` worker processes reading images (0: read in this process).
        progress: show a progress bar (tqdm on stderr), or a ``(done, total)`` callback.

    Returns:
        The :class:`FeatureScan`.

    Raises:
        LayerError: a layer does not exist (close matches are suggested), is not reached in
            the forward pass, or has no (B, C, H, W) output.
        InputError: no layers, a channel index out of range, channels given for a layer not
            scanned, or ``top``/``batch_size``/``num_channels`` not positive.
    """
    if not layers:
        raise InputError("give at least one layer to scan (`convlens layers MODEL` lists them)")
    for name, value in (("top", top), ("batch_size", batch_size), ("num_channels", num_channels)):
        positive_int(value, name)
    non_negative_int(workers, "workers")
    specs = list(dict.fromkeys(str(s) for s in layers))
    refs = {s: parse_layer(s) for s in specs}
    net = model.net
    for ref in refs.values():
        named_module(net, ref.name)  # LayerError with close matches
    if isinstance(channels, Mapping):
        unknown = [name for name in channels if name not in refs]
        if unknown:
            raise InputError(
                f"channels are given for {unknown[0]!r}, which is not among the layers to scan "
                f"({', '.join(specs)})"
            )
    files = [Path(p) for p in paths]
    crop = model.preprocess.crop
    size = (crop, crop)
    device, dtype = _param(net)
    start = time.perf_counter()

    with model_state(net, eval_mode=True, grads=False), torch.no_grad():
        probed = _probe(net, refs, size)
        chosen: dict[str, list[int] | None] = {}
        for s in specs:
            spec = _explicit_channels(channels, s)
            chosen[s] = None if spec is None else _check_channels(spec, s, probed[s].shape[1])
        trackers = {s: RunningTopK(probed[s].shape[1], top, device=device) for s in specs}
        # (module name, absolute call index) -> layer specs captured there
        wanted: dict[tuple[str, int], list[str]] = {}
        for s in specs:
            source = probed[s].source
            wanted.setdefault((source.name, source.call), []).append(s)
        state: dict[str, Any] = {"ids": None, "calls": {}, "done": 0}

        def capture(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                index = state["calls"].get(name, 0)
                state["calls"][name] = index + 1
                for s in wanted.get((name, index), ()):
                    trackers[s].update(out, state["ids"])
                    state["done"] += 1
                if state["done"] == len(specs):
                    raise _Stop

            return hook

        names = sorted({name for name, _ in wanted})
        regs = [(lambda n=n: named_module(net, n).register_forward_hook(capture(n))) for n in names]
        loader = DataLoader(
            _Images(files, model.preprocess),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        result = FeatureScan(
            paths=files,
            layers={},
            k=top,
            input_size=size,
            model_name=model.name,
        )
        report, bar = _progress_callback(progress, "scanning")
        done = 0
        try:
            if report is not None:
                report(0, len(files))
            with hooks(regs):
                for ids, x, bad in loader:
                    for i, reason in bad:
                        logger.info("skipping %s", reason)
                        result.skipped.append((files[i], reason))
                    if x is not None:
                        state.update(ids=ids, calls={}, done=0)
                        with contextlib.suppress(_Stop):
                            net(x.to(device=device, dtype=dtype, non_blocking=True))
                        result.scanned += int(x.shape[0])
                    done += int(ids.numel()) + len(bad)
                    if report is not None:
                        report(done, len(files))
        finally:
            if bar is not None:
                bar.close()

    if result.skipped:
        logger.warning(
            "skipped %d of %d images that could not be read", len(result.skipped), len(files)
        )
    for s, ref in refs.items():
        tracker = trackers[s].to("cpu")
        shape = probed[s].shape
        picked = chosen[s]
        if picked is None:
            score = tracker.score()
            order = torch.argsort(score, descending=True, stable=True)
            picked = [int(c) for c in order[:num_channels] if score[c] > float("-inf")]
        result.layers[s] = LayerScan(
            layer=s,
            ref=ref,
            shape=(shape[1], shape[2], shape[3]),
            top=tracker,
            channels=picked,
            source=probed[s].source,
            clip=probed[s].clip,
        )
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# Projections and crops
# --------------------------------------------------------------------------------------------


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
    rf = receptive or receptive_field(model.net, info.source, scan.input_size)
    step = max(1, batch_size)
    window: tuple[int, int] | None = None if crop == "effective" else rf.size
    group: list[int] = []
    for n, c in enumerate(wanted):
        group.append(c)
        if sum(len(tops[g]) for g in group) < step and n < len(wanted) - 1:
            continue
        owners, images, projections = _project(model, info.source, group, tops, cache, rule, step)
        if window is None and owners:
            window = _effective_window(owners, projections, rf, mass)
            logger.debug("layer %s: effective patch %s of receptive field %s", layer, window, rf)
        per_channel: dict[int, list[FeatureExample]] = {g: [] for g in group}
        for k, (c_, act, slot) in enumerate(owners):
            box = _window_box(rf, act.y, act.x, window or rf.size)
            top, left, bottom, right = box
            per_channel[c_].append(
                FeatureExample(
                    activation=act,
                    box=box,
                    patch=images[slot][:, top:bottom, left:right].clone(),
                    projection=projections[k, :, top:bottom, left:right].clone(),
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
) -> tuple[list[tuple[int, TopActivation, int]], list[torch.Tensor], torch.Tensor]:
    """Projections of the top activations of a few channels: ``(owners, images, projections)``
    with ``owners[k] = (channel, activation, index in images)`` for projection ``k``; images in
    [0, 1] and projections (float32) on the CPU."""
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
    out = project_units(model.net, x, source, index, rule=rule, batch_size=batch_size)
    return owners, images, out.detach().float().cpu()


def _centre(rf: ReceptiveField, y: int, x: int) -> tuple[int, int]:
    top, left, bottom, right = rf.box(y, x, clip=False)
    return (top + bottom - 1) // 2, (left + right - 1) // 2


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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer.replace("@", "_call")).strip("_") or "layer"


def _root(paths: Sequence[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))
    except ValueError:
        return None


def _shown_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.absolute().relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


@dataclass
class _LayerPage:
    layer: str
    pngs: list[str]
    shape: tuple[int, int, int]
    rf: ReceptiveField
    window: tuple[int, int]
    notes: list[str]
    rows: list[tuple[int, list[tuple[float, str, tuple[int, int], tuple[int, int, int, int]]]]]


def _image_independent(
    scan: FeatureScan, model: ConvlensModel, info: LayerScan, rule: str, cache: _ImageCache
) -> bool:
    """Whether the projection of one unit is the same for two different images (cosine
    similarity above 0.999): then the rule ignores the image (a deconvnet through a network
    without max pooling)."""
    for c in info.channels:
        acts = scan.top(info.layer, c)
        if len(acts) < 2:
            continue
        a, b = acts[0], acts[1]
        same = TopActivation(b.rank, b.value, b.image_id, b.path, a.y, a.x)
        _, _, p = _project(model, info.source, [c], {c: [a, same]}, cache, rule, 2)
        if p.shape[0] < 2:
            return False
        cos = torch.nn.functional.cosine_similarity(p[0].flatten(), p[1].flatten(), dim=0)
        return float(cos) > 0.999
    return False


def render_features(
    scan: FeatureScan,
    model: ConvlensModel,
    out_dir: str | Path,
    *,
    rule: str = "deconvnet",
    crop: Crop = "effective",
    cell: int = 64,
    columns: int = 4,
    per_image: int = 64,
    batch_size: int = 32,
    progress: bool | Progress = False,
) -> list[Path]:
    """Write the feature browser: one grid PNG per layer and an offline ``index.html``.

    Each PNG shows, for every chosen channel of the layer, the ``k`` projections of its top
    activations (a 3x3 grid for ``k = 9``) beside the ``k`` image patches under them, as in
    Zeiler & Fergus (2014), Fig. 2. Projections and patches are cropped around the unit (see
    :func:`feature_examples` for ``crop``) and projections shown with
    :func:`convlens.render.rgb_attribution`, normalised per crop (grey is zero). ``index.html``
    shows each grid and, per channel, the activation values and the source image files; it
    references only the PNGs next to it, so it works offline.

    Without max pooling the deconvnet ignores the image entirely (its only image-dependent step
    is unpooling with the max-pool switches), so every projection of a channel is the same
    pattern; this is detected and noted in the page (use ``rule="guided"`` to see image-specific
    structure).

    Args:
        scan: the result of :func:`scan_features`.
        model: the model scanned with.
        out_dir: output folder (created).
        rule: backward rule of the projection: ``"deconvnet"`` (Zeiler & Fergus) or
            ``"guided"`` (Springenberg et al. 2015).
        crop: ``"effective"`` (default) or ``"field"``; see :func:`feature_examples`.
        cell: side in pixels of one tile (patches and projections are scaled to fit).
        columns: channel blocks per row of the grid.
        per_image: channels per PNG; a layer with more chosen channels gets several PNGs
            (``features_<layer>_1.png``, ...), so that no image grows without bound.
        batch_size: projections per backward pass.
        progress: show a progress bar (tqdm), or a ``(done, total)`` callback counting channels.

    Returns:
        The PNG files written, then ``index.html``.

    Raises:
        InputError: ``crop`` is invalid, or ``cell``, ``columns``, ``per_image`` or
            ``batch_size`` is not a positive integer.
        RunFolderError: another convlens process is writing ``out_dir``.
        OutputError: a file cannot be written (each is written atomically).
    """
    if crop not in ("effective", "field"):
        raise InputError(f"crop must be 'effective' or 'field', got {crop!r}")
    for name, value in (
        ("cell", cell),
        ("columns", columns),
        ("per_image", per_image),
        ("batch_size", batch_size),
    ):
        positive_int(value, name)
    out = Path(out_dir)
    with lock_folder(out, "features"):
        return _render_features(
            scan, model, out, rule, crop, cell, columns, per_image, batch_size, progress
        )


def _render_features(
    scan: FeatureScan,
    model: ConvlensModel,
    out: Path,
    rule: str,
    crop: Crop,
    cell: int,
    columns: int,
    per_image: int,
    batch_size: int,
    progress: bool | Progress,
) -> list[Path]:
    """:func:`render_features` in a folder whose lock is held."""
    from convlens.render.feature_grid import ChannelTiles, feature_grid
    from convlens.render.overlay import rgb_attribution, to_pil

    root = _root(scan.paths) if scan.paths else None
    total = sum(len(info.channels) for info in scan.layers.values())
    report, bar = _progress_callback(progress, "rendering")
    written: list[Path] = []
    pages: list[_LayerPage] = []
    used: set[str] = set()
    cache = _ImageCache(scan.paths, model.preprocess)
    done = 0
    try:
        if report is not None:
            report(0, total)
        for layer, info in scan.layers.items():
            if not info.channels:
                logger.warning("layer %s: no channel has any activation; nothing to show", layer)
                continue
            rf = receptive_field(model.net, info.source, scan.input_size)
            independent = _image_independent(scan, model, info, rule, cache)
            notes = _layer_notes(info, rule, independent)
            for note in notes:
                logger.info("layer %s: %s", layer, note)
            base = f"features_{_slug(layer)}"
            while base in used:
                base += "_"
            used.add(base)
            npages = -(-len(info.channels) // per_image)
            tiles: list[ChannelTiles] = []
            rows = []
            pngs: list[str] = []
            window = rf.size
            for ch in _examples(scan, model, layer, None, rule, crop, 0.9, batch_size, rf, cache):
                window = ch.window
                projections = [rgb_attribution(_shrink(e.projection, cell)) for e in ch.examples]
                patches = [to_pil(e.patch) for e in ch.examples]
                best = f"max {ch.examples[0].activation.value:.3g}" if ch.examples else "no data"
                tiles.append(ChannelTiles(f"channel {ch.channel}", projections, patches, best))
                rows.append(
                    (
                        ch.channel,
                        [
                            (
                                e.activation.value,
                                _shown_name(e.activation.path, root),
                                (e.activation.y, e.activation.x),
                                e.box,
                            )
                            for e in ch.examples
                        ],
                    )
                )
                done += 1
                if report is not None:
                    report(done, total)
                if len(tiles) < per_image and len(rows) < len(info.channels):
                    continue
                part = "" if npages == 1 else f" ({len(pngs) + 1}/{npages})"
                fig = feature_grid(
                    tiles,
                    k=scan.k,
                    cell=cell,
                    columns=columns,
                    title=f"{scan.model_name} · layer {layer}{part}",
                    subtitle=_subtitle(scan, info, rf, window, rule, independent),
                )
                png = out / (f"{base}.png" if npages == 1 else f"{base}_{len(pngs) + 1}.png")
                save_image(fig, png, optimize=True)
                written.append(png)
                pngs.append(png.name)
                tiles = []
            pages.append(_LayerPage(layer, pngs, info.shape, rf, window, notes, rows))
    finally:
        if bar is not None:
            bar.close()
    index = out / "index.html"
    atomic_write_text(index, _html(scan, pages, rule, root))
    written.append(index)
    return written


def _shrink(projection: torch.Tensor, cell: int) -> torch.Tensor:
    """Average a (3, h, w) projection down to fit ``cell`` pixels (``area`` interpolation), so
    that it is normalised for display at the resolution it is shown at: thin structures of a
    large crop keep their contrast instead of fading into grey when the image is shrunk."""
    h, w = projection.shape[-2:]
    if max(h, w) <= cell:
        return projection
    scale = cell / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(projection[None], size=size, mode="area")[0]


def _subtitle(
    scan: FeatureScan,
    info: LayerScan,
    rf: ReceptiveField,
    window: tuple[int, int],
    rule: str,
    independent: bool,
) -> str:
    c, h, w = info.shape
    field_text = f"receptive field {rf.size[0]}x{rf.size[1]} px, stride {rf.stride[0]}"
    patch = "" if window == rf.size else f" · patches {window[0]}x{window[1]} px"
    ranked = "" if info.clip is None else f" · ranked before the clip at {info.clip:g}"
    return (
        f"{c} channels, {h}x{w} map · {field_text}{patch}{ranked} · top {scan.k} of "
        f"{scan.scanned} images · left: {rule} projections"
        + (" (the same for every image: no max pooling)" if independent else "")
        + ", right: image patches"
    )


def _layer_notes(info: LayerScan, rule: str, image_independent: bool) -> list[str]:
    notes = []
    if info.clip is not None:
        notes.append(
            f"{info.layer} clips its input to [0, {info.clip:g}], which ties every saturated "
            f"unit; units are ranked and projected by their value before clipping (the output "
            f"of {info.source.name}, call {info.source.call})"
        )
    if image_independent:
        notes.append(
            f"the {rule} projections of each channel are the same pattern for every image: "
            "without max pooling the deconvnet does not depend on the image (its only "
            "image-dependent step is unpooling with the max-pool switches); use the guided "
            "rule (--rule guided) to see what in each image drives the unit"
        )
    return notes


def _html(scan: FeatureScan, pages: Sequence[_LayerPage], rule: str, root: Path | None) -> str:
    """The feature browser's ``index.html`` (template ``features_index.html.j2``)."""
    layers = []
    for p in pages:
        c, h, w = p.shape
        rf = p.rf
        shape = (
            f"output {c}x{h}x{w} · receptive field {rf.size[0]}x{rf.size[1]} px, "
            f"stride {rf.stride[0]}x{rf.stride[1]}"
            + (" (clipped: larger than the largest input measured)" if rf.clipped else "")
            + ("" if p.window == rf.size else f" · patches {p.window[0]}x{p.window[1]} px")
        )
        rows = [
            (
                channel,
                [
                    {
                        "value": f"{value:.4g}",
                        "name": name,
                        "tip": f"unit (y={uy}, x={ux}) · patch (top, left, bottom, right) = "
                        f"({t}, {left}, {b}, {r}), bottom/right exclusive",
                    }
                    for value, name, (uy, ux), (t, left, b, r) in entries
                ],
            )
            for channel, entries in p.rows
        ]
        layers.append(
            {
                "layer": p.layer,
                "slug": _slug(p.layer),
                "shape": shape,
                "notes": p.notes,
                "pngs": p.pngs,
                "rows": rows,
            }
        )
    return render_page(
        "features_index.html.j2",
        title=f"convlens features · {scan.model_name}",
        model=scan.model_name,
        scanned=scan.scanned,
        root=None if root is None else str(root),
        skipped=[reason for _, reason in scan.skipped],
        k=scan.k,
        rule=rule,
        when=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        layers=layers,
    )
