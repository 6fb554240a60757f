"""Fill the results of docs/metrics.md: methods against the random and centre baselines on the dev
images with the default model, and the cascading-randomisation sanity check.

Writes, between the ``<!-- metrics-table:start -->`` and ``<!-- metrics-table:end -->`` markers
of docs/metrics.md, the faithfulness table (deletion/insertion AUC, Average Drop / Increase in
Confidence, each as mean ± standard error over images, and how often each method beats each
baseline on the same image) and the sanity-check table; and docs/img/metrics_curves.png and
docs/img/metrics_sanity.png.

Run (CPU, a spread-out subset; about 25 min on one loaded core):
    python docs/scripts/metrics_table.py --images 32 --sanity-images 4 --threads 1
On a GPU, the whole dev set (Score-CAM included there by default):
    python docs/scripts/metrics_table.py --device cuda --images 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import convlens
from convlens.data import read_labelled
from convlens.metrics import (
    DEFAULT_STEPS,
    EvaluationTable,
    SanityResult,
    cascading_randomization,
    evaluate_methods,
)

REPO = Path(__file__).resolve().parents[2]
# The helpers the benchmark scripts share (benchmarks/ is not a package).
sys.path.insert(0, str(REPO / "benchmarks"))
import _common as common  # noqa: E402

DOC = REPO / "docs" / "metrics.md"
IMG = REPO / "docs" / "img"
START, END = "<!-- metrics-table:start -->", "<!-- metrics-table:end -->"
CPU_METHODS = ("gradcam", "gradcam++", "saliency", "gradxinput", "intgrad", "occlusion", "guided")
GPU_METHODS = (*CPU_METHODS[:2], "scorecam", *CPU_METHODS[2:])
BASELINES = ("(random)", "(centre)")
# metric -> (label, lower is better, scale)
METRICS = {
    "deletion_auc": ("deletion AUC ↓", True, 1.0),
    "insertion_auc": ("insertion AUC ↑", False, 1.0),
    "average_drop": ("Average Drop % ↓", True, 100.0),
    "increase": ("Increase in Conf. % ↑", False, 100.0),
}


def spread(items: Sequence[Path], n: int) -> list[Path]:
    """``n`` items evenly spaced over the list (all of them when ``n`` >= its length)."""
    if n >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / n)] for i in range(n)]


def faithfulness_markdown(table: EvaluationTable) -> list[str]:
    """Means ± standard errors, and per-image win rates against the two baselines."""
    head = ["method"]
    for label, _, _ in METRICS.values():
        head.append(label)
    head += ["del. < random", "ins. > random", "del. < centre", "ins. > centre"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, cols in table.per_image.items():
        cells = [f"`{name}`" if not name.startswith("(") else f"*{name}*"]
        for key, (_, _, scale) in METRICS.items():
            v = cols[key].double() * scale
            se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
            cells.append(
                f"{float(v.mean()):.3f} ± {se:.3f}"
                if scale == 1
                else f"{float(v.mean()):.1f} ± {se:.1f}"
            )
        for base in BASELINES:
            if name in BASELINES:
                cells += ["", ""]
                continue
            ref = table.per_image[base]
            cells.append(
                f"{float((cols['deletion_auc'] < ref['deletion_auc']).float().mean()) * 100:.0f}%"
            )
            cells.append(
                f"{float((cols['insertion_auc'] > ref['insertion_auc']).float().mean()) * 100:.0f}%"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sanity_markdown(res: SanityResult) -> list[str]:
    """Mean similarity to the intact model's maps after randomising down to each layer."""
    cols = " | ".join(f"`{s}`" for s in res.steps)
    lines = [f"| method | metric | {cols} |", "|---|---|" + "---:|" * len(res.steps)]
    for method in res.scores:
        for metric in ("spearman_abs", "ssim", "hog"):
            vals = " | ".join(f"{v:.2f}" for v in res.mean(method, metric))
            lines.append(f"| `{method}` | {metric.replace('_', ' ')} | {vals} |")
        ranges = " | ".join(f"{v:.3f}" for v in np.mean(res.ranges[method], axis=1))
        lines.append(f"| `{method}` | *range of the map* | {ranges} |")
    return lines


