"""What the page of each failure mode shows: channel patches, where channels fire, maps.

For every cluster of :mod:`convlens.analysis.failure_modes` the report has a page
(``report/failure_modes/mode-<rank>.html``, written by :mod:`convlens.analysis.report`). This
module computes the images it shows, under ``RUN_DIR/failure_modes/``, and the numbers, which go
to ``metrics.json`` (``failure_modes.evidence``):

1. **Top activating patches** of the channels shown (each cluster's first
   :data:`SHOWN_CHANNELS` wrong-way channels and first :data:`SHOWN_CHANNELS` distinguishing
   ones), from the run's own images, as in the feature browser (Zeiler & Fergus 2014, §2: per
   channel the ``k`` images where it responds most, each a different image, cut around its
   strongest unit). The images are ranked by the channel's pooled activation ``mean_hw(A_c)``,
   which the prediction pass already captured for every image (the features of the
   clustering): what the classifier reads, and no pass over the data set (memory: one row of
   the shown channels per image).
   Only the ``k`` top images of the shown channels (and the representatives) go through the
   network again, once, up to the feature layer (the layer found as the feature browser's scan
   does, :func:`convlens.features.scan.probe_layers`: a saturating activation such as ReLU6 is read
   before its clip). Each patch is a square of ``clamp(3 * stride, 32, image)`` pixels centred
   on the strongest unit's place on the grid, ``((y + 1/2) H / h, (x + 1/2) W / w)``: the last
   feature map's receptive field is the whole image (851 px for EfficientNet-Lite0 at 224 px),
   so cutting it, as the browser does, would show whole images, and measuring it
   (:func:`convlens.features.receptive_field.receptive_field`) costs more than the rest of this
   stage. No projection (deconvnet) is computed: that would cost a backward pass per patch.
2. **Where each wrong-way channel fires** in the cluster's representative images: the channel's
   activation map divided by its strongest unit over its top images (so 1 means "as strongly
   as anywhere in the data set"), clipped to [0, 1] and overlaid on the image.
3. **Maps** of the representatives: the explanation panel of ``analyze`` when the image was
   examined, else a Grad-CAM map of the predicted class (one batch for all of them).

Cost: one forward pass over at most ``k`` images per shown channel plus the representatives
(at most 3 per cluster), whatever the size of the data set, and one Grad-CAM batch over the
representatives not examined.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from convlens.atomic import atomic_write_bytes
from convlens.console import printable

if TYPE_CHECKING:
    from PIL import Image

    from convlens.analysis.failure_modes import FailureMode
    from convlens.analysis.store import Prediction
    from convlens.architecture import LayerRef
    from convlens.models.base import ConvlensModel
    from convlens.tokens import TokenLayout

__all__ = ["EVIDENCE_FILE", "PATCHES", "SHOWN_CHANNELS", "channel_evidence", "shown_channels"]

log = logging.getLogger(__name__)

SHOWN_CHANNELS = 3
"""Wrong-way (and distinguishing) channels shown per cluster."""
PATCHES = 6
"""Top activating patches per channel."""
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
        predictions: every prediction of the run.
        features: pooled features by image id (the top images of each channel are those of
            its highest pooled activation; the effect sizes of the shown channels).
        examined: explanation panels of the examined mistakes, by image id.
        out: the run folder; images go under ``out/failure_modes/``.
        batch_size: images per forward pass.

    Returns:
        The ``evidence`` entry of ``metrics["failure_modes"]``: ``channels`` (per channel its
        patches: image id, activation, box in model-input pixels, and its image file),
        ``fires`` (per representative and wrong-way channel, the overlay's file), ``maps``
        (per representative, its explanation panel or Grad-CAM file), ``effect_sizes`` (per
        cluster rank and shown channel, Cohen's d of its mistakes against the correct images
        of the same true classes), ``ranked_over``, ``forward_images``, ``patch_pixels``.
        Paths are relative to ``out``. Nothing is recomputed when the same channels, top
        images, representatives and panels were shown by an earlier run of the folder and its
        files are all there (kept in :data:`EVIDENCE_FILE`): a resumed run calls no model.
    """
    from convlens.errors import ConvlensError

    try:
        return _evidence(model, layer, modes, predictions, features, examined, out, batch_size)
    except ConvlensError as exc:  # a layer the scan or the receptive field cannot handle
        log.warning("failure-mode pages without patches or channel maps: %s", exc)
        return _without_evidence(layer, str(exc))
    except Exception as exc:  # the pages are an extra: a bug here must not end analyze
        log.warning(
            "failure-mode pages without patches or channel maps (unexpected error): %s: %s",
            type(exc).__name__,
            exc,
            exc_info=True,
        )
        return _without_evidence(layer, f"unexpected error: {type(exc).__name__}: {exc}")


