"""Known-cause benchmark: do the maps point at what decided the class?

Images from :func:`convlens.synthesis.known_cause.known_cause_batch` (64 x 64; the class is the
shape of one object drawn on clutter with distractor shapes) are classified by a tiny CNN and a
tiny ViT (:mod:`convlens.synthesis.tiny_models`). Every registered method
(``convlens.list_methods()``) and two baselines that know nothing of the model (a seeded random
map and a centred Gaussian, :func:`convlens.metrics.baseline_map`) explain the true class of
held-out images, and each map is scored with

- the pointing game (Zhang et al. 2016): the map's maximum inside the object's box (and,
  stricter, within 2 pixels of the shape's own pixels), and
- the energy share (Wang et al. 2020): the share of the map's positive mass inside the object's
  box (:func:`convlens.metrics.energy_share`).

A method that refuses a model (a :class:`convlens.ConvlensError`) is listed as ``refused`` with
its one-line reason. Each method runs on one image, then on chunks of up to 16 images sized to
what is left of ``--budget`` seconds per model, until ``--n`` images (and at least 16), so the
slow perturbation methods are scored on fewer images (the ``n`` column). Methods run with
default options except occlusion, whose default 32-pixel patch is half the image here:
``patch=8, stride=4``.

The networks are trained by :func:`convlens.synthesis.tiny_models.train_known_cause` (fresh
batches every step, seeds disjoint from the held-out ones) with one torch thread, and stored as
float16 state dicts in ``benchmarks/known_cause/`` (the script evaluates the float16-rounded
weights it stores). With the stored files present they are loaded, not retrained; ``--train``
retrains and rewrites them (deterministic for a torch version and thread count):

    python benchmarks/bench_known_cause.py --train        # retrain (~5 min) and measure
    python benchmarks/bench_known_cause.py                # measure (~5 min on a busy CPU)
    python benchmarks/bench_known_cause.py --n 32 --no-write

The table is written into ``docs/known_cause.md`` (the section of the same date and device is
replaced).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import convlens
from convlens.metrics import baseline_map, boxes_to_masks, energy_share, pointing_game
from convlens.synthesis.known_cause import SHAPES, known_cause_batch
from convlens.synthesis.tiny_models import ARCHITECTURES, tiny_model, train_known_cause

import _common as common

log = logging.getLogger("bench_known_cause")

CHECKPOINTS = common.REPO / "benchmarks" / "known_cause"
OUT = common.REPO / "docs" / "known_cause.md"
HELD_OUT_SEED = 10**9
"""Held-out images are ``known_cause_batch(n, seed=HELD_OUT_SEED)``; training batches use seeds
below 10**8."""
TRAINING = {"cnn": {"steps": 300, "lr": 3e-3}, "vit": {"steps": 1000, "lr": 2e-3}}
"""Training settings per architecture (batch 64, weight decay 0.05, 50 warm-up steps)."""
OPTIONS = {"occlusion": {"patch": 8, "stride": 4}}
"""Options other than the defaults (scaled to 64-pixel images)."""
TOLERANCE = 2
CHUNK = 16
MIN_IMAGES = 16
"""Every method is scored on at least this many images, whatever the budget."""
TITLE = "# Known-cause benchmark"
INTRO = (
    "Do the maps point at what decided the class? On the images of "
    "`convlens.synthesis.known_cause` the class is the shape of one object (disc, square, "
    "triangle, cross, ring) drawn at a random place and size on clutter with smaller distractor "
    "shapes of every kind and colour, so the cause of each prediction is known. A tiny CNN "
    "(GAP + linear head) and a tiny ViT (timm layout, class token) are trained on them by "
    "`benchmarks/bench_known_cause.py` (weights in `benchmarks/known_cause/`); every registered "
    "method explains the true class of held-out images.\n\n"
    "- **pointing**: the map's maximum lies in the object's box (the pointing game of Zhang et "
    "al. 2016, 'Top-down Neural Attention by Excitation Backprop'); **on shape**: within "
    f"{TOLERANCE} pixels of the shape's own pixels (stricter: the hole of a ring and the "
    "corners of a triangle's box do not count).\n"
    "- **energy**: the share of the map's positive mass inside the object's box (the "
    "energy-based pointing game of Wang et al. 2020, Score-CAM); a uniform map scores the box's "
    "share of the image area.\n"
    "- **s/img**: wall seconds per image of the method call; **n**: images scored (slow "
    "methods get fewer within the time budget).\n"
    "- *(random)* and *(centre)*: maps that know nothing of the model (seeded uniform noise; a "
    "centred Gaussian).\n"
    "- *refused*: the method declined the model with a one-line `ConvlensError`."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", action="store_true", help="retrain and rewrite the checkpoints")
    p.add_argument("--n", type=int, default=160, help="held-out images per model")
    p.add_argument("--budget", type=float, default=30.0, help="seconds per method and model")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods")
    p.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=OUT, help="markdown file")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def checkpoint_path(arch: str) -> Path:
    return CHECKPOINTS / f"tiny_{arch}.pt"


def shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it."""
    return str(path.relative_to(common.REPO) if path.is_relative_to(common.REPO) else path)


