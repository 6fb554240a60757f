"""What the page of each failure mode shows: channel patches, where channels fire, maps.

For every cluster of :mod:`convlens.analysis.failure_modes` the report has a page
(``report/failure_modes/mode-<rank>.html``, written by :mod:`convlens.analysis.report`). This
module computes the images it shows, under ``RUN_DIR/failure_modes/``, and the numbers, which go
to ``metrics.json`` (``failure_modes.evidence``):

1. **Top activating patches** of the channels shown (each cluster's first
   :data:`SHOWN_CHANNELS` wrong-way channels and first :data:`SHOWN_CHANNELS` distinguishing
   ones), from the run's own images: one pass of the feature browser's scan
   (:func:`convlens.features.scan_features`, Zeiler & Fergus 2014, §2: per channel the ``k``
   images where it fires most, each reduced to its strongest unit) over at most
   :data:`MAX_SCAN` images (the clustered images first), stopped at the feature layer. Each
   patch is the image under the unit, cut as the feature browser does
   (:func:`convlens.features.receptive_field.receptive_field`): a square centred on the unit's
   receptive field, ``clamp(3 * stride, 32, rf size)`` pixels a side (the last feature map's
   receptive field is the whole image; three strides show the region around the unit).
   No projection (deconvnet) is computed: that would cost a backward pass per patch.
2. **Where each wrong-way channel fires** in the cluster's representative images: the channel's
   activation map, divided by its strongest activation over the scanned images (so 1 means "as
   strongly as anywhere in the data set"), clipped to [0, 1] and overlaid on the image.
3. **Maps** of the representatives: the explanation panel of ``analyze`` when the image was
   examined, else a Grad-CAM map of the predicted class (one batch for all of them).

Cost: one forward pass up to the feature layer over the scanned images, one forward pass over
the representatives (at most 3 per cluster) and one Grad-CAM batch over those not examined.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from convlens.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

    from convlens.analysis.failure_modes import FailureMode
    from convlens.analysis.store import Prediction
    from convlens.architecture import LayerRef
    from convlens.features.receptive_field import ReceptiveField
    from convlens.models.base import ConvlensModel

__all__ = ["MAX_SCAN", "PATCHES", "SHOWN_CHANNELS", "channel_evidence", "shown_channels"]

log = logging.getLogger(__name__)

SHOWN_CHANNELS = 3
"""Wrong-way (and distinguishing) channels shown per cluster."""
PATCHES = 6
"""Top activating patches per channel."""
MAX_SCAN = 2000
"""At most this many images are scanned for the patches: the clustered ones first, then the
others by id."""
_TILE = 96  # pixels of a patch tile
_FIRE = 112  # pixels of a "where it fires" overlay
_MIN_WINDOW = 32


def shown_channels(mode: FailureMode) -> tuple[list[int], list[int]]:
    """The wrong-way and distinguishing channels a cluster's page shows."""
    push = [int(c["channel"]) for c in mode.push_channels[:SHOWN_CHANNELS]]
    distinct = [int(c["channel"]) for c in mode.distinguishing[:SHOWN_CHANNELS]]
    return push, distinct


def _png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _cohens_d(group: np.ndarray, reference: np.ndarray) -> float | None:
    n, m = len(group), len(reference)
    if n < 2 or m < 2:
        return None
    pooled = ((n - 1) * group.var(ddof=1) + (m - 1) * reference.var(ddof=1)) / (n + m - 2)
    sd = float(np.sqrt(pooled))
    return float((group.mean() - reference.mean()) / sd) if sd > 1e-12 else 0.0