def _without_evidence(layer: LayerRef, note: str) -> dict[str, Any]:
    """The evidence entry of pages without patches or maps: ``skipped`` is the page's note."""
    return {"layer": str(layer), "skipped": note, "channels": {}, "fires": {}, "maps": {}}


def _evidence(
    model: ConvlensModel,
    layer: LayerRef,
    modes: Sequence[FailureMode],
    predictions: Sequence[Prediction],
    features: Mapping[str, np.ndarray],
    examined: Mapping[str, Path],
    out: Path,
    batch_size: int,
) -> dict[str, Any]:
    from convlens.features.scan import probe_layers
    from convlens.hooks.state import model_state

    by_id = {p.id: p for p in predictions}
    channels: list[int] = []
    for m in modes:
        push, distinct = shown_channels(m)
        channels += push + distinct
    channels = list(dict.fromkeys(channels))
    evidence: dict[str, Any] = {"layer": str(layer), "channels": {}, "fires": {}, "maps": {}}
    if not channels:
        return evidence
    crop = model.preprocess.crop
    # the top images of each channel by its pooled activation, over every image with features
    ranked = sorted(i for i in features if i in by_id)
    index = np.asarray(channels)
    shown = np.stack([features[i][index] for i in ranked]) if ranked else np.zeros((0, 0))
    top: dict[int, list[str]] = {}
    for n, c in enumerate(channels):
        order = np.lexsort((np.arange(len(ranked)), -shown[:, n]))[:PATCHES]
        top[c] = [ranked[int(k)] for k in order]
    reps: dict[str, list[int]] = {}
    for m in modes:
        push, _ = shown_channels(m)
        for i in m.representatives:
            if i in by_id:
                reps[i] = list(dict.fromkeys([*reps.get(i, []), *push]))
    folder = out / "failure_modes"
    key = {
        "model": model.name,
        "layer": str(layer),
        "crop": crop,
        "ranked_over": len(ranked),
        "top": {str(c): ids for c, ids in top.items()},
        "reps": reps,
        "panels": {i: examined[i].name for i in reps if i in examined},
    }
    kept = _kept(folder / EVIDENCE_FILE, key, out)
    if kept is not None:
        kept["effect_sizes"] = _effect_sizes(modes, predictions, features)
        return kept
    with model_state(model.net, eval_mode=True, grads=False), torch.no_grad():
        probed = probe_layers(model.net, {str(layer): layer}, (crop, crop))[str(layer)]
    source = probed.source
    _, _, h, w = probed.shape
    stride = (crop / h, crop / w)
    side = (
        min(crop, max(round(3 * stride[0]), _MIN_WINDOW)),
        min(crop, max(round(3 * stride[1]), _MIN_WINDOW)),
    )
    needed = list(dict.fromkeys([i for c in channels for i in top[c]] + list(reps)))
    units: dict[str, torch.Tensor] = {}
    acts = _feature_maps(
        model, source, [by_id[i] for i in needed], channels, units, batch_size, probed.layout
    )
    evidence.update(
        ranked_over=len(ranked),
        forward_images=len(acts),
        patch_pixels=list(side),
        input_pixels=[crop, crop],
        grid_stride=[round(stride[0], 3), round(stride[1], 3)],
        source=str(source),
    )
    col = {c: n for n, c in enumerate(channels)}
    strongest = _patches(evidence, top, acts, col, units, stride, side, features, folder)
    _fires(evidence, reps, acts, col, strongest, units, folder)
    _maps(
        evidence, model, [by_id[i] for i in reps if i in units], examined, units, folder, batch_size
    )
    from convlens.atomic import atomic_write_text

    atomic_write_text(folder / EVIDENCE_FILE, json.dumps({"key": key, "evidence": evidence}))
    evidence["effect_sizes"] = _effect_sizes(modes, predictions, features)
    return evidence


