"""Benchmark ``convlens analyze`` and check its figures against an independent recount.

What it does, in order (all in one temporary folder, removed at the end unless ``--keep``):

1. **A larger labelled set.** From the dev images (``labels.csv`` with ``file,label`` in
   ``--data``) it makes ``--images`` labelled JPEGs by deterministic augmentations that keep
   the label: the original file, a flip with a crop, a colour/brightness/contrast shift, a
   downscale to 45-70 %, and a crop + flip + colour shift (parameters drawn from a generator
   seeded by the image's index), listed in a CSV ``path,label``.
2. **Raw forward throughput**: the model's batched forward pass (``torch.inference_mode``) on
   pre-decoded inputs already on the device, timed before and after the prediction passes.
3. **The prediction pass of analyze** (``analyze(..., top_errors=0)``: JPEG decoding,
   preprocessing, thumbnails, batched inference, SQLite writes) for each ``--workers`` value,
   in images per second and as a fraction of the raw forward throughput; and the same pass fed
   with pre-decoded tensors (inference + store writes only), which shows whether decoding is
   the bottleneck.
4. **Independent recount**: top-1/top-5, per-class precision/recall/F1/support and the ranked
   confused pairs recomputed from the SQLite store with plain SQL and Python, compared with the
   reported metrics, on the larger set and on the 200 dev images. A mismatch exits with 1.
5. **Explanation cost**: seconds per examined image for each ``--methods`` entry, for the
   predicted and the true class, panel PNG included (what analyze does for each mistake).

Results are printed and written as a markdown section to ``benchmarks/RESULTS_ANALYZE.md``.

Example:
    python benchmarks/bench_analyze.py                     # CPU
    python benchmarks/bench_analyze.py --device cuda       # GPU, < 2 min on an H100
    python benchmarks/bench_analyze.py --quick --data path/to/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

import convlens
from convlens.accel.allocator import keep_freed_memory
from convlens.analysis import analyze
from convlens.analysis import run as run_module
from convlens.analysis.store import PredictionStore
from convlens.images import load_image
from convlens.methods.options import build_methods

import _common as common

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS_ANALYZE.md"
RESULTS_TITLE = "# convlens analyze benchmark results"
RESULTS_INTRO = (
    "Produced by `benchmarks/bench_analyze.py` (see `benchmarks/README.md`). One section per "
    "date and device; a rerun on the same date and device replaces its section.\n"
)
AUGMENTATIONS = ("original", "flip+crop", "colour shift", "downscale", "crop+flip+colour")


# --------------------------------------------------------------------------------------------
# The larger labelled set
# --------------------------------------------------------------------------------------------


def read_dev(data: Path) -> list[tuple[Path, int]]:
    """``(image, class index)`` of every row of ``data/labels.csv`` (``file,label``)."""
    with (data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [(data / row["file"], int(row["label"])) for row in csv.DictReader(fh)]


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    f = rng.uniform(0.75, 0.95)
    cw, ch = round(w * f), round(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))


def augment_one(job: tuple[int, str, int, str]) -> None:
    """Write augmented image ``i`` (kind ``kind``) of ``src`` to ``dst``; deterministic in i."""
    i, src, kind, dst = job
    if kind == 0:
        shutil.copyfile(src, dst)
        return
    rng = np.random.default_rng(i)
    with Image.open(src) as opened:
        img = ImageOps.exif_transpose(opened).convert("RGB")
    if kind == 1:
        img = ImageOps.mirror(_crop(img, rng))
    elif kind == 2:
        img = _colour(img, rng)
    elif kind == 3:
        f = rng.uniform(0.45, 0.7)
        img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)
    else:
        img = _colour(ImageOps.mirror(_crop(img, rng)), rng)
    img.save(dst, quality=90)


def make_set(dev: Sequence[tuple[Path, int]], n: int, folder: Path) -> Path:
    """``n`` labelled images from ``dev`` by deterministic augmentations; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    for i in range(n):
        src, label = dev[i % len(dev)]
        kind = (i // len(dev)) % len(AUGMENTATIONS)
        dst = folder / f"{i:05d}_{AUGMENTATIONS[kind].replace('+', '_').replace(' ', '_')}.jpg"
        jobs.append((i, str(src), kind, str(dst)))
        rows.append((dst.name, label))
    with Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        pool.map(augment_one, jobs, chunksize=8)
    out = folder / "set.csv"
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return out


# --------------------------------------------------------------------------------------------
# Independent recount from the SQLite store
# --------------------------------------------------------------------------------------------


def recount(db: Path) -> dict[str, Any]:
    """Top-1, top-5, per-class figures and ranked confused pairs from the store's rows.

    Plain SQL and Python, sharing no code with ``convlens.analysis.stats``.
    """
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT label, pred, top5 FROM predictions WHERE label IS NOT NULL"
        ).fetchall()
        pairs = conn.execute(
            "SELECT label, pred, COUNT(*) AS n FROM predictions "
            "WHERE label IS NOT NULL AND pred != label "
            "GROUP BY label, pred ORDER BY n DESC, label ASC, pred ASC"
        ).fetchall()
        support = dict(
            conn.execute(
                "SELECT label, COUNT(*) FROM predictions WHERE label IS NOT NULL GROUP BY label"
            ).fetchall()
        )
        predicted = dict(
            conn.execute(
                "SELECT pred, COUNT(*) FROM predictions WHERE label IS NOT NULL GROUP BY pred"
            ).fetchall()
        )
        hits = dict(
            conn.execute(
                "SELECT label, COUNT(*) FROM predictions WHERE label = pred GROUP BY label"
            ).fetchall()
        )
    n = len(rows)
    top1 = sum(1 for label, pred, _ in rows if label == pred) / n
    top5 = sum(1 for label, _, t in rows if label in json.loads(t)) / n
    per_class = {}
    for c in sorted(set(support) | set(predicted)):
        tp = hits.get(c, 0)
        p = tp / predicted[c] if predicted.get(c) else 0.0
        r = tp / support[c] if support.get(c) else 0.0
        per_class[c] = (p, r, 2 * p * r / (p + r) if p + r else 0.0, support.get(c, 0))
    return {"n": n, "top1": top1, "top5": top5, "per_class": per_class, "pairs": pairs}