def channel_evidence(
    model: ConvlensModel,
    layer: LayerRef,
    modes: Sequence[FailureMode],
    predictions: Sequence[Prediction],
    features: Mapping[str, np.ndarray],
    examined: Mapping[str, Path],
    out: Path,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Compute and save what the failure-mode pages show (see the module docstring).

    Args:
        model: the classifier; ``layer``: its feature layer (the channels' layer).
        modes: the clusters, best first.
        predictions: every prediction of the run (the scanned images are taken from them).
        features: pooled features by image id (for the effect sizes of the shown channels).
        examined: explanation panels of the examined mistakes, by image id.
        out: the run folder; images go under ``out/failure_modes/``.
        batch_size: images per forward pass.

    Returns:
        The ``evidence`` entry of ``metrics["failure_modes"]``: ``channels`` (per channel its
        patches: image id, activation, box in model-input pixels, and its image file),
        ``fires`` (per representative and wrong-way channel, the overlay's file), ``maps``
        (per representative, its explanation panel or Grad-CAM file), ``effect_sizes`` (per
        cluster rank and shown channel, Cohen's d of its mistakes against the correct images
        of the same true classes), ``scanned``, ``patch_pixels``, ``seconds``. Paths are
        relative to ``out``.
    """
    from convlens.errors import ConvlensError

    start = time.perf_counter()
    try:
        return _evidence(
            model, layer, modes, predictions, features, examined, out, batch_size, start
        )
    except ConvlensError as exc:  # a layer the scan or the receptive field cannot handle
        log.warning("failure-mode pages without patches or channel maps: %s", exc)
        return {
            "layer": str(layer),
            "skipped": str(exc),
            "channels": {},
            "fires": {},
            "maps": {},
            "seconds": round(time.perf_counter() - start, 3),
        }


def _evidence(
    model: ConvlensModel,
    layer: LayerRef,
    modes: Sequence[FailureMode],
    predictions: Sequence[Prediction],
    features: Mapping[str, np.ndarray],
    examined: Mapping[str, Path],
    out: Path,
    batch_size: int,
    start: float,
) -> dict[str, Any]:
    from convlens.analysis.failure_modes import select_images
    from convlens.features.scan import scan_features

    by_id = {p.id: p for p in predictions}
    channels: list[int] = []
    for m in modes:
        push, distinct = shown_channels(m)
        channels += push + distinct
    channels = list(dict.fromkeys(channels))
    evidence: dict[str, Any] = {"layer": str(layer), "channels": {}, "fires": {}, "maps": {}}
    if not channels:
        return evidence
    first = [p.id for p in select_images(predictions)]
    rest = sorted(set(by_id) - set(first))
    scanned = [by_id[i] for i in (first + rest)[:MAX_SCAN]]
    scan = scan_features(
        model,
        [p.path for p in scanned],
        [str(layer)],
        channels=channels,
        top=PATCHES,
        batch_size=batch_size,
        progress=False,
    )
    info = scan.layers[str(layer)]
    source = info.source
    top = info.top
    timing = {"scan": time.perf_counter() - start}
    rf = _receptive_field(model, source, scan.input_size, out / "failure_modes")
    timing["receptive_field"] = time.perf_counter() - start - timing["scan"]
    side = [min(rf.size[a], max(3 * rf.stride[a], _MIN_WINDOW)) for a in (0, 1)]
    evidence.update(
        scanned=scan.scanned,
        patch_pixels=side,
        receptive_field={"size": list(rf.size), "stride": list(rf.stride)},
        source=str(source),
    )
    folder = out / "failure_modes"
    units: dict[str, torch.Tensor | None] = {}

    def unit(p: Prediction) -> torch.Tensor | None:
        if p.id not in units:
            from convlens.errors import ImageError
            from convlens.images import load_image

            try:
                units[p.id] = model.preprocess.to_unit(load_image(p.path))
            except ImageError as exc:
                log.warning("cannot re-read %s for the failure-mode pages: %s", p.path, exc)
                units[p.id] = None
        return units[p.id]

    _patches(evidence, channels, top, scanned, rf, (side[0], side[1]), unit, folder)
    _fires_and_maps(evidence, model, source, modes, by_id, top, examined, unit, folder, batch_size)
    evidence["effect_sizes"] = _effect_sizes(modes, predictions, features)
    evidence["seconds"] = round(time.perf_counter() - start, 3)
    evidence["seconds_by_step"] = {k: round(v, 3) for k, v in timing.items()}
    return evidence


RF_FILE = "receptive_field.json"
"""The feature layer's receptive field, kept under ``RUN_DIR/failure_modes/``: measuring it
costs several forward and backward passes on inputs up to 1024 pixels long."""


def _receptive_field(
    model: ConvlensModel, source: LayerRef, size: tuple[int, int], folder: Path
) -> ReceptiveField:
    """:func:`~convlens.features.receptive_field.receptive_field` of ``source``, measured once
    per run folder (kept in :data:`RF_FILE` for this model, layer and input size)."""
    import json

    from convlens.atomic import atomic_write_text
    from convlens.features.receptive_field import ReceptiveField, receptive_field

    key = {"model": model.name, "layer": str(source), "input_size": list(size)}
    path = folder / RF_FILE
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["key"] == key:
            g = kept["field"]
            return ReceptiveField(
                layer=str(g["layer"]),
                size=(int(g["size"][0]), int(g["size"][1])),
                stride=(int(g["stride"][0]), int(g["stride"][1])),
                offset=(int(g["offset"][0]), int(g["offset"][1])),
                input_size=(int(g["input_size"][0]), int(g["input_size"][1])),
                output_size=(int(g["output_size"][0]), int(g["output_size"][1])),
                clipped=bool(g["clipped"]),
            )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # missing, unreadable or of another layer: measure
    rf = receptive_field(model.net, source, size)
    field = {
        "layer": rf.layer,
        "size": list(rf.size),
        "stride": list(rf.stride),
        "offset": list(rf.offset),
        "input_size": list(rf.input_size),
        "output_size": list(rf.output_size),
        "clipped": rf.clipped,
    }
    atomic_write_text(path, json.dumps({"key": key, "field": field}))
    return rf


def _patches(
    evidence: dict[str, Any],
    channels: Sequence[int],
    top: Any,
    scanned: Sequence[Prediction],
    rf: Any,
    window: tuple[int, int],
    unit: Any,
    folder: Path,
) -> None:
    """Each channel's top patches as one strip PNG (``channels/c<channel>.png``)."""
    from PIL import Image

    from convlens.features.project import _window_box
    from convlens.render.overlay import to_pil

    for c in channels:
        tiles: list[Image.Image] = []
        patches = []
        for k in range(top.k):
            image_id = int(top.image_ids[c, k])
            value = float(top.values[c, k])
            if image_id < 0 or not np.isfinite(value):
                continue
            p = scanned[image_id]
            img = unit(p)
            if img is None:
                continue
            y, x = int(top.ys[c, k]), int(top.xs[c, k])
            t, left, b, r = _window_box(rf, y, x, window)
            tile = to_pil(img[:, t:b, left:r]).resize((_TILE, _TILE), Image.Resampling.BICUBIC)
            tiles.append(tile)
            patches.append({"id": p.id, "value": value, "box": [t, left, b, r]})
        if not tiles:
            continue
        strip = Image.new("RGB", (len(tiles) * (_TILE + 4) - 4, _TILE), "white")
        for n, tile in enumerate(tiles):
            strip.paste(tile, (n * (_TILE + 4), 0))
        rel = f"failure_modes/channels/c{c}.png"
        _png(strip, folder.parent / rel)
        evidence["channels"][str(c)] = {"patches": patches, "image": rel}


def _fires_and_maps(
    evidence: dict[str, Any],
    model: ConvlensModel,
    source: LayerRef,
    modes: Sequence[FailureMode],
    by_id: Mapping[str, Prediction],
    top: Any,
    examined: Mapping[str, Path],
    unit: Any,
    folder: Path,
    batch_size: int,
) -> None:
    """Where each cluster's wrong-way channels fire on its representatives, and their maps."""
    from convlens.hooks.capture import layer_capture
    from convlens.hooks.state import model_state
    from convlens.render.overlay import overlay_map

    wanted: dict[str, list[int]] = {}
    for m in modes:
        push, _ = shown_channels(m)
        for i in m.representatives:
            wanted.setdefault(i, [])
            wanted[i] = list(dict.fromkeys(wanted[i] + push))
    reps = [by_id[i] for i in wanted if i in by_id and unit(by_id[i]) is not None]
    if not reps:
        return
    device = model.device
    dtype = next((p.dtype for p in model.net.parameters()), torch.float32)
    strongest = top.values[:, 0].clamp(min=1e-12)
    for s in range(0, len(reps), batch_size):
        chunk = reps[s : s + batch_size]
        units = torch.stack([unit(p) for p in chunk])
        x = model.preprocess.normalize(units).to(device=device, dtype=dtype)
        with model_state(model.net, eval_mode=True, grads=False), torch.no_grad():
            with layer_capture(model.net, source.name) as cap:
                model.net(x)
            acts = cap.output(source.call).float().cpu()
        for n, p in enumerate(chunk):
            files = {}
            for c in wanted[p.id]:
                heat = (acts[n, c] / strongest[c]).clamp(0, 1)
                image = overlay_map(heat, units[n], alpha=0.5).resize((_FIRE, _FIRE))
                rel = f"failure_modes/fires/{p.id}-c{c}.png"
                _png(image, folder.parent / rel)
                files[str(c)] = rel
            evidence["fires"][p.id] = files
    _maps(evidence, model, reps, examined, unit, folder, batch_size)


def _maps(
    evidence: dict[str, Any],
    model: ConvlensModel,
    reps: Sequence[Prediction],
    examined: Mapping[str, Path],
    unit: Any,
    folder: Path,
    batch_size: int,
) -> None:
    """The explanation panel of each examined representative, a Grad-CAM map of the others."""
    from convlens.api import explain
    from convlens.render.overlay import overlay_map

    root = folder.parent
    todo = []
    for p in reps:
        panel = examined.get(p.id)
        if panel is not None:
            evidence["maps"][p.id] = {"kind": "panel", "image": panel.relative_to(root).as_posix()}
        else:
            todo.append(p)
    dtype = next((q.dtype for q in model.net.parameters()), torch.float32)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        units = torch.stack([unit(p) for p in chunk])
        x = model.preprocess.normalize(units).to(device=model.device, dtype=dtype)
        target = torch.tensor([p.pred for p in chunk], device=model.device)
        exp = explain(model, x, ["gradcam"], target=target)["gradcam"]
        maps = exp.normalized()[:, 0].float().cpu()
        for n, p in enumerate(chunk):
            rel = f"failure_modes/maps/{p.id}.png"
            image = overlay_map(maps[n], units[n], alpha=0.5)
            _png(image.resize((_FIRE * 2, _FIRE * 2)), root / rel)
            evidence["maps"][p.id] = {"kind": "gradcam", "image": rel}


def _effect_sizes(
    modes: Sequence[FailureMode],
    predictions: Sequence[Prediction],
    features: Mapping[str, np.ndarray],
) -> dict[str, dict[str, float | None]]:
    """Per cluster rank and shown channel: Cohen's d of its mistakes' pooled activation against
    the correctly classified images of the same true classes (as
    :func:`~convlens.analysis.failure_modes.distinguishing_channels`)."""
    by_id = {p.id: p for p in predictions}
    out: dict[str, dict[str, float | None]] = {}
    for m in modes:
        errs = [i for i in m.errors_ids if i in features]
        classes = {by_id[i].label for i in errs if i in by_id}
        ref = [
            p.id
            for p in predictions
            if p.correct is True and p.label in classes and p.id in features
        ]
        push, distinct = shown_channels(m)
        g = np.stack([features[i] for i in errs]).astype(np.float64) if errs else None
        r = np.stack([features[i] for i in ref]).astype(np.float64) if ref else None
        out[str(m.rank)] = {
            str(c): None if g is None or r is None else _cohens_d(g[:, c], r[:, c])
            for c in dict.fromkeys(push + distinct)
        }
    return out