EVIDENCE_FILE = "evidence.json"
"""What the pages showed last, under ``RUN_DIR/failure_modes/``, with what it was made for."""


def _kept(path: Path, key: Mapping[str, Any], out: Path) -> dict[str, Any] | None:
    """The evidence kept in ``path`` if it was made for ``key`` and its image files are all
    complete, else ``None``."""
    from convlens.atomic import is_complete

    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["key"] != json.loads(json.dumps(key)):
            return None
        evidence = dict(kept["evidence"])
        files = [c["image"] for c in evidence["channels"].values()]
        files += [f for fires in evidence["fires"].values() for f in fires.values()]
        files += [m["image"] for m in evidence["maps"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return evidence if all(is_complete(out / f) for f in files) else None


def _feature_maps(
    model: ConvlensModel,
    source: LayerRef,
    images: Sequence[Prediction],
    channels: Sequence[int],
    units: dict[str, torch.Tensor],
    batch_size: int,
    layout: TokenLayout | None = None,
) -> dict[str, torch.Tensor]:
    """The maps of ``channels`` at ``source`` (``(len(channels), h, w)`` per image id, on the
    CPU) by one forward pass over ``images``; their [0, 1] pixels go to ``units``. The output
    of a token layer (``layout``, from :func:`convlens.features.scan.probe_layers`) is first
    mapped to ``(B, C, h, w)`` (:meth:`convlens.tokens.TokenLayout.to_maps`). Unreadable
    images are left out (a warning)."""
    from convlens.errors import ImageError
    from convlens.hooks.capture import layer_capture
    from convlens.hooks.state import model_state
    from convlens.images import load_image

    dtype = next((q.dtype for q in model.net.parameters()), torch.float32)
    index = torch.tensor(list(channels))
    out: dict[str, torch.Tensor] = {}
    for s in range(0, len(images), batch_size):
        chunk = []
        for p in images[s : s + batch_size]:
            try:
                units[p.id] = model.preprocess.to_unit(load_image(p.path))
                chunk.append(p)
            except ImageError as exc:
                log.warning(
                    "cannot re-read %s for the failure-mode pages: %s",
                    printable(p.path),
                    printable(str(exc)),
                )
        if not chunk:
            continue
        x = model.preprocess.normalize(torch.stack([units[p.id] for p in chunk]))
        x = x.to(device=model.device, dtype=dtype)
        with (
            model_state(model.net, eval_mode=True, grads=False),
            torch.no_grad(),
            layer_capture(model.net, source.name) as cap,
        ):
            model.net(x)
        captured = cap.output(source.call)
        if layout is not None:
            captured = layout.to_maps(captured)
        maps = captured.float().cpu()[:, index]
        for n, p in enumerate(chunk):
            out[p.id] = maps[n]
    return out


def _patches(
    evidence: dict[str, Any],
    top: Mapping[int, Sequence[str]],
    acts: Mapping[str, torch.Tensor],
    col: Mapping[int, int],
    units: Mapping[str, torch.Tensor],
    stride: tuple[float, float],
    side: tuple[int, int],
    features: Mapping[str, np.ndarray],
    folder: Path,
) -> dict[int, float]:
    """Each channel's top patches as one strip PNG (``channels/c<channel>.png``): around the
    strongest unit of each of its top images, a ``side`` box centred on the unit's place on
    the grid (``((y + 1/2) stride_y, (x + 1/2) stride_x)``), clipped to the image. Returns each
    channel's strongest unit over those images (for the "where it fires" maps)."""
    from PIL import Image

    from convlens.render.overlay import to_pil

    strongest: dict[int, float] = {}
    for c, ids in top.items():
        tiles: list[Image.Image] = []
        patches = []
        for i in ids:
            if i not in acts:
                continue
            a = acts[i][col[c]]
            flat = int(torch.argmax(a))
            y, x = divmod(flat, a.shape[1])
            value = float(a.reshape(-1)[flat])
            img = units[i]
            hh, ww = img.shape[1:]
            cy, cx = (y + 0.5) * stride[0], (x + 0.5) * stride[1]
            t = round(min(max(cy - side[0] / 2, 0), hh - side[0]))
            left = round(min(max(cx - side[1] / 2, 0), ww - side[1]))
            b, r = t + side[0], left + side[1]
            tile = to_pil(img[:, t:b, left:r]).resize((_TILE, _TILE), Image.Resampling.BICUBIC)
            tiles.append(tile)
            patches.append(
                {
                    "id": i,
                    "pooled": float(features[i][c]),
                    "value": value,
                    "unit": [y, x],
                    "box": [t, left, b, r],
                }
            )
            strongest[c] = max(strongest.get(c, 0.0), value)
        if not tiles:
            continue
        strip = Image.new("RGB", (len(tiles) * (_TILE + 4) - 4, _TILE), "white")
        for n, tile in enumerate(tiles):
            strip.paste(tile, (n * (_TILE + 4), 0))
        rel = f"failure_modes/channels/c{c}.png"
        _png(strip, folder.parent / rel)
        evidence["channels"][str(c)] = {"patches": patches, "image": rel}
    return strongest


def _fires(
    evidence: dict[str, Any],
    reps: Mapping[str, Sequence[int]],
    acts: Mapping[str, torch.Tensor],
    col: Mapping[int, int],
    strongest: Mapping[int, float],
    units: Mapping[str, torch.Tensor],
    folder: Path,
) -> None:
    """Where each cluster's wrong-way channels fire on its representatives: the channel's map
    over its strongest unit among its top images, clipped to [0, 1], on the image."""
    from convlens.render.overlay import overlay_map

    for i, chans in reps.items():
        if i not in acts:
            continue
        files = {}
        for c in chans:
            heat = (acts[i][col[c]] / max(strongest.get(c, 0.0), 1e-12)).clamp(0, 1)
            image = overlay_map(heat, units[i], alpha=0.5).resize((_FIRE, _FIRE))
            rel = f"failure_modes/fires/{i}-c{c}.png"
            _png(image, folder.parent / rel)
            files[str(c)] = rel
        evidence["fires"][i] = files


def _maps(
    evidence: dict[str, Any],
    model: ConvlensModel,
    reps: Sequence[Prediction],
    examined: Mapping[str, Path],
    pixels: Mapping[str, torch.Tensor],
    folder: Path,
    batch_size: int,
) -> None:
    """The explanation panel of each examined representative, a Grad-CAM map of the others."""
    from convlens.api import explain
    from convlens.methods.options import build_methods
    from convlens.render.overlay import overlay_map

    gradcam = build_methods({"gradcam": {}})["gradcam"]

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
        units = torch.stack([pixels[p.id] for p in chunk])
        x = model.preprocess.normalize(units).to(device=model.device, dtype=dtype)
        target = torch.tensor([p.pred for p in chunk], device=model.device)
        exp = next(iter(explain(model, x, [gradcam], target=target).values()))
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
