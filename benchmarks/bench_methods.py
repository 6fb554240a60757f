"""Benchmark convlens: model accuracy on a labelled image folder and the cost of every method.

Two measurements, written as a markdown table to stdout and to a section of ``RESULTS.md``:

1. Accuracy: top-1 / top-5 accuracy and throughput of the model on every image listed in
   ``labels.csv`` (columns ``file,label,synset,name``) of the ``--data`` folder.
2. Method cost: for each registered method (``convlens.list_methods()``), the median wall time
   over ``--repeats`` calls (after one warm-up call) on a fixed batch of ``--batch`` real images,
   in seconds per batch, seconds per image, and in units of one plain batched forward pass
   (``with torch.no_grad(): model.net(x)``) of the same model on the same batch. Gradient
   methods are also given in units of one forward+backward pass to the input. Slow methods
   (occlusion, Score-CAM, SmoothGrad on CPU) are timed once on ``--slow-batch`` images.

Example:
    python benchmarks/bench_methods.py                       # CPU, all methods, batch 8
    python benchmarks/bench_methods.py --device cuda --slow-batch 8
    python benchmarks/bench_methods.py --methods saliency gradcam --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import convlens
from convlens.hooks import model_state
from convlens.models.base import ConvlensModel

import _common as common

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
NOISY_SPREAD = 1.5  # max/min of a method's (or its paired forward's) repeats flagged as noisy
RESULTS_TITLE = "# convlens benchmark results"
RESULTS_INTRO = (
    "Produced by `benchmarks/bench_methods.py` (see `benchmarks/README.md`). One section per "
    "date and device; a rerun on the same date and device replaces its section.\n"
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    common.sync(device)
    times: list[float] = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Baselines:
    """Reference costs at one batch size: plain forward, and forward+backward to the input."""

    batch: int
    forward: float
    forward_backward: float


def baseline_calls(
    net: torch.nn.Module, x: torch.Tensor
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The two reference calls on ``x``: a no-grad forward, and forward+backward to the input.

    The backward call must run with frozen parameters (inside ``model_state``), as in every
    gradient method, so that only input gradients are computed.
    """

    def forward() -> object:
        with torch.no_grad():
            return net(x)

    def forward_backward() -> object:
        xi = x.detach().clone().requires_grad_(True)
        logits = net(xi)
        top1 = logits.detach().argmax(dim=1, keepdim=True)
        (g,) = torch.autograd.grad(logits.gather(1, top1).sum(), xi)
        return g

    return forward, forward_backward


def warm_up(model: ConvlensModel, x: torch.Tensor) -> None:
    """One forward and one forward+backward before anything is timed.

    Besides lazy initialisation, this settles glibc's allocator: its mmap threshold grows only
    after large blocks are freed, and until a backward pass has freed its activations every
    large activation tensor of a forward pass is a fresh ``mmap`` with page faults, making
    forward passes up to twice as slow as in steady state.
    """
    forward, forward_backward = baseline_calls(model.net, x)
    forward()
    with model_state(model.net, eval_mode=True, grads=True):
        forward_backward()
    common.sync(x.device)


def time_baselines(model: ConvlensModel, x: torch.Tensor, repeats: int) -> Baselines:
    """Median seconds of a no-grad forward and of a forward+backward to the input on ``x``."""
    forward, forward_backward = baseline_calls(model.net, x)
    fwd = statistics.median(time_call(forward, x.device, repeats))
    with model_state(model.net, eval_mode=True, grads=True):
        fwd_bwd = statistics.median(time_call(forward_backward, x.device, repeats))
    return Baselines(batch=x.shape[0], forward=fwd, forward_backward=fwd_bwd)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int
    name: str


