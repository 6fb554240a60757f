"""Benchmark class model visualisation: are the images convincing, to this and another network?

For ``--n`` ImageNet classes drawn at random (``--class-seed``), synthesise one image per class
with the generating model (default ``lite0``) and a preset (default ``readable``), all classes
in one batch, then report per class

- the probability the generating model gives the class on the final image (goal >= 0.9), and
- whether a *different* network (default EfficientNet-Lite1, 240x240 input) ranks the class in
  its top 5: the 224 image is resized to 240 bilinearly and normalised with the Lite1 mean/std
  (0.5, 0.5) (goal: at least 5 of 10), which tests whether the image shows the class rather
  than an adversarial pattern of one network;

and the speed (optimisation steps per second; images per second = steps x classes x transform
samples / s). Writes a markdown section into ``benchmarks/RESULTS.md`` (re-read right before
writing; only this script's section of the same date and device is replaced).

    python benchmarks/bench_synthesis.py                         # ~5-10 min on 2 CPU cores
    python benchmarks/bench_synthesis.py --steps 64 --no-write   # quick look
    python benchmarks/bench_synthesis.py --grid docs/img/classviz_grid.png
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import convlens
from convlens.synthesis import PRESETS, class_visualization

import _common as common

ROOT = Path(__file__).resolve().parent
TITLE = "Class model visualisation (bench_synthesis.py)"
RESULTS_TITLE = "# convlens benchmark results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lite0", help="generating model")
    p.add_argument("--transfer-model", default="lite1", help="independent judge")
    p.add_argument("--n", type=int, default=10, help="number of random classes")
    p.add_argument("--class-seed", type=int, default=0, help="seed of the class draw")
    p.add_argument("--classes", nargs="*", default=None, help="explicit classes instead")
    p.add_argument("--preset", default="readable", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--samples", type=int, default=None, help="override transform samples")
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared 2-core machine two OpenMP threads\n"
        "spin-wait for each other and run 2-5x slower than one); 0 keeps torch's default",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--grid", type=Path, default=None, help="also save the captioned grid PNG")
    return p.parse_args(argv)


def pick_classes(n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(1000), n))


def save_small_png(image, path: Path, max_bytes: int = 250_000) -> int:
    """Save ``image`` as PNG under ``max_bytes``: quantise to 256 colours, then shrink."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = image.convert("RGB")
    while True:
        q = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        q.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or min(img.size) < 64:
            path.write_bytes(buf.getvalue())
            return buf.tell()
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = convlens.load_model(args.model, device=args.device)
    judge = convlens.load_model(args.transfer_model, device=args.device)
    classes = (
        [model.classes.index(c) for c in args.classes]
        if args.classes
        else pick_classes(args.n, args.class_seed)
    )
    names = [model.classes.short(c) for c in classes]
    print(
        f"classes (seed {args.class_seed}): "
        + ", ".join(f"{c} {n}" for c, n in zip(classes, names, strict=True))
    )
    pairs = (
        ("steps", args.steps),
        ("samples", args.samples),
        ("lr", args.lr),
        ("batch_size", args.batch_size),
    )
    overrides = {k: v for k, v in pairs if v is not None}
    load_before = common.load_average()
    start = time.perf_counter()
    res = class_visualization(
        model, classes, preset=args.preset, seed=args.seed, progress=True, **overrides
    )
    total = time.perf_counter() - start
    load_after = common.load_average()

    size = judge.preprocess.crop
    with torch.no_grad():
        x = F.interpolate(res.images, size=(size, size), mode="bilinear", align_corners=False)
        probs = torch.softmax(
            judge.net(judge.preprocess.normalize(x).to(args.device)).float(), 1
        ).cpu()
    ranks = (probs > probs[torch.arange(len(classes)), torch.tensor(classes)][:, None]).sum(1) + 1
    top1 = probs.argmax(1)

    rows = []
    for i, c in enumerate(classes):
        rows.append(
            f"| {c} | {names[i]} | {float(res.probabilities[i]):.3f} | "
            f"{float(probs[i, c]):.3f} | {int(ranks[i])} | {'yes' if ranks[i] <= 5 else 'no'} | "
            f"{judge.classes.short(int(top1[i]))} |"
        )
    confident = int((res.probabilities >= 0.9).sum())
    transfer = int((ranks <= 5).sum())
    s = res.settings
    samples = s["samples"]
    steps = s["steps"]
    ips = steps * len(classes) * samples / res.seconds
    now = datetime.now(timezone.utc)
    heading = f"## {TITLE}: {now:%Y-%m-%d} UTC, {args.device} ({platform.machine()})"
    settings = ", ".join(f"{k}={v}" for k, v in s.items())
    judge_name = args.transfer_model
    lines = [
        common.date_line(now),
        common.machine_line(args.device, processor_name=platform.machine()),
        f"- command: `{common.command_line(argv, script='benchmarks/bench_synthesis.py')}`",
        f"- generating model: {args.model}; judge: {judge_name} (the 224 image resized "
        f"bilinearly to {size}, mean/std 0.5)",
        f"- classes: {len(classes)}, drawn with `random.Random({args.class_seed})"
        f".sample(range(1000), {args.n})`, all optimised in one batch",
        f"- settings: preset `{args.preset}`; {settings}",
        f"- 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        f"({os.cpu_count()} cores; higher means the CPU was shared and timings are slower)",
        "",
        f"| class | name | p ({args.model}) | p ({judge_name}) | rank ({judge_name}) | "
        f"top-5 | {judge_name} top-1 |",
        "|---:|---|---:|---:|---:|---|---|",
        *rows,
        "",
        f"**{confident}/{len(classes)}** classes with p >= 0.9 on {args.model}; "
        f"**{transfer}/{len(classes)}** in the top 5 of {judge_name} "
        "(goals: all, and at least half).",
        "",
        "| steps | optimisation (s) | steps/s | images/s (steps x classes x samples / s) "
        "| whole call (s) |",
        "|---:|---:|---:|---:|---:|",
        f"| {steps} | {res.seconds:.0f} | {res.steps_per_second:.3f} | {ips:.2f} | {total:.0f} |",
    ]
    body = "\n".join(lines)
    print(body)
    if args.grid is not None:
        nbytes = save_small_png(res.grid(ncols=5, cell=160), args.grid)
        print(f"wrote {args.grid} ({nbytes / 1000:.0f} kB)")
    if not args.no_write:
        common.write_section(args.out, heading, f"{heading}\n\n{body}", title=RESULTS_TITLE)
        print(f"wrote section to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
