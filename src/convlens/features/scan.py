"""Step 1 of the feature browser: one pass over an image folder keeps, for every chosen channel
of every layer, the ``k`` images where it fires most (:func:`scan_features`)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from convlens.architecture import LayerRef, absolute_call, parse_layer
from convlens.errors import ImageError, InputError, LayerError
from convlens.features.results import ChannelSpec, FeatureScan, LayerScan, Progress
from convlens.features.topk import RunningTopK
from convlens.hooks.capture import StopForward, hooks, named_module, stoppable
from convlens.hooks.state import model_state
from convlens.images import load_image
from convlens.models.base import ConvlensModel
from convlens.models.preprocess import Preprocess
from convlens.tokens import TokenLayout, layer_layout
from convlens.validate import non_negative_int, positive_int

__all__ = ["ProbedLayer", "parse_channels", "probe_layers", "scan_features"]

logger = logging.getLogger(__name__)


MAX_CHANNELS = 1 << 16
"""The most channels one selection may name (no layer has more; a typo such as ``0-99999999``
would otherwise build a list of that length before any layer is looked at)."""


def parse_channels(text: str, *, allow_auto: bool = True) -> ChannelSpec:
    """Parse a channel selection: ``"auto"``, ``"0-15"``, ``"0,3,7"`` or mixed ``"0-3,8"``.

    The one reader of channel text (``features --channels``, ``featviz --channels``).

    Args:
        text: the selection.
        allow_auto: accept ``"auto"`` (the most active channels).

    Returns:
        ``"auto"`` or the list of channel indices (duplicates removed, order kept).

    Raises:
        InputError: the text is not such a selection, or names more than
            :data:`MAX_CHANNELS` channels.
    """
    text = text.strip()
    if text.lower() == "auto" and allow_auto:
        return "auto"
    out: list[int] = []
    count = 0
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            auto = "'auto', " if allow_auto else ""
            raise InputError(
                f"cannot read channel selection {text!r}: use {auto}a range like '0-15', "
                "a list like '0,3,7', or both ('0-3,8')"
            )
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise InputError(f"channel range {part!r} is empty: write the smaller index first")
        count += hi - lo + 1
        if count > MAX_CHANNELS:
            raise InputError(
                f"channel selection {text!r} names {count:,}+ channels; at most "
                f"{MAX_CHANNELS:,} can be shown (a layer has at most that many)"
            )
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


def _param(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in net.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class ProbedLayer:
    """What one forward pass of a blank image says about a requested layer."""

    shape: tuple[int, ...]  # (1, C, h, w) of the map that is ranked
    source: LayerRef  # what is captured and projected; the call index is absolute
    clip: float | None  # upper bound of a saturating activation whose input is used instead
    layout: TokenLayout | None = None  # how a token layer's output maps to (B, C, h, w)


def _saturating(module: nn.Module) -> float | None:
    """The upper bound of a ReLU6-like module (``clamp(x, 0, u)``), else ``None``."""
    if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
        return float(module.max_val)
    return None


def _token_layout(net: nn.Module, ref: LayerRef, out: Any, x: torch.Tensor) -> TokenLayout | None:
    """How layer ``ref``'s output ``out`` (for the blank input ``x``) maps to a ``(B, C, h, w)``
    map: ``None`` when it is one, a :class:`~convlens.tokens.TokenLayout` for a token layer
    (:func:`convlens.tokens.layer_layout`).

    Raises:
        LayerError: the output is neither.
    """
    if isinstance(out, torch.Tensor) and out.dim() in (3, 4):
        try:
            layout = layer_layout(net, named_module(net, ref.name), out, x, str(ref))
        except LayerError:
            pass
        else:
            return None if layout.kind == "nchw" else layout
    kind = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise LayerError(
        f"layer {str(ref)!r} outputs {kind}; the feature browser needs a (B, C, H, W) "
        "feature map or a token layer of a vision transformer ((B, N, C) patch tokens, or "
        "Swin's (B, H, W, C), one per image): choose one with `convlens layers MODEL`"
    )


def _token_producer(
    net: nn.Module,
    out: Any,
    inp: Any,
    earlier: Sequence[tuple[str, int, Any]],
    x: torch.Tensor,
) -> tuple[LayerRef, TokenLayout] | None:
    """The token layer whose output a ``(B, C, H, W)`` output only rearranges, with its layout
    (torchvision's Swin permutes its final norm's ``(B, H, W, C)`` tokens into a map before
    pooling): ``out`` is the module's input ``inp``, produced by an earlier module of
    ``earlier`` (``(name, call, output)`` in call order), placed on its grid. ``None`` when
    there is no such layer."""
    if (
        not isinstance(inp, torch.Tensor)
        or not isinstance(out, torch.Tensor)
        or inp.dim() not in (3, 4)
        or inp.shape == out.shape
        or inp.numel() != out.numel()
    ):
        return None
    for name, call, o in reversed(earlier):
        if o is not inp:
            continue
        try:
            layout = layer_layout(net, named_module(net, name), o, x, name)
        except LayerError:
            return None
        if layout.kind != "nchw" and torch.equal(layout.to_maps(o), out):
            return LayerRef(name, call), layout
        return None
    return None


def probe_layers(
    net: nn.Module, refs: Mapping[str, LayerRef], size: tuple[int, int]
) -> dict[str, ProbedLayer]:
    """One forward pass of a blank image: each requested layer's shape and source.

    A layer that is a saturating activation module (``nn.ReLU6``, ``nn.Hardtanh(0, u)``) caps its
    strongest activations at the same value ``u``, so ranking them would be a tie among every
    unit in saturation, and guided backpropagation would zero them. When its input is the output
    of a module (e.g. a BatchNorm), that module's output is ranked and projected instead: the
    same units before clipping.

    A token layer of a vision transformer (``(B, N, C)``, or Swin's ``(B, H, W, C)``) is
    ranked as the ``(B, C, h, w)`` map of its patch tokens (:mod:`convlens.tokens`; class,
    distillation and register tokens dropped); so is a module that only rearranges a token
    layer's output into such a map (:func:`_token_producer`), as the token layer itself.
    """
    device, dtype = _param(net)
    requested = {r.name for r in refs.values()}
    modules = [(n, m) for n, m in net.named_modules() if n]
    calls: dict[str, int] = {}
    produced: list[tuple[str, int, Any]] = []  # (module name, call index, output)
    outputs: dict[tuple[str, int], Any] = {}
    inputs: dict[tuple[str, int], Any] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, args: Any, out: Any) -> None:
            index = calls.get(name, 0)
            calls[name] = index + 1
            if name in requested:
                outputs[name, index] = out
                inputs[name, index] = (args[0] if args else None, len(produced))
            produced.append((name, index, out))

        return record

    blank = torch.zeros(1, 3, *size, device=device, dtype=dtype)
    regs = [(lambda n=n, m=m: m.register_forward_hook(recorder(n))) for n, m in modules]
    with hooks(regs):
        net(blank)
    found: dict[str, ProbedLayer] = {}
    for spec, r in refs.items():
        count = calls.get(r.name, 0)
        index = absolute_call(r, count)
        out = outputs[r.name, index]
        source = LayerRef(r.name, index)
        layout = _token_layout(net, r, out, blank)
        if layout is not None:
            shape = tuple(layout.to_maps(out).shape)
            found[spec] = ProbedLayer(shape=shape, source=source, clip=None, layout=layout)
            continue
        shape = tuple(out.shape)
        inp, position = inputs[r.name, index]
        rearranged = _token_producer(net, out, inp, produced[:position], blank)
        if rearranged is not None:
            source, layout = rearranged
            found[spec] = ProbedLayer(shape=shape, source=source, clip=None, layout=layout)
            continue
        clip = _saturating(named_module(net, r.name))
        if clip is not None:
            producer = next(
                (LayerRef(n, i) for n, i, o in reversed(produced[:position]) if o is inp),
                None,
            )
            if producer is None:
                clip = None
            else:
                source = producer
        found[spec] = ProbedLayer(shape=shape, source=source, clip=clip)
    return found


def _progress_callback(progress: bool | Progress, what: str) -> tuple[Progress | None, Any]:
    """A ``(done, total)`` callback and the bar to stop afterwards: ``progress`` itself when it
    is a callback, else (``True``) a started :func:`convlens.console.progress_bar` on stderr."""
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from convlens.console import progress_bar, progress_callback

    bar = progress_bar()
    bar.start()
    return progress_callback(bar, what), bar


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

    A token layer of a vision transformer (ViT/DeiT ``(B, N, C)`` tokens, Swin's channels-last
    ``(B, H, W, C)``) is ranked as the ``(B, C, h, w)`` map of its patch tokens on their grid
    (:mod:`convlens.tokens`; class, distillation and register tokens dropped, see
    :attr:`LayerScan.layout`): a top activation is then one channel of one patch token.

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
        progress: show a progress bar on stderr, or a ``(done, total)`` callback.

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
        probed = probe_layers(net, refs, size)
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
                    layout = probed[s].layout
                    trackers[s].update(out if layout is None else layout.to_maps(out), state["ids"])
                    state["done"] += 1
                if state["done"] == len(specs):
                    raise StopForward

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
                        with stoppable():
                            net(x.to(device=device, dtype=dtype, non_blocking=True))
                        result.scanned += int(x.shape[0])
                    done += int(ids.numel()) + len(bad)
                    if report is not None:
                        report(done, len(files))
        finally:
            if bar is not None:
                bar.stop()

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
            layout=probed[s].layout,
        )
    result.seconds = time.perf_counter() - start
    return result
