"""Benchmark the deletion/insertion metrics: N images x M methods on the default model.

Writes one markdown section to stdout and appends it to ``benchmarks/RESULTS_METRICS.md``:

1. Forward throughput (images/s) of the ways the curves can run the model: the model as it is,
   under ``torch.inference_mode``, with BatchNorm folded, folded + ``channels_last`` (what
   ``convlens.metrics`` uses), and that under bf16 autocast.
2. The headline figure: maps of ``--images`` images x ``--methods`` computed first (timed
   separately), then deletion + insertion curves of all of them with
   ``convlens.metrics.deletion_insertion_many`` (shared end points, fused copy), timed, with the
   number of forward passes. With ``--extrapolate N`` the per-image time is also scaled to N.
3. ``--compare-bf16``: the same curves under bf16 autocast, and how far the areas move.
4. ``--compare-compile``: the same curves once more with ``compile=False`` (eager), for the
   gain of ``compile="auto"`` (``torch.compile`` of the fused copy once the passes reach a
   minute, compilation time included) measured in the same run.
5. ``--compare-steps 10 20 50 100``: the areas of the same maps with several step counts on
   ``--compare-images`` images (the default of 20 steps against finer ones).

Example:
    python benchmarks/bench_metrics.py --device cuda                   # 200 images, < 2 min
    python benchmarks/bench_metrics.py --images 8 --extrapolate 200 --threads 1 \\
        --compare-bf16 --compare-steps 10 20 50 100                     # CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import convlens
from convlens.accel import compiler_available
from convlens.accel.allocator import keep_freed_memory
from convlens.accel.compiled import FixedBatchForward
from convlens.accel.folded import fold_batchnorm, inference_copy
from convlens.metrics import DEFAULT_STEPS, Curves, deletion_insertion_many

import _common as common
from bench_methods import load_batch, read_labels, warm_up

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS_METRICS.md"
DEFAULT_METHODS = ("gradcam", "gradcam++", "saliency", "gradxinput", "guided")
RESULTS_TITLE = "# convlens metric benchmarks"
RESULTS_INTRO = (
    "Produced by `benchmarks/bench_metrics.py` (see `benchmarks/README.md`). Each run appends a "
    "section.\n"
)


def throughput(
    model: convlens.ConvlensModel, x: torch.Tensor, batch: int, repeats: int
) -> list[tuple[str, float]]:
    """Images/s of one no-grad forward pass of ``batch`` images, for each way to run the model
    (best of ``repeats`` after a warm-up)."""
    device = x.device
    xb = (
        x[:batch]
        if x.shape[0] >= batch
        else x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
    )
    folded = copy.deepcopy(model.net).eval()
    fold_batchnorm(folded, xb)
    fused = inference_copy(model, xb)
    xcl = xb.contiguous(memory_format=torch.channels_last)

    def bf16(net: torch.nn.Module, inp: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return net(inp)

        return call

    def plain(net: torch.nn.Module, inp: torch.Tensor, mode: Callable = torch.no_grad) -> Callable:
        def call() -> object:
            with mode():
                return net(inp)

        return call

    def compiled(net: torch.nn.Module, inp: torch.Tensor) -> Callable[[], object]:
        fwd = FixedBatchForward(net, inp.shape[0], device)

        def call() -> object:
            with torch.no_grad():
                return fwd(inp)

        t0 = time.perf_counter()
        call()
        print(f"  (compiled in {time.perf_counter() - t0:.1f} s: {fwd.compiled})", flush=True)
        return call

    variants = [
        ("model as is (no_grad)", plain(model.net, xb)),
        ("model, inference_mode", plain(model.net, xb, torch.inference_mode)),
        ("BatchNorm folded", plain(folded, xb)),
        ("folded + channels_last (used)", plain(fused, xcl)),
        ("folded + channels_last + bf16 autocast", bf16(fused, xcl)),
    ]
    if device.type == "cpu" and compiler_available():
        variants.append(("folded + channels_last, torch.compile (freezing)", compiled(fused, xcl)))
    out = []
    for name, fn in variants:
        fn()
        best = min(common.timed(fn, device) for _ in range(repeats))
        out.append((name, batch / best))
        print(f"  {name}: {batch / best:.1f} images/s", flush=True)
    return out


def compute_maps(
    model: convlens.ConvlensModel, x: torch.Tensor, methods: Sequence[str], batch: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Maps of every method (top-1 target), ``batch`` images per call; seconds per method."""
    maps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    targets: list[torch.Tensor] = []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        for m in methods:
            method = convlens.get_method(m)
            out: list[convlens.Explanation] = []
            seconds[m] += common.timed(
                lambda method=method, xb=xb, out=out: out.append(method(model, xb)), x.device
            )
            maps[m].append(out[0].maps[:, 0].detach())
            if m == methods[0]:
                targets.append(out[0].targets[:, 0])
    return {m: torch.cat(v) for m, v in maps.items()}, torch.cat(targets), seconds