def read_labels(data: Path) -> list[Sample]:
    """Rows of ``data/labels.csv`` (``file,label,synset,name``), in file order."""
    with (data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [
            Sample(data / row["file"], int(row["label"]), row["name"]) for row in csv.DictReader(fh)
        ]


def load_batch(model: ConvlensModel, paths: Sequence[Path]) -> torch.Tensor:
    """Preprocessed (B, 3, H, W) batch; plain PIL decoding if ``convlens.images`` is missing."""
    try:
        return model.load_images(list(paths))
    except ImportError:
        from PIL import Image

        images = []
        for p in paths:
            with Image.open(p) as img:
                images.append(model.preprocess(img.convert("RGB")))
        return torch.stack(images)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Accuracy:
    """Top-1 / top-5 accuracy and throughput on the labelled folder."""

    images: int
    top1: float
    top5: float
    load_seconds: float
    model_seconds: float


def measure_accuracy(
    model: ConvlensModel, samples: Sequence[Sample], batch: int, device: torch.device
) -> Accuracy:
    """Classify every sample in batches of ``batch``; load time and model time kept apart."""
    hit1 = hit5 = 0
    load_s = model_s = 0.0
    # Warm-up, so the first batch does not pay for lazy initialisation.
    model.predict(load_batch(model, [samples[0].path]).to(device), k=5)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        t0 = time.perf_counter()
        x = load_batch(model, [s.path for s in chunk]).to(device)
        common.sync(device)
        t1 = time.perf_counter()
        top, _ = model.predict(x, k=5)
        common.sync(device)
        t2 = time.perf_counter()
        load_s += t1 - t0
        model_s += t2 - t1
        labels = torch.tensor([s.label for s in chunk], device=top.device)
        hit1 += int((top[:, 0] == labels).sum())
        hit5 += int((top == labels[:, None]).any(dim=1).sum())
    n = len(samples)
    return Accuracy(n, hit1 / n, hit5 / n, load_s, model_s)


@dataclass
class MethodResult:
    """Timing of one method."""

    name: str
    images: int
    seconds: float  # median per batch
    forward: float  # median plain forward on the same batch, timed alongside
    forward_backward: float | None  # same, forward+backward to the input (gradient methods)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def per_image(self) -> float:
        return self.seconds / self.images

    @property
    def cost(self) -> float:
        return self.seconds / self.forward


def describe(meta: dict[str, object], method: convlens.Method) -> list[str]:
    """Short notes from an explanation's ``meta`` and the method's options."""
    notes: list[str] = []
    if "forward_passes" in meta:
        notes.append(f"forward_passes={meta['forward_passes']}")
    if "perturbations_per_batch" in meta:
        notes.append(f"perturbations/pass={meta['perturbations_per_batch']}")
    skip = {"seconds", "forward_passes", "perturbations_per_batch"}
    notes.extend(f"{k}={v}" for k, v in method.options().items() if k not in skip)
    return notes


def measure_method(
    name: str,
    model: ConvlensModel,
    x_all: torch.Tensor,
    batch: int,
    *,
    repeats: int,
    slow_seconds: float,
    slow_batch: int,
    forwards_per_repeat: int = 2,
) -> MethodResult:
    """Median wall time of ``get_method(name)(model, x)`` (default options, top-1 target).

    A first untimed call on one image (the probe, also a warm-up) decides how the method is
    timed:

    - probe x ``batch`` <= ``slow_seconds``: one warm-up call on ``batch`` images, then
      ``repeats`` timed calls;
    - otherwise (a slow method): one timed call on ``min(batch, slow_batch)`` images;
    - probe > ``slow_seconds``: the probe itself is the measurement (one image, one call).

    For calls of several seconds timer noise is negligible and repeats only add minutes. The
    reference passes are timed ``repeats`` times in every case, interleaved with the method
    (per repeat: ``forwards_per_repeat`` plain forwards, one forward+backward for gradient
    methods, then the method), so that the cost ratio is not skewed by load that changes
    during the run.
    """
    method = convlens.get_method(name)
    device = x_all.device
    last: list[convlens.Explanation] = []

    def call_on(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            exp = method(model, x)
            last[:] = [exp]
            return exp

        return call

    notes: list[str] = []
    fwd_times: list[float] = []
    fb_times: list[float] = []
    times: list[float] = []
    b = batch
    try:
        # Probe on one image (also fills the layer-detection cache of the CAM family).
        probe = common.timed(call_on(x_all[:1]), device)
        calls = repeats
        if probe > slow_seconds:
            b, calls = 1, 0
            times.append(probe)
            notes.append(f"slow: one call on 1 image ({probe:.1f} s), no separate warm-up")
        elif probe * batch > slow_seconds:
            b, calls = min(batch, slow_batch), 1
            notes.append(f"slow: {b} image(s), timed once after a 1-image warm-up")
        else:
            common.timed(call_on(x_all[:b]), device)  # warm-up at the batch size that is timed
        x = x_all[:b]
        call = call_on(x)
        forward, forward_backward = baseline_calls(model.net, x)
        forward()
        for i in range(repeats):
            fwd_times.extend(common.timed(forward, device) for _ in range(forwards_per_repeat))
            if method.uses_gradients:
                with model_state(model.net, eval_mode=True, grads=True):
                    fb_times.append(common.timed(forward_backward, device))
            if i < calls:
                times.append(common.timed(call, device))
    except Exception as exc:  # a broken method must not stop the others from being measured
        nan = float("nan")
        return MethodResult(name, b, nan, nan, None, error=f"{type(exc).__name__}: {exc}")
    result = MethodResult(
        name,
        b,
        statistics.median(times),
        statistics.median(fwd_times),
        statistics.median(fb_times) if fb_times else None,
        notes=notes,
    )
    exp = last[0]
    if exp.layer:
        result.notes.append(f"layer={exp.layer}")
    result.notes.extend(describe(dict(exp.meta), method))
    spread = max(max(t) / min(t) for t in (times, fwd_times) if t)
    if spread > NOISY_SPREAD:
        result.notes.append(
            f"NOISY: repeats differ up to {spread:.1f}x (forward {min(fwd_times):.4f}"
            f"-{max(fwd_times):.4f} s)"
        )
    if result.forward_backward is not None:
        units = result.seconds / result.forward_backward
        result.notes.insert(0, f"{units:.2f} fwd+bwd-to-input")
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def render(
    args: argparse.Namespace,
    device: torch.device,
    accuracy: Accuracy | None,
    base_by_batch: dict[int, Baselines],
    results: Sequence[MethodResult],
    date: str,
    total_seconds: float,
    load: tuple[float, float],
) -> str:
    """The markdown section for this run."""
    lines = [
        common.section_heading(date, device),
        "",
        common.date_line(dt.datetime.now(dt.timezone.utc)),
        common.machine_line(device),
        f"- command: `{common.command_line()}`",
        f"- model: {args.model}; batch {args.batch}; repeats {args.repeats} (median, after "
        f"one warm-up call); slow methods (one-image probe x batch > {args.slow_seconds:g} s) "
        f"timed once on {args.slow_batch} image(s); "
        f"whole run {total_seconds:.0f} s",
        common.load_line(
            load,
            "values near or above the number of cores mean other processes shared the CPU and "
            "timings are noisy",
            before="before the run",
        ),
        "",
    ]
    if accuracy is not None:
        n = accuracy.images
        lines += [
            f"### Accuracy ({n} images in `{Path(args.data).name}`, batch {args.eval_batch})",
            "",
            "| top-1 | top-5 | images/s (model) | images/s (incl. decoding) |",
            "|---:|---:|---:|---:|",
            f"| {accuracy.top1:.3f} | {accuracy.top5:.3f} "
            f"| {n / accuracy.model_seconds:.1f} "
            f"| {n / (accuracy.model_seconds + accuracy.load_seconds):.1f} |",
            "",
        ]
    lines += [
        "### Method cost",
        "",
        "Cost is the method's median wall time divided by the median time of one plain batched "
        "forward pass (`torch.no_grad()`) of the same model on the same batch, timed "
        "interleaved with the method's calls (so load changes during the run cancel out). "
        "Gradient methods are also given in units of one forward+backward pass to the input "
        "(parameters frozen), timed the same way. The *reference* rows were timed once at the "
        "start of the run.",
        "",
        "| method | seconds/batch | seconds/image | cost (forward passes) | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for b, base in sorted(base_by_batch.items(), key=lambda kv: -kv[0]):
        lines.append(
            f"| *forward (no_grad)* | {base.forward:.4f} | {base.forward / b:.4f} | 1.00 "
            f"| reference, batch {b} |"
        )
        lines.append(
            f"| *forward+backward to input* | {base.forward_backward:.4f} "
            f"| {base.forward_backward / b:.4f} | {base.forward_backward / base.forward:.2f} "
            f"| reference, batch {b} |"
        )
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.name} | - | - | - | failed: {r.error} |")
            continue
        lines.append(
            f"| {r.name} | {r.seconds:.4f} | {r.per_image:.4f} | {r.cost:.2f} "
            f"| {'; '.join([*r.notes, f'forward {r.forward:.4f} s'])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="lite0", help="model to load (default: lite0)")
    p.add_argument(
        "--data", type=Path, default=common.default_data(), help="folder with labels.csv"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=8, help="images in the method batch (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=5.0,
        help="a method whose one-image probe x --batch exceeds this is slow: timed once on "
        "--slow-batch images (default 5; inf: never)",
    )
    p.add_argument(
        "--slow-batch",
        "--occlusion-batch",
        dest="slow_batch",
        type=int,
        default=2,
        help="images used for slow methods, e.g. occlusion on CPU (default 2)",
    )
    p.add_argument("--methods", nargs="+", default=None, help="default: all registered")
    p.add_argument("--eval-batch", type=int, default=50, help="batch size for accuracy")
    p.add_argument("--skip-accuracy", action="store_true", help="only time the methods")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    p.add_argument("--no-write", action="store_true", help="print only, leave --out alone")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = parse_args(argv)
    run_start = time.perf_counter()
    load_before = common.load_average()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not (args.data / "labels.csv").exists():
        print(f"no labels.csv in {args.data}; pass --data", file=sys.stderr)
        return 2
    available = convlens.list_methods()
    methods = args.methods or available
    unknown = [m for m in methods if m not in available]
    if unknown:
        print(f"unknown method(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    torch.manual_seed(0)

    model = convlens.load_model(args.model, device=device)
    samples = read_labels(args.data)
    print(
        f"{common.device_name(device)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    n_max = max(args.batch, args.slow_batch)
    x_all = load_batch(model, [s.path for s in samples[:n_max]]).to(device)
    warm_up(model, x_all[: args.batch])

    accuracy = None
    if not args.skip_accuracy:
        accuracy = measure_accuracy(model, samples, args.eval_batch, device)
        print(
            f"accuracy on {accuracy.images} images: top-1 {accuracy.top1:.3f}, "
            f"top-5 {accuracy.top5:.3f}, {accuracy.images / accuracy.model_seconds:.1f} images/s",
            flush=True,
        )

    base_by_batch: dict[int, Baselines] = {}

    def baselines(b: int) -> Baselines:
        if b not in base_by_batch:
            base_by_batch[b] = time_baselines(model, x_all[:b], args.repeats)
            base = base_by_batch[b]
            print(
                f"batch {b}: forward {base.forward:.4f} s, "
                f"forward+backward to input {base.forward_backward:.4f} s",
                flush=True,
            )
        return base_by_batch[b]

    baselines(args.batch)
    results: list[MethodResult] = []
    for name in methods:
        t0 = time.perf_counter()
        r = measure_method(
            name,
            model,
            x_all,
            args.batch,
            repeats=args.repeats,
            slow_seconds=args.slow_seconds,
            slow_batch=args.slow_batch,
        )
        if r.error is None:
            baselines(r.images)
        results.append(r)
        status = r.error or (
            f"{r.seconds:.3f} s for {r.images} image(s), cost {r.cost:.2f} forward passes"
        )
        print(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)

    load = (load_before, common.load_average())
    elapsed = time.perf_counter() - run_start
    section = render(args, device, accuracy, base_by_batch, results, date, elapsed, load)
    print()
    print(section)
    if not args.no_write:
        common.write_section(
            args.out,
            common.section_heading(date, device),
            section,
            title=RESULTS_TITLE,
            intro=RESULTS_INTRO,
        )
        print(f"written to {args.out}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