def compare(metrics: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Differences between reported metrics and the recount (empty when they agree)."""
    bad = []
    close = lambda a, b: abs(a - b) <= 1e-12  # noqa: E731
    if metrics["labelled"] != ref["n"]:
        bad.append(f"labelled {metrics['labelled']} != {ref['n']}")
    for key in ("top1", "top5"):
        if not close(metrics[key], ref[key]):
            bad.append(f"{key} {metrics[key]} != {ref[key]}")
    got = {
        r["class"]: (r["precision"], r["recall"], r["f1"], r["support"])
        for r in metrics["per_class"]
    }
    if set(got) != set(ref["per_class"]):
        bad.append("per-class tables cover different classes")
    else:
        for c, row in ref["per_class"].items():
            if not all(close(a, b) for a, b in zip(got[c], row, strict=True)):
                bad.append(f"class {c}: {got[c]} != {row}")
    pairs = [(r["true"], r["pred"], r["count"]) for r in metrics["confused_pairs"]]
    if pairs != [tuple(p) for p in ref["pairs"]]:
        bad.append("confused pairs differ (membership, counts or ranking)")
    return bad


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def decode_all(model: convlens.ConvlensModel, paths: Sequence[Path]) -> tuple[torch.Tensor, float]:
    """Every image decoded and preprocessed in this process: (N, 3, H, W) and seconds."""
    start = time.perf_counter()
    x = torch.stack([model.preprocess(load_image(p)) for p in paths])
    return x, time.perf_counter() - start


def raw_forward(model: convlens.ConvlensModel, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Median seconds of one pass of the batched forward over ``x`` (already on the device)."""
    device = model.device
    times = []
    with torch.inference_mode():
        model.net.eval()
        model.net(x[:batch])
        common.sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                model.net(x[i : i + batch])
            common.sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class PassTimer:
    """Times the prediction pass (``run._infer``) inside a real ``analyze`` call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._original = run_module._infer

    def __enter__(self) -> PassTimer:
        def timed(*args: Any, **kwargs: Any) -> None:
            common.sync(self.device)
            start = time.perf_counter()
            self._original(*args, **kwargs)
            common.sync(self.device)
            self.seconds = time.perf_counter() - start

        run_module._infer = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> bool:
        run_module._infer = self._original  # type: ignore[assignment]
        return False


def predecoded_pass(
    model: convlens.ConvlensModel,
    x: torch.Tensor,
    items: Sequence[tuple[str, int]],
    batch: int,
    db: Path,
) -> float:
    """The analyze prediction loop fed with pre-decoded tensors: inference + store writes."""
    if model.device.type == "cuda":
        x = x.pin_memory()
    batches = [
        (list(range(i, min(i + batch, len(items)))), x[i : i + batch], [])
        for i in range(0, len(items), batch)
    ]
    with PredictionStore(db) as store:
        common.sync(model.device)
        start = time.perf_counter()
        run_module._predict_loop(model, store, items, batches)
        common.sync(model.device)
        return time.perf_counter() - start


def explain_cost(
    model: convlens.ConvlensModel,
    result: Any,
    methods: Sequence[str],
    k: int,
    batch: int,
    folder: Path,
) -> list[tuple[str, int, float, float, float]]:
    """``(method, images, seconds per image, of which in explain(), seconds per image of the
    faithfulness scoring)``: analyze's step per method.

    The panels are timed without the scoring (``faithfulness=False``): the rest of each image's
    time is reading the image and rendering its panel PNG. The scoring (deletion/insertion of
    the map and of a random map, on by default in analyze) is timed in a second run that finds
    the panels cached and only scores.
    """
    import convlens.api

    examined = run_module.select_examined(result.predictions, result.metrics, k)[:k]
    original = convlens.api.explain
    spent = [0.0]

    def timed(*a: Any, **kw: Any) -> Any:
        common.sync(model.device)
        start = time.perf_counter()
        out = original(*a, **kw)
        common.sync(model.device)
        spent[0] += time.perf_counter() - start
        return out

    out = []
    convlens.api.explain = timed  # type: ignore[assignment]
    try:
        for m in methods:
            instances = build_methods({m: {}})
            spent[0] = 0.0
            n = max(1, len(examined))
            seconds = []
            for score in (False, True):  # panels first, then (panels cached) the scoring
                common.sync(model.device)
                start = time.perf_counter()
                run_module._explain_errors(
                    model,
                    examined,
                    instances,
                    folder / m,
                    config=m,
                    batch_size=batch,
                    progress=False,
                    faithfulness=score,
                )
                common.sync(model.device)
                seconds.append((time.perf_counter() - start) / n)
                if not score:
                    in_explain = spent[0] / n
            out.append((m, len(examined), seconds[0], in_explain, seconds[1]))
    finally:
        convlens.api.explain = original  # type: ignore[assignment]
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lite0")
    p.add_argument("--data", type=Path, default=None, help="folder with labels.csv (file,label)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--images", type=int, default=None, help="size of the augmented set (1000)")
    p.add_argument("--batch", type=int, default=None, help="batch size (cpu 32, cuda 128)")
    p.add_argument(
        "--workers", default=None, help="comma-separated loader workers to time (cpu 0,1)"
    )
    p.add_argument("--methods", default="gradcam,occlusion", help="methods to time")
    p.add_argument("--explain-images", type=int, default=None, help="(cpu 4, cuda 16)")
    p.add_argument("--repeats", type=int, default=None, help="raw forward repeats (cpu 1, cuda 5)")
    p.add_argument(
        "--ref-images",
        type=int,
        default=None,
        help="raw forward reference images (cpu 64, cuda all)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="400 images, one workers value")
    p.add_argument("--workdir", type=Path, default=None, help="keep the set and runs here")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="leave glibc's mmap threshold alone (convlens analyze raises it)",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    cores = os.cpu_count() or 1
    args.data = args.data or common.default_data()
    args.images = args.images or (400 if args.quick else 1000)
    args.batch = args.batch or (128 if cuda else 32)
    if args.workers is None:
        many = max(1, min(12, cores - 2))
        args.workers = (
            f"{many}" if args.quick else (f"0,4,{many}" if cuda else f"0,{max(1, cores - 1)}")
        )
    args.workers = [int(w) for w in str(args.workers).split(",")]
    args.explain_images = args.explain_images or ((8 if args.quick else 16) if cuda else 4)
    args.repeats = args.repeats or (5 if cuda else 1)
    args.ref_images = min(args.images, args.ref_images or (args.images if cuda else 256))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"no labels.csv in {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.malloc = False if args.no_keep_freed_memory else keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device", file=sys.stderr)
        return 2
    load_before = common.load_average()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    try:
        return run(args, device, work, load_before, t_start)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(
    args: argparse.Namespace, device: torch.device, work: Path, load_before: float, t0: float
) -> int:
    dev = read_dev(args.data)
    start = time.perf_counter()
    csv_path = make_set(dev, args.images, work / "set")
    make_seconds = time.perf_counter() - start
    print(f"made {args.images} images in {make_seconds:.1f} s", file=sys.stderr)
    model = convlens.load_model(args.model, device=device)
    with (csv_path).open(newline="", encoding="utf-8") as fh:
        items = [(str(work / "set" / r["path"]), int(r["label"])) for r in csv.DictReader(fh)]
    x_host, decode_seconds = decode_all(model, [Path(p) for p, _ in items])
    x_dev = x_host.to(device)
    ref_x = x_dev[: args.ref_images]

    def reference() -> float:
        """Raw forward images/s on the reference subset, timed right now."""
        return len(ref_x) / raw_forward(model, ref_x, args.batch, args.repeats)

    fwd_full = args.images / raw_forward(model, x_dev, args.batch, args.repeats)
    print(f"raw forward {fwd_full:.1f} img/s", file=sys.stderr)
    passes = []
    results = {}
    for w in args.workers:
        before = reference()
        run_dir = work / f"run_w{w}"
        with PassTimer(device) as timer:
            start = time.perf_counter()
            res = analyze(
                model,
                csv_path,
                run_dir,
                top_errors=0,
                batch_size=args.batch,
                workers=w,
                progress=False,
            )
            total = time.perf_counter() - start
        ref = (before + reference()) / 2
        passes.append((w, timer.seconds, total, ref))
        results[w] = res
        print(
            f"workers {w}: pass {args.images / timer.seconds:.1f} img/s, raw {ref:.1f}",
            file=sys.stderr,
        )
    before = reference()
    pre = predecoded_pass(model, x_host, items, args.batch, work / "predecoded.sqlite")
    pre_ref = (before + reference()) / 2
    # independent recounts
    checks = []
    first = results[args.workers[0]]
    bad = compare(first.metrics, recount(first.out_dir / "predictions.sqlite"))
    checks.append((f"{args.images} augmented images", first.metrics, bad))
    dev_run = analyze(
        model,
        args.data / "labels.csv",
        work / "run_dev",
        top_errors=0,
        batch_size=args.batch,
        workers=max(args.workers),
        progress=False,
    )
    bad_dev = compare(dev_run.metrics, recount(work / "run_dev" / "predictions.sqlite"))
    checks.append((f"{len(dev)} dev images", dev_run.metrics, bad_dev))
    # the same predictions whichever the worker count (and pre-decoded)
    same = all(r.predictions == first.predictions for r in results.values())
    # explanation step
    costs = explain_cost(
        model, first, args.methods, args.explain_images, min(args.batch, 16), work / "explain"
    )
    load_after = common.load_average()
    section = render(
        args,
        device,
        decode_seconds=decode_seconds,
        fwd_full=fwd_full,
        passes=passes,
        predecoded=(pre, pre_ref),
        checks=checks,
        same=same,
        costs=costs,
        load=(load_before, load_after),
        total=time.perf_counter() - t0,
        make_seconds=make_seconds,
    )
    print(section)
    if not args.no_write:
        common.write_section(
            args.out, section.splitlines()[0], section, title=RESULTS_TITLE, intro=RESULTS_INTRO
        )
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(bad for _, _, bad in checks) or not same else 0


def goal_verdict(
    n: int,
    passes: list[tuple[int, float, float, float]],
    predecoded: tuple[float, float],
    decode_seconds: float,
    load: float,
) -> str:
    """Is the goal (pass >= 0.9x raw forward) met, and what limits the pass."""
    noisy = load >= (os.cpu_count() or 1)
    note = (
        f" Load average {load:.1f} on {os.cpu_count()} cores: other processes took CPU time "
        "during the run, so ratios can be off by 10-20 %."
        if noisy
        else ""
    )
    return _goal(n, passes, predecoded, decode_seconds) + note


def _goal(
    n: int,
    passes: list[tuple[int, float, float, float]],
    predecoded: tuple[float, float],
    decode_seconds: float,
) -> str:
    best = max(passes, key=lambda p: n / p[1] / p[3])
    ratio = n / best[1] / best[3]
    pre = n / predecoded[0] / predecoded[1]
    head = f"Goal (pass >= 0.9x raw forward): {'MET' if ratio >= 0.9 else 'NOT MET'}, best "
    head += f"{ratio:.2f}x with {best[0]} loader workers; pre-decoded {pre:.2f}x."
    if ratio >= 0.9:
        return head
    decode_rate = n / decode_seconds
    if pre >= 0.9:
        return (
            head + " Decoding is the bottleneck: the same loop on pre-decoded tensors keeps up "
            f"with the model, and one process decodes {decode_rate:.0f} images/s; more loader "
            "workers (cores) are needed to feed the model."
        )
    return head + (
        " Even on pre-decoded tensors the loop (transfers, store writes) stays below 0.9x."
    )


def render(
    args: argparse.Namespace,
    device: torch.device,
    *,
    decode_seconds: float,
    fwd_full: float,
    passes: list[tuple[int, float, float, float]],
    predecoded: tuple[float, float],
    checks: list[tuple[str, dict[str, Any], list[str]]],
    same: bool,
    costs: list[tuple[str, int, float, float, float]],
    load: tuple[float, float],
    total: float,
    make_seconds: float,
) -> str:
    n = args.images
    now = dt.datetime.now(dt.timezone.utc)
    heading = common.section_heading(f"{now:%Y-%m-%d}", device, label="analyze")
    if not args.malloc:
        heading += ", default glibc malloc thresholds"
    refs = [r for *_, r in passes] + [predecoded[1]]
    lines = [
        heading,
        "",
        common.date_line(now),
        common.machine_line(
            device,
            python=True,
            extra=f", convlens {convlens.__version__} (commit {common.git_commit()})",
        ),
        f"- command: `{common.command_line()}`",
        f"- model {args.model}, batch {args.batch}; {n} labelled images made from the "
        f"{Path(args.data).name} images by deterministic augmentations "
        f"({', '.join(AUGMENTATIONS)}) in {make_seconds:.1f} s; whole run {total:.0f} s",
        "- allocator: glibc mmap/trim thresholds raised to 1 GiB "
        "(`convlens.accel.allocator.keep_freed_memory`, as `convlens analyze` does)"
        if args.malloc
        else "- allocator: default glibc malloc thresholds (`--no-keep-freed-memory` or no glibc)",
        common.load_line(load),
        "",
        "### Prediction pass",
        "",
        "*Raw forward*: `model.net` on pre-decoded inputs already on the device, "
        "`torch.inference_mode`, same batch size. Each pass is compared with the raw forward "
        f"on the first {args.ref_images} images timed right before and right after it (the "
        "mean of the two), so that load changes on a shared machine cancel out; the raw "
        f"forward over all {n} images, timed once at the start, gave {fwd_full:.1f} images/s. "
        "The *prediction pass* is analyze's `_infer` inside a real `analyze(..., top_errors=0)` "
        "call (decoding, preprocessing, thumbnails, inference, SQLite writes); *whole analyze* "
        "adds reading the CSV, metrics, plots and the report.",
        "",
        "| what | loader workers | seconds | images/s | raw forward alongside, images/s "
        "| x raw forward alongside | x raw forward over all images at the start |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w, secs, whole, ref in passes:
        lines.append(
            f"| prediction pass | {w} | {secs:.2f} | {n / secs:.1f} | {ref:.1f} "
            f"| {n / secs / ref:.2f} | {n / secs / fwd_full:.2f} |"
        )
        lines.append(
            f"| whole analyze (no explanations) | {w} | {whole:.2f} | {n / whole:.1f} | | | |"
        )
    pre, pre_ref = predecoded
    lines += [
        f"| pass on pre-decoded tensors (inference + store) | - | {pre:.2f} | {n / pre:.1f} "
        f"| {pre_ref:.1f} | {n / pre / pre_ref:.2f} | {n / pre / fwd_full:.2f} |",
        f"| decode + preprocess alone, one process | - | {decode_seconds:.2f} "
        f"| {n / decode_seconds:.1f} | | | |",
        "",
        f"Raw forward alongside ranged {min(refs):.1f}-{max(refs):.1f} images/s during the run.",
        "",
        goal_verdict(n, passes, predecoded, decode_seconds, max(load)),
        "",
        "Predictions identical across worker counts: " + ("yes" if same else "**NO**"),
        "",
        "### Independent recount from the SQLite store",
        "",
        "| set | images | top-1 | top-5 | classes | confused pairs | recount |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m, bad in checks:
        verdict = "equal" if not bad else "**DIFFERS**: " + "; ".join(bad[:3])
        lines.append(
            f"| {name} | {m['labelled']} | {m['top1']:.4f} | {m['top5']:.4f} "
            f"| {len(m['per_class'])} | {len(m['confused_pairs'])} | {verdict} |"
        )
    lines += [
        "",
        "### Explanation step",
        "",
        "analyze's explanation step on the most confident mistakes: each method for the "
        "predicted and the true class, plus the side-by-side panel PNG; default options. "
        "Then, timed apart, the faithfulness scoring analyze adds by default (the predicted "
        "class's map and a random map, deletion + insertion, 20 steps; the maps recomputed).",
        "",
        "| method | images | seconds per image | of which computing the maps (both targets) "
        "| of which reading + panel PNG | scoring per image (maps of both targets recomputed) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {k} | {s:.3f} | {e:.3f} | {s - e:.3f} | {f:.3f} |" for m, k, s, e, f in costs
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