def load_or_train(arch: str, train: bool) -> tuple[nn.Module, str]:
    """The network (float32, eval mode) and a note on where it came from."""
    path = checkpoint_path(arch)
    net = tiny_model(arch)
    if path.exists() and not train:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return net.eval(), f"loaded `{shown(path)}`"
    torch.manual_seed(0)
    net = tiny_model(arch)
    settings = TRAINING[arch]
    start = time.perf_counter()
    losses = train_known_cause(net, settings["steps"], lr=settings["lr"], seed=0)
    seconds = time.perf_counter() - start
    half = {
        k: v.detach().half() if v.is_floating_point() else v for k, v in net.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, path)
    net.load_state_dict({k: v.float() for k, v in half.items()})
    note = (
        f"trained {settings['steps']} steps in {seconds:.0f} s (final loss "
        f"{sum(losses[-20:]) / 20:.3f}), stored in `{shown(path)}`"
    )
    log.info("%s: %s", arch, note)
    return net.eval(), note


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def score(maps: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    box_masks = boxes_to_masks(boxes, tuple(maps.shape[-2:]))
    return {
        "pointing": pointing_game(maps, box_masks, tolerance=0).float(),
        "mask": pointing_game(maps, masks, tolerance=TOLERANCE).float(),
        "energy": energy_share(maps, box_masks),
    }


def run_method(
    name: str, net: nn.Module, data: tuple[torch.Tensor, ...], budget: float
) -> dict[str, object]:
    """Scores of one method on chunks of the held-out images within ``budget`` seconds."""
    method = convlens.get_method(name, **OPTIONS.get(name, {}))
    parts: dict[str, list[torch.Tensor]] = {}
    seconds, n, layer, warned = 0.0, 0, None, set()
    images, labels, masks, boxes = data
    while n < len(images) and (n < MIN_IMAGES or seconds < budget):
        # one image first, then chunks sized to what is left of the budget
        if n == 0:
            size = 1
        else:
            left = int(max(budget - seconds, 0.0) * n / max(seconds, 1e-9))
            size = min(CHUNK, max(left, MIN_IMAGES - n, 1))
        sl = slice(n, n + size)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                exp = method(net, images[sl], labels[sl])
                seconds += time.perf_counter() - start
        except convlens.ConvlensError as e:
            return {"refused": str(e).splitlines()[0]}
        except Exception as e:
            return {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        warned.update(type(w.message).__name__ for w in caught)
        layer = exp.layer
        for k, v in score(exp.maps[:, 0], masks[sl], boxes[sl]).items():
            parts.setdefault(k, []).append(v)
        n += exp.maps.shape[0]
    out: dict[str, object] = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
    out.update(n=n, seconds=seconds / n, layer=layer, warnings=sorted(warned))
    return out


def run_baselines(data: tuple[torch.Tensor, ...]) -> dict[str, dict[str, object]]:
    images, _, masks, boxes = data
    rows = {}
    for kind in ("random", "centre"):
        maps = baseline_map(kind, images.shape[0], tuple(images.shape[-2:]), seed=0)
        rows[f"({kind})"] = {
            **{k: float(v.mean()) for k, v in score(maps, masks, boxes).items()},
            "n": images.shape[0],
            "seconds": 0.0,
            "layer": None,
            "warnings": [],
        }
    return rows


def cell(row: dict[str, object] | None) -> list[str]:
    if row is None:
        return ["", "", "", "", ""]
    for kind in ("refused", "failed"):
        if kind in row:
            return [f"{kind} (notes)", "", "", "", ""]
    return [
        f"{100 * row['pointing']:.0f}",
        f"{100 * row['mask']:.0f}",
        f"{row['energy']:.2f}",
        f"{row['seconds']:.3f}",
        str(row["n"]),
    ]


def table(results: dict[str, dict[str, dict[str, object]]], archs: list[str]) -> str:
    names = list(dict.fromkeys(m for a in archs for m in results[a]))
    head = "| method | " + " | ".join(
        f"{a} pointing % | {a} on shape % | {a} energy | {a} s/img | {a} n" for a in archs
    )
    lines = [head + " |", "|---|" + "---:|---:|---:|---:|---:|" * len(archs)]
    for m in names:
        cells = [c for a in archs for c in cell(results[a].get(m))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(results: dict[str, dict[str, dict[str, object]]], archs: list[str]) -> list[str]:
    out = []
    for a in archs:
        for m, r in results[a].items():
            for kind in ("refused", "failed"):
                if kind in r:
                    out.append(f"- {m} on the {a}, {kind}: {r[kind]}")
    for a in archs:
        layers = {m: r["layer"] for m, r in results[a].items() if r.get("layer")}
        if layers:
            out.append(f"- {a}, layers used: " + ", ".join(f"{m} `{v}`" for m, v in layers.items()))
        warned = {m: r["warnings"] for m, r in results[a].items() if r.get("warnings")}
        if warned:
            out.append(
                f"- {a}, warnings: " + ", ".join(f"{m} ({', '.join(w)})" for m, w in warned.items())
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.methods or ()) - set(convlens.list_methods()))
    if unknown:
        sys.stderr.write(f"unknown methods: {', '.join(unknown)}\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    load = [common.load_average(), math.nan]
    now = datetime.now(timezone.utc)
    batch = known_cause_batch(args.n, seed=HELD_OUT_SEED)
    data = (batch.images, batch.labels, batch.masks, batch.boxes)
    names = args.methods if args.methods else convlens.list_methods()
    results: dict[str, dict[str, dict[str, object]]] = {}
    model_lines = []
    for arch in args.archs:
        net, where = load_or_train(arch, args.train)
        acc = accuracy(net, batch.images, batch.labels)
        params = sum(p.numel() for p in net.parameters())
        model_lines.append(
            f"- tiny {arch}: {params} parameters, held-out accuracy {100 * acc:.1f}% on "
            f"{args.n} images; {where}"
        )
        log.info("%s: accuracy %.3f", arch, acc)
        rows: dict[str, dict[str, object]] = {}
        for name in names:
            rows[name] = run_method(name, net, data, args.budget)
            log.info("%s %s: %s", arch, name, rows[name])
        rows.update(run_baselines(data))
        results[arch] = rows
    load[1] = common.load_average()
    device = torch.device("cpu")
    heading = common.section_heading(f"{now:%Y-%m-%d}", device)
    section = "\n".join(
        [
            heading,
            "",
            f"- command: `{common.command_line(script='benchmarks/bench_known_cause.py')}`",
            common.date_line(now),
            common.machine_line(device, extra=f", convlens commit {common.git_commit()}"),
            common.load_line((load[0], load[1])),
            f"- held-out images: `known_cause_batch({args.n}, seed={HELD_OUT_SEED})`, "
            f"{len(SHAPES)} classes ({', '.join(SHAPES)}), 64 x 64; target: the true class",
            *model_lines,
            f"- options other than the defaults: {OPTIONS}; budget {args.budget:g} s per method "
            f"and model (at least {MIN_IMAGES} images each), chunks of up to {CHUNK} images",
            "",
            table(results, args.archs),
            "",
            *notes(results, args.archs),
        ]
    )
    sys.stdout.write(section + "\n")
    if not args.no_write:
        common.write_section(args.out, heading, section, title=TITLE, intro=INTRO)
    failed = any("failed" in r for rows in results.values() for r in rows.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
