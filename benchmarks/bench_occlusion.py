"""Benchmark of occlusion: naive batched, exact incremental, approximate, and Captum.

Issue 7 ("Occlusion at the speed limit"). On the same images, with a 16 px patch and stride 8 on
224 x 224 (27 x 27 = 729 windows per image), fill 0 and the target's softmax probability, one
process times per model:

- ``naive``: ``convlens.Occlusion(mode="naive")``, every occluded copy through the whole network
  in batches under ``--memory-mb``;
- ``exact``: ``mode="exact"``, incremental inference (Krypton, Nakandala et al. SIGMOD 2019);
- ``approx``: ``mode="approx"`` (projective-field cap ``--tau``, drill-down ``--coarse`` /
  ``--drill``);
- ``captum``: ``captum.attr.Occlusion`` on the softmax outputs, windows (3, 16, 16), strides
  (3, 8, 8), baseline 0, each of ``--ppe`` values of ``perturbations_per_eval`` (the best is the
  headline row); skipped when captum is not installed.

Models: the default model (``lite0``, real weights, when installed) and ResNet-18 and VGG-16
architectures defined here (random weights, seeded; BN statistics randomised). Images: the first
``--images`` rows of ``labels.csv`` in ``--data`` (the lite0 preprocessing), random images when
the folder is absent.

Reported per side: seconds per image, speed-up over naive and over the best Captum run, the
multiply-accumulates of convolutions and linear layers per occluded copy (executed, and the
bound of recomputing only the exact changed regions; approx also counts the windows skipped by
drill-down), peak memory (CUDA: ``max_memory_allocated``; CPU: the RSS high-water mark, reset
before each side), max |difference| from the naive maps (probabilities) and SSIM against them.

Example:
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/bench_occlusion.py \\
        --threads 1 --images 1
    PYTHONPATH=src python benchmarks/bench_occlusion.py --device cuda          # < 3 min on H100
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import convlens
from convlens import Occlusion
from convlens.accel.allocator import keep_freed_memory
from convlens.images import load_image
from convlens.models.preprocess import Preprocess

import _common as common

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS_OCCLUSION.md"
RESULTS_TITLE = "# Occlusion benchmark results (issue 7)"
RESULTS_INTRO = "Written by `bench_occlusion.py`.\n"
PATCH, STRIDE, SIZE = 16, 8, 224
MODELS = ("lite0", "resnet18", "vgg16")
MB = 2**20

# --------------------------------------------------------------------------------------------
# Models (architectures as in torchvision; defined here, no torchvision in convlens)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG16(nn.Module):
    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def randomised(net: nn.Module, seed: int) -> nn.Module:
    """He-initialised weights and random BN statistics (seeded): non-trivial predictions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return net.eval()


def load_net(name: str) -> nn.Module | None:
    if name == "lite0":
        try:
            return convlens.load_model("lite0").net
        except convlens.ModelLoadError as exc:
            print(f"skipping lite0: {exc}", file=sys.stderr)
            return None
    return randomised(ResNet18() if name == "resnet18" else VGG16(), seed=0)


