"""Benchmark the Zeiler & Fergus feature browser on a folder of real images.

Runs ``convlens.features.scan_features`` (one streaming pass over the images, all layers hooked
in one forward per batch) and ``render_features`` (deconvnet or guided projections of every top
activation, receptive-field crops, grid PNGs and ``index.html``) with the default model, and
prints images/second for the scan and seconds for rendering. Appends (or, on a rerun the same day
and device, replaces) its own section of ``benchmarks/RESULTS.md``, and can save downscaled copies
of the grids for the documentation.

Example:
    python benchmarks/bench_features.py                          # lite0, 3 layers, CPU
    python benchmarks/bench_features.py --rules guided --docs    # also refresh docs/img/*.png
    python benchmarks/bench_features.py --device cuda --workers 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

import convlens
from convlens.features import render_features, scan_features
from convlens.hooks import model_state
from convlens.images import list_images

import _common as common

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_TITLE = "# convlens benchmark results"
# (layer, role): early, middle and the last call of the head activation (7x7x1280).
LAYERS = (("_blocks.1", "early"), ("_blocks.8", "middle"), ("_swish", "last"))
DOCS_LIMIT = 300_000  # bytes per documentation image


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lite0")
    p.add_argument("--data", type=Path, default=common.default_data())
    p.add_argument("--layers", nargs="+", default=[name for name, _ in LAYERS])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--top", type=int, default=9)
    p.add_argument("--num-channels", type=int, default=16)
    p.add_argument(
        "--rules",
        nargs="+",
        default=["deconvnet", "guided"],
        choices=["deconvnet", "guided"],
        help="projection rules to render (each into its own folder)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--grids", type=Path, default=Path("benchmarks/out/features"))
    p.add_argument(
        "--docs",
        action="store_true",
        help="save the grids of the last rule, downscaled, as docs/img/features_{early,middle,"
        "last}.png",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def forward_rate(model: convlens.ConvlensModel, batch: int, device: torch.device) -> float:
    """Images/second of a plain batched forward pass on random inputs (reference)."""
    crop = model.preprocess.crop
    x = torch.randn(batch, 3, crop, crop, device=device)
    with model_state(model.net, eval_mode=True, grads=False), torch.no_grad():
        model.net(x)
        common.sync(device)
        start = time.perf_counter()
        model.net(x)
        common.sync(device)
    return batch / (time.perf_counter() - start)


def save_small(src: Path, dst: Path, limit: int = DOCS_LIMIT) -> tuple[int, tuple[int, int]]:
    """Copy a PNG as a 256-colour PNG, shrinking it until the file is at most ``limit`` bytes."""
    with Image.open(src) as im:
        img = im.convert("RGB")
    scale = 1.0
    while True:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        small = img if scale == 1.0 else img.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
        if buf.tell() <= limit or scale < 0.2:
            break
        scale *= 0.95
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())
    return buf.tell(), small.size


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    files = list_images(args.data)
    if not files:
        print(f"no images in {args.data}", file=sys.stderr)
        return 2
    load_before = common.load_average()
    model = convlens.load_model(args.model, device=device)
    reference = forward_rate(model, args.batch_size, device)

    start = time.perf_counter()
    scan = scan_features(
        model,
        files,
        args.layers,
        top=args.top,
        num_channels=args.num_channels,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=False,
    )
    common.sync(device)
    scan_seconds = time.perf_counter() - start
    rate = scan.scanned / scan_seconds
    print(
        f"scan: {scan.scanned} images ({len(scan.skipped)} skipped), {len(args.layers)} layers, "
        f"{scan_seconds:.1f} s = {rate:.1f} images/s "
        f"(plain forward of batch {args.batch_size}: {reference:.1f} images/s)"
    )

    renders: list[tuple[str, float, list[Path]]] = []
    for rule in args.rules:
        folder = args.grids / rule
        start = time.perf_counter()
        written = render_features(scan, model, folder, rule=rule, batch_size=args.batch_size)
        common.sync(device)
        seconds = time.perf_counter() - start
        renders.append((rule, seconds, written))
        print(f"render ({rule}): {seconds:.1f} s -> {folder / 'index.html'}")
    load_after = common.load_average()

    docs: list[str] = []
    if args.docs and renders:
        pngs = [p for p in renders[-1][2] if p.suffix == ".png"]
        roles = dict(LAYERS)
        for layer, png in zip(scan.layers, pngs, strict=True):
            role = roles.get(layer)
            if role is None:
                continue
            dst = common.REPO / "docs" / "img" / f"features_{role}.png"
            nbytes, size = save_small(png, dst)
            rel = dst.relative_to(common.REPO)
            docs.append(f"`{rel}` ({size[0]}x{size[1]}, {nbytes // 1000} kB)")
            print(f"docs: {dst} {size[0]}x{size[1]} {nbytes // 1000} kB")

    date = dt.datetime.now(dt.timezone.utc)
    heading = common.section_heading(
        f"{date:%Y-%m-%d}", device, label="feature browser", threads=False
    )
    per_layer = ", ".join(
        f"`{name}` {info.shape[0]}x{info.shape[1]}x{info.shape[2]}"
        + (f" (ranked before its clip at {info.clip:g})" if info.clip is not None else "")
        for name, info in scan.layers.items()
    )
    lines = [
        heading,
        "",
        "Produced by `benchmarks/bench_features.py`.",
        "",
        common.date_line(date),
        common.machine_line(device),
        f"- command: `{common.command_line()}`",
        f"- model {args.model}; {scan.scanned} images in `{Path(args.data).name}`; layers "
        f"{per_layer}; top {args.top}, {args.num_channels} channels per layer (auto); batch "
        f"{args.batch_size}, {args.workers} loader workers",
        common.load_line((load_before, load_after)),
        "",
        "| step | seconds | images/s | notes |",
        "|---|---:|---:|---|",
        f"| scan (decode + preprocess + one forward per batch, all layers) | {scan_seconds:.1f} "
        f"| {rate:.1f} | plain forward alone: {reference:.1f} images/s |",
    ]
    for rule, seconds, written in renders:
        units = sum(len(info.channels) for info in scan.layers.values()) * args.top
        lines.append(
            f"| render, {rule} ({units} projections, receptive fields, PNGs, HTML) "
            f"| {seconds:.1f} | | {len(written) - 1} grids |"
        )
    if docs:
        lines += ["", f"Documentation images ({renders[-1][0]}): " + ", ".join(docs) + "."]
    section = "\n".join(lines) + "\n"
    print()
    print(section)
    if not args.no_write:
        common.write_section(args.out, heading, section, title=RESULTS_TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