def run_curves(
    model: convlens.ConvlensModel,
    x: torch.Tensor,
    maps: dict[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    chunk: int,
    autocast: torch.dtype | None = None,
    compile: bool | str = "auto",
) -> tuple[dict[str, Curves], float]:
    """All curves, ``chunk`` images per call; wall seconds."""
    parts: list[dict[str, Curves]] = []

    def go() -> None:
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            parts.append(
                deletion_insertion_many(
                    model,
                    x[sl],
                    {m: v[sl] for m, v in maps.items()},
                    targets[sl],
                    steps=steps,
                    batch_size=batch_size,
                    autocast=autocast,
                    compile=compile,  # type: ignore[arg-type]
                )
            )

    seconds = common.timed(go, x.device)
    merged = {
        m: Curves(
            parts[0][m].fractions,
            torch.cat([p[m].deletion for p in parts]),
            torch.cat([p[m].insertion for p in parts]),
        )
        for m in maps
    }
    return merged, seconds


def auc_table(curves_by: dict[str, dict[str, Curves]], ref: str) -> list[str]:
    """Markdown rows: mean deletion / insertion AUC per method for each setting, and the mean
    and largest absolute per-image difference to the ``ref`` setting."""
    settings = list(curves_by)
    methods = list(curves_by[ref])
    head = "| method | " + " | ".join(f"del {s} | ins {s}" for s in settings) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(settings)]
    for m in methods:
        cells = []
        for s in settings:
            c = curves_by[s][m]
            cells += [f"{float(c.deletion_auc.mean()):.4f}", f"{float(c.insertion_auc.mean()):.4f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| setting | mean abs. diff. del | max | mean abs. diff. ins | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in settings:
        if s == ref:
            continue
        dd = torch.cat(
            [(curves_by[s][m].deletion_auc - curves_by[ref][m].deletion_auc).abs() for m in methods]
        )
        di = torch.cat(
            [
                (curves_by[s][m].insertion_auc - curves_by[ref][m].insertion_auc).abs()
                for m in methods
            ]
        )
        stats = [float(dd.mean()), float(dd.max()), float(di.mean()), float(di.max())]
        lines.append(f"| {s} vs {ref} | " + " | ".join(f"{v:.4f}" for v in stats) + " |")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="lite0")
    p.add_argument(
        "--data", type=Path, default=common.default_data(), help="folder with labels.csv"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=200, help="images (first rows of labels.csv)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (64 on CPU, 256 on CUDA)",
    )
    p.add_argument(
        "--chunk", type=int, default=None, help="images per metrics call (16 on CPU, 100 on CUDA)"
    )
    p.add_argument(
        "--map-batch", type=int, default=None, help="images per method call (8 on CPU, 50 on CUDA)"
    )
    p.add_argument("--extrapolate", type=int, default=None, help="also scale the time to N images")
    p.add_argument(
        "--compare-bf16", action="store_true", help="also run the curves under bf16 autocast"
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile of the metrics (library default: auto)",
    )
    p.add_argument(
        "--compare-compile",
        action="store_true",
        help="also run the curves eagerly (compile=False) in the same run",
    )
    p.add_argument(
        "--compare-steps", type=int, nargs="*", default=[], help="step counts to compare"
    )
    p.add_argument("--compare-images", type=int, default=4, help="images for --compare-steps")
    p.add_argument("--no-throughput", action="store_true", help="skip the forward throughput table")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="keep glibc's default mmap threshold (the CLI raises it; see "
        "convlens.accel.allocator)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    load_before = common.load_average()
    run_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if not (args.data / "labels.csv").exists():
        print(f"no labels.csv in {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = False if args.no_keep_freed_memory else keep_freed_memory()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if gpu else 64)
    chunk = args.chunk or (100 if gpu else 16)
    map_batch = args.map_batch or (50 if gpu else 8)
    torch.manual_seed(0)
    model = convlens.load_model(args.model, device=device)
    samples = read_labels(args.data)[: args.images]
    n = len(samples)
    t0 = time.perf_counter()
    x = torch.cat(
        [load_batch(model, [s.path for s in samples[i : i + 50]]) for i in range(0, n, 50)]
    ).to(device)
    load_s = time.perf_counter() - t0
    print(
        f"{common.device_name(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {n} images",
        flush=True,
    )
    warm_up(model, x[: min(8, n)])

    rates: list[tuple[str, float]] = []
    if not args.no_throughput:
        print(f"forward throughput, batch {batch_size}:", flush=True)
        rates = throughput(model, x, batch_size, repeats=3 if gpu else 2)

    maps, targets, map_seconds = compute_maps(model, x, args.methods, map_batch)
    print("maps: " + ", ".join(f"{m} {s:.1f} s" for m, s in map_seconds.items()), flush=True)
    # Warm-up of the curve path (copy, first convolutions) on one image, untimed.
    run_curves(
        model,
        x[:1],
        {m: v[:1] for m, v in maps.items()},
        targets[:1],
        steps=2,
        batch_size=batch_size,
        chunk=1,
    )
    compile_arg = {"auto": "auto", "on": True, "off": False}[args.compile]
    all_curves = functools.partial(
        run_curves, model, x, maps, targets, steps=args.steps, batch_size=batch_size, chunk=chunk
    )
    curves, curve_s = all_curves(compile=compile_arg)
    m_count = len(args.methods)
    forwards = n * (3 + 2 * (args.steps - 1) * m_count)
    print(
        f"curves: {curve_s:.1f} s for {n} images x {m_count} methods, {forwards} forward passes",
        flush=True,
    )

    compile_rows: list[str] = []
    if args.compare_compile:
        eager, eager_s = all_curves(compile=False)
        print(f"curves, eager (compile=False): {eager_s:.1f} s", flush=True)
        diff = max(
            float((getattr(curves[m], k) - getattr(eager[m], k)).abs().max())
            for m in maps
            for k in ("deletion", "insertion")
        )
        compile_rows = [
            f"Same curves with `compile=False` (eager): {eager_s:.1f} s; `compile={args.compile}`"
            f" (the headline row, compilation included) is {eager_s / curve_s:.2f}x faster; "
            f"largest difference of a curve point {diff:.1e}.",
        ]

    bf16_rows: list[str] = []
    if args.compare_bf16:
        bf, bf_s = all_curves(autocast=torch.bfloat16)
        print(f"curves under bf16 autocast: {bf_s:.1f} s", flush=True)
        bf16_rows = [
            f"Same curves under bf16 autocast: {bf_s:.1f} s ({curve_s / bf_s:.2f}x faster).",
            "",
            *auc_table({"fp32": curves, "bf16": bf}, "fp32"),
        ]

    steps_rows: list[str] = []
    if args.compare_steps:
        k = min(args.compare_images, n)
        by_steps = {}
        secs = {}
        for s in args.compare_steps:
            by_steps[f"S={s}"], secs[s] = run_curves(
                model,
                x[:k],
                {m: v[:k] for m, v in maps.items()},
                targets[:k],
                steps=s,
                batch_size=batch_size,
                chunk=chunk,
            )
            print(f"  steps {s}: {secs[s]:.1f} s on {k} images", flush=True)
        ref = f"S={max(args.compare_steps)}"
        steps_rows = [
            f"{k} images x {m_count} methods; seconds: "
            + ", ".join(f"S={s} {t:.1f} s" for s, t in secs.items())
            + ".",
            "",
            *auc_table(by_steps, ref),
        ]

    load_after = common.load_average()
    total = time.perf_counter() - run_start
    when = dt.datetime.now(dt.timezone.utc)
    maps_total = sum(map_seconds.values())
    heading = common.section_heading(f"{when:%Y-%m-%d %H:%M}", device, plural_one=True)
    lines = [
        heading,
        "",
        common.machine_line(device),
        f"- command: `{common.command_line()}`",
        f"- model {args.model}; {n} images of `{args.data.name}`; "
        f"methods {', '.join(args.methods)}; {args.steps} steps; deletion to 0 (model-input "
        f"space), insertion from blur (sigma 10); {batch_size} images per forward pass, "
        f"{chunk} images per metrics call; compile={args.compile}; whole run {total:.0f} s",
        "- allocator: "
        + (
            "glibc mmap/trim thresholds raised (`convlens.accel.allocator.keep_freed_memory`, as "
            "the `convlens` commands do)"
            if malloc
            else "default"
        ),
        common.load_line(
            (load_before, load_after),
            "near or above the core count: other processes shared the CPU",
        ),
        "",
        "| what | seconds | per image | forward passes |",
        "|---|---:|---:|---:|",
        f"| decode + preprocess {n} images | {load_s:.1f} | {load_s / n:.3f} | |",
        *(f"| maps: {m} | {s:.1f} | {s / n:.3f} | |" for m, s in map_seconds.items()),
        f"| maps: all {m_count} methods | {maps_total:.1f} | {maps_total / n:.3f} | |",
        f"| **deletion + insertion, {m_count} methods** | **{curve_s:.1f}** | {curve_s / n:.3f} "
        f"| {forwards} ({forwards / curve_s:.0f}/s) |",
    ]
    if args.extrapolate:
        e = args.extrapolate
        lines.append(
            f"| *extrapolated to {e} images (x {e / n:.1f}, not measured)* "
            f"| curves {curve_s / n * e:.0f}, maps {maps_total / n * e:.0f} | "
            f"| {e * (3 + 2 * (args.steps - 1) * m_count)} |"
        )
    if rates:
        lines += [
            "",
            f"Forward throughput (no-grad, batch {batch_size}, best of repeats):",
            "",
            "| model | images/s | vs. as is |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {r:.1f} | {r / rates[0][1]:.2f}x |" for name, r in rates]
    if compile_rows:
        lines += ["", "### torch.compile", "", *compile_rows]
    if bf16_rows:
        lines += ["", "### bf16 autocast", "", *bf16_rows]
    if steps_rows:
        lines += ["", "### Step count", "", *steps_rows]
    section = "\n".join(lines) + "\n"
    print()
    print(section)
    if not args.no_write:
        # The heading has the minute: a run appends its section (a rerun within the same
        # minute and on the same device replaces it).
        common.write_section(args.out, heading, section, title=RESULTS_TITLE, intro=RESULTS_INTRO)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