def load_images(n: int, data: Path | None) -> tuple[torch.Tensor, str]:
    if data is not None and (data / "labels.csv").exists():
        with (data / "labels.csv").open(newline="", encoding="utf-8") as fh:
            files = [r["file"] for r in list(csv.DictReader(fh))[:n]]
        pre = Preprocess(resize=256, crop=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
        x = torch.stack([pre(load_image(data / f)) for f in files])
        return x, f"{data.name}: {', '.join(files)}"
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, SIZE, SIZE, generator=g).clamp(-2, 2), "random N(0, 1) images"


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    side: str
    seconds: float  # per image
    maps: torch.Tensor  # (B, H, W) on the CPU
    peak_mb: float
    macs: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; returns the baseline it is measured from (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MB
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return float("nan")
    return _status_mb("VmRSS")


def read_peak(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / MB - base
    return _status_mb("VmHWM") - base


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any, float]:
    base = reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out, read_peak(device, base)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5) of two (H, W) maps, with the
    data range of ``b`` (the reference); the worst image of a batch is reported by the caller."""
    a, b = a.double()[None, None], b.double()[None, None]
    rng = float(b.max() - b.min()) or 1.0
    t = torch.arange(11, dtype=torch.float64) - 5
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k = (k / k.sum())[:, None] * (k / k.sum())[None, :]
    w = k[None, None]

    def f(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w)

    mu_a, mu_b = f(a), f(b)
    var_a, var_b = f(a * a) - mu_a**2, f(b * b) - mu_b**2
    cov = f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s.mean())


def convlens_side(
    model: str, side: str, net: nn.Module, x: torch.Tensor, args: argparse.Namespace
) -> Row:
    kw: dict[str, Any] = {"patch": PATCH, "stride": STRIDE, "fill": 0.0, "score": "prob"}
    kw["memory_mb"] = args.memory_mb
    kw["compile"] = {"auto": "auto", "on": True, "off": False}[args.compile]
    if side == "approx":
        kw.update(mode="approx", tau=args.tau, coarse=args.coarse, drill=args.drill)
    elif side.startswith("approx tau="):
        kw.update(mode="approx", tau=args.tau_row, coarse=1, drill=1.0)
    else:
        kw["mode"] = side
    method = Occlusion(**kw)
    seconds, exp, peak = timed(lambda: method(net, x), x.device)
    meta = exp.meta
    macs = ""
    if side != "naive":
        windows = (meta["forward_passes"] - len(x)) / (len(x) * 27 * 27)
        done = meta["macs_fraction"] * windows
        bound = 1 - meta["macs_bound_fraction"]
        macs = f"{100 * (1 - done):.0f}% skipped (bound {100 * bound:.0f}%)"
        if side.startswith("approx"):
            macs += f"; {100 * windows:.0f}% of windows"
    note = f"batch {meta['perturbations_per_batch']}"
    if meta.get("full_from"):
        note += f", full from `{meta['full_from']}`"
    if meta.get("fallback_reason"):
        note += f", fell back: {meta['fallback_reason']}"
    return Row(model, side, seconds / len(x), exp.maps[:, 0].cpu(), peak, macs, note)


def captum_side(
    model: str, net: nn.Module, x: torch.Tensor, targets: torch.Tensor, ppe: int
) -> Row:
    from captum.attr import Occlusion as CaptumOcclusion

    soft = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    occ = CaptumOcclusion(soft)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return occ.attribute(
                x,
                sliding_window_shapes=(3, PATCH, PATCH),
                strides=(3, STRIDE, STRIDE),
                baselines=0.0,
                target=targets,
                perturbations_per_eval=ppe,
            )

    seconds, out, peak = timed(run, x.device)
    return Row(model, f"captum ppe={ppe}", seconds / len(x), out[:, 0].float().cpu(), peak)


def bench_model(
    name: str, x: torch.Tensor, args: argparse.Namespace, have_captum: bool
) -> list[Row]:
    net = load_net(name)
    if net is None:
        return []
    net = net.to(args.device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = x.to(args.device)
    with torch.no_grad():
        targets = net(x).argmax(dim=1)
    sides = list(args.sides)
    if args.tau_row and "approx" in sides:
        sides.append(f"approx tau={args.tau_row:g}")
    if args.warmup:  # lazy kernel loading, cuDNN heuristics for every crop shape: one image
        for side in sides:
            convlens_side(name, side, net, x[:1], args)
    rows = [convlens_side(name, s, net, x, args) for s in sides]
    if have_captum:
        for ppe in args.ppe:
            try:
                rows.append(captum_side(name, net, x, targets, ppe))
            except torch.OutOfMemoryError:
                print(f"{name}: captum ppe={ppe} ran out of memory", file=sys.stderr)
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
    for r in rows:  # progress, and partial results if the run is cut short
        print(f"{name} | {r.side} | {r.seconds:.3f} s/img | {r.macs} | {r.note}", file=sys.stderr)
    print(f"{name}: done", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def render(rows: list[Row], meta: dict[str, str], busy: int = 0) -> str:
    lines = [
        "| model | side | s/img | vs naive | vs best Captum | MACs | peak MB | max abs diff "
        "| SSIM | notes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    goals: list[str] = []
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        naive = next((r for r in group if r.side == "naive"), None)
        captums = [r for r in group if r.side.startswith("captum")]
        best = min(captums, key=lambda r: r.seconds) if captums else None
        ref = naive or best  # the maps compared against (the naive maps when they were run)
        for r in group:
            diff = float((r.maps - ref.maps).abs().max()) if ref else float("nan")
            s = (
                min(ssim(a, b) for a, b in zip(r.maps, ref.maps, strict=True))
                if ref
                else float("nan")
            )
            r.extra.update(diff=diff, ssim=s)
            vs_captum = f"{best.seconds / r.seconds:.2f}x" if best else "n/a"
            vs_naive = f"{naive.seconds / r.seconds:.2f}x" if naive else "n/a"
            tag = " (best)" if r is best and len(captums) > 1 else ""
            lines.append(
                f"| {model} | {r.side}{tag} | {r.seconds:.3f} | {vs_naive} "
                f"| {vs_captum} | {r.macs} | {r.peak_mb:.0f} | {diff:.2e} | {s:.4f} | {r.note} |"
            )
        exact = next((r for r in group if r.side == "exact"), None)
        approx = next((r for r in group if r.side == "approx"), None)
        if naive and exact and model == "resnet18":
            goals.append(_goal("exact >= 2x naive on ResNet-18", naive.seconds / exact.seconds, 2))
        if naive and exact and model == "vgg16":
            goals.append(_goal("exact >= 4x naive on VGG-16", naive.seconds / exact.seconds, 4))
        if best is not None and exact is not None:
            need = {"lite0": 5.0, "resnet18": 3.0}.get(model)
            if busy:
                need = 2.5 if model == "lite0" else None
            if need is not None:
                when = f", {busy} busy process(es)" if busy else ""
                goals.append(
                    _goal(
                        f"(issue 15) exact >= {need:g}x best Captum on {model}{when}",
                        best.seconds / exact.seconds,
                        need,
                        f"max abs diff {exact.extra['diff']:.1e}",
                    )
                )
        if model == "lite0" and best is not None and approx is not None:
            goals.append(
                _goal(
                    "approx >= 10x Captum on lite0 at SSIM >= 0.9",
                    best.seconds / approx.seconds,
                    10,
                    f"SSIM {approx.extra['ssim']:.3f}",
                    ok=approx.extra["ssim"] >= 0.9,
                )
            )
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    goal_text = "\n".join(goals) if goals else "- (no goal applies to the models run)"
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nGoals (issues 7 and 15):\n\n{goal_text}\n"


def _goal(label: str, ratio: float, need: float, extra: str = "", ok: bool = True) -> str:
    met = "met" if ratio >= need and ok else "MISSED"
    return f"- {label}: {ratio:.2f}x{', ' + extra if extra else ''}: **{met}**"


def versions(have_captum: bool) -> str:
    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"convlens {convlens.__version__} (commit {common.git_commit()})",
        f"captum {common.dist_version('captum') if have_captum else 'absent (row skipped)'}",
    ]
    return ", ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--images", type=int, default=None, help="default 8 on cuda, 1 on cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--data", type=Path, default=None, help="folder with labels.csv")
    p.add_argument("--ppe", type=int, nargs="+", default=None, help="Captum values tried")
    p.add_argument("--memory-mb", type=float, default=None, help="convlens batch memory cap")
    p.add_argument("--tau", type=float, default=1.0, help="approx row: projective-field cap")
    p.add_argument("--coarse", type=int, default=2, help="approx row: coarse step (windows)")
    p.add_argument("--drill", type=float, default=0.5, help="approx row: fraction drilled")
    p.add_argument(
        "--tau-row", type=float, default=0.7, help="extra row: tau alone (0: no such row)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="keep glibc's default mmap threshold (by default it is raised for every side, as "
        "the convlens CLI does; see convlens.accel.allocator)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 convolutions on cuda")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="Occlusion(compile=...) of the exact and approx sides (torch.compile of the fused "
        "suffix); with --warmup the one-off compilation happens in the warm-up",
    )
    p.add_argument("--quick", action="store_true", help="2 images, one Captum setting")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one untimed call per convlens side on one image first (default: on cuda)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--sides",
        nargs="+",
        choices=["naive", "exact", "approx"],
        default=["naive", "exact", "approx"],
        help="convlens sides to time (maps compared with naive's, else with the best Captum's)",
    )
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        help="CPU-bound busy-loop processes running beside the timed calls (contention)",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.images is None:
        args.images = 2 if args.quick else (8 if cuda else 1)
    if args.ppe is None:
        args.ppe = (
            ([256] if cuda else [64]) if args.quick else ([64, 128, 256] if cuda else [32, 64])
        )
    if args.warmup is None:
        args.warmup = cuda
    if args.memory_mb is None:
        args.memory_mb = 8192.0 if cuda else 1024.0
    if args.data is None:
        args.data = common.find_data()
    args.device = torch.device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = False if args.no_keep_freed_memory else keep_freed_memory()
    if args.device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = False
    try:
        import captum  # noqa: F401

        have_captum = True
    except ImportError:
        have_captum = False
    load_before = common.load_average()
    start = time.time()
    x, source = load_images(args.images, args.data)
    rows: list[Row] = []
    with common.busy_processes(args.busy):
        for name in args.models:
            rows += bench_model(name, x, args, have_captum)
    load_after = common.load_average()
    now = dt.datetime.now(dt.timezone.utc)
    if args.device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(args.device)}, {os.cpu_count()} CPU cores"
        machine += f", TF32 {'on' if args.tf32 else 'off'}"
    else:
        machine = f"{common.processor()}, {os.cpu_count()} cores, "
        machine += f"{torch.get_num_threads()} torch threads"
        machine += ", glibc mmap threshold raised for all sides" if malloc else ", default malloc"
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "versions": versions(have_captum),
        "command": common.command_line(argv, script="benchmarks/bench_occlusion.py"),
        "setting": f"{len(x)} image(s) ({source}); patch {PATCH}, stride {STRIDE} on "
        f"{SIZE}x{SIZE} (729 windows/image), fill 0, target top-1 softmax probability; "
        f"convlens memory cap {args.memory_mb:.0f} MB; approx: tau {args.tau}, coarse "
        f"{args.coarse}, drill {args.drill}; approx tau=: that tau, no drill-down; "
        f"compile={args.compile}; "
        "one timed call per side"
        + (" after an untimed call on one image" if args.warmup else " (no warm-up)")
        + (f"; {args.busy} busy-loop process(es) running beside it" if args.busy else ""),
        "load average (1 min)": f"{load_before:.2f} before, {load_after:.2f} after "
        f"({os.cpu_count()} cores); whole run {time.time() - start:.0f} s",
        "columns": "MACs = conv + linear multiply-accumulates per occluded copy skipped vs a "
        "full pass (bound: only the exact changed regions recomputed); max abs diff and SSIM "
        "(worst image) against the naive maps",
    }
    body = render(rows, meta, busy=args.busy)
    print(body)
    if not args.no_write:
        heading = (
            f"## {now.strftime('%Y-%m-%d')} UTC, {args.device.type}, {len(x)} image(s), "
            + " ".join(args.models)
            + (f", {args.busy} busy process(es)" if args.busy else "")
            + ("" if args.warmup else ", first call")
        )
        common.write_section(
            args.out,
            heading,
            f"{heading}\n\n{body}",
            title=RESULTS_TITLE,
            intro=RESULTS_INTRO,
        )
        print(f"wrote section {heading!r} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