def write_block(doc: Path, block: str) -> None:
    """Replace the text between the markers of ``doc`` (or append the markers)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Trusting the maps\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
    else:
        before, after = text.rstrip("\n") + "\n\n", "\n"
    doc.write_text(before + START + "\n" + block + END + after, encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--data", type=Path, default=common.default_data(), help="folder with labels.csv"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=None, help="default 32 on CPU, 200 on CUDA")
    p.add_argument(
        "--methods", nargs="+", default=None, help="default: 7 methods, +scorecam on CUDA"
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument(
        "--batch", type=int, default=None, help="images per evaluate call (8 CPU, 50 CUDA)"
    )
    p.add_argument("--sanity-images", type=int, default=None, help="default 4 on CPU, 16 on CUDA")
    p.add_argument("--sanity-methods", nargs="+", default=None, help="default: --methods")
    p.add_argument("--checkpoints", type=int, default=8, help="randomisation depths")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file to fill")
    p.add_argument("--img", type=Path, default=IMG, help="folder for the two figures")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Compute the tables, write docs/metrics.md's results block and the figures."""
    args = parse_args(argv)
    load_before = common.load_average()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if not (args.data / "labels.csv").exists():
        print(f"no labels.csv in {args.data}; pass --data", file=sys.stderr)
        return 2
    n_images = args.images or (200 if gpu else 32)
    methods = args.methods or list(GPU_METHODS if gpu else CPU_METHODS)
    batch = args.batch or (50 if gpu else 8)
    n_sanity = args.sanity_images or (16 if gpu else 4)
    device = torch.device(args.device)
    model = convlens.load_model(device=device)
    items = read_labelled(args.data / "labels.csv", model.classes)
    paths = spread([p for p, _ in items], n_images)
    print(f"{len(paths)} images, methods {methods}, device {args.device}", flush=True)

    table = EvaluationTable()
    for i in range(0, len(paths), batch):
        x = model.load_images(paths[i : i + batch]).to(device)
        evaluate_methods(model, x, methods, steps=args.steps, table=table)
        print(
            f"  evaluated {min(i + batch, len(paths))}/{len(paths)} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    eval_s = time.perf_counter() - start

    sanity_methods = args.sanity_methods or methods
    x = model.load_images(spread(paths, n_sanity)).to(device)
    t0 = time.perf_counter()
    res = cascading_randomization(model, x, sanity_methods, checkpoints=args.checkpoints)
    sanity_s = time.perf_counter() - t0
    print(f"sanity checks: {sanity_s:.0f} s", flush=True)

    from convlens.cli.evaluate import _curves_figure
    from convlens.render import save_figure

    when = dt.datetime.now(dt.timezone.utc)
    dev_name = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    cmd = common.command_line(argv, script="docs/scripts/metrics_table.py")
    block = [
        f"*Generated {when:%Y-%m-%d %H:%M} UTC by `{cmd}` on {dev_name}, "
        f"torch {torch.__version__}: {len(paths)} of the {len(items)} dev images (evenly spaced "
        "in `labels.csv`), model lite0, "
        f"explaining its top-1 class; {args.steps} deletion/insertion steps (deletion to 0 in "
        f"model-input space, i.e. grey; insertion from a blur with sigma 10 px). Evaluation "
        f"{eval_s:.0f} s, sanity checks {sanity_s:.0f} s; 1-minute load average "
        f"{load_before:.2f} before, {common.load_average():.2f} after.*",
        "",
        "Faithfulness (mean ± standard error over images; the last four columns: share of images "
        "on which the method's map beats the baseline map on the same image):",
        "",
        *faithfulness_markdown(table),
        "",
        f"Cascading randomisation on {x.shape[0]} of these images: mean similarity between the "
        "maps of the intact model and of the model randomised from the top down to the named "
        "layer (1 = unchanged: the map ignores those weights; Spearman on absolute values). "
        "*range of the map*: mean `(max - min) / max |map|` of the randomised maps; near 0 "
        "they are nearly constant and the similarities above them compare a ripple.",
        "",
        *sanity_markdown(res),
        "",
        "![deletion and insertion curves](img/metrics_curves.png)",
        "",
        "![cascading randomisation](img/metrics_sanity.png)",
        "",
    ]
    text = "\n".join(block)
    print(text)
    if not args.no_write:
        args.img.mkdir(parents=True, exist_ok=True)
        save_figure(_curves_figure(table), args.img / "metrics_curves.png")
        save_figure(res.figure(), args.img / "metrics_sanity.png")
        write_block(args.doc, text)
        print(f"wrote {args.doc}, {args.img}/metrics_curves.png, {args.img}/metrics_sanity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
