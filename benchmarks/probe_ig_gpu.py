"""Where integrated gradients spend their time on a GPU (a probe, not a results table).

Times convlens ``IntegratedGradients`` (default settings) and Captum's at the same steps and
points per pass, both in full float32, with cuDNN's autotuner (``torch.backends.cudnn.
benchmark``) off and on, then profiles one call of each with ``torch.profiler`` and prints the
kernels that take the most device time. Run by hand on a lent GPU:

    python benchmarks/probe_ig_gpu.py --data .gpu-data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import convlens
from convlens.hooks import full_float32
from convlens.methods import IntegratedGradients


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    from captum.attr import IntegratedGradients as CaptumIG

    model = convlens.load_model("lite0", device="cuda")
    with (args.data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:4]
    x = model.load_images([args.data / r["file"] for r in rows]).cuda()
    with torch.no_grad():
        targets = model.net(x).argmax(1)
    ig = CaptumIG(model.net)
    every = args.steps * len(x)

    def captum(per: int) -> Callable[[], object]:
        def run() -> object:
            with full_float32():
                return ig.attribute(
                    x,
                    target=targets,
                    n_steps=args.steps,
                    method="gausslegendre",
                    internal_batch_size=per if per < every else None,
                )

        return run

    def mine(per: int) -> Callable[[], object]:
        method = IntegratedGradients(steps=args.steps, batch_size=per)
        return lambda: method(model, x, target=targets)

    sides = {}
    for per in (32, every):
        sides[f"convlens @{per}"] = mine(per)
        sides[f"captum @{per}"] = captum(per)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        times: dict[str, list[float]] = {k: [] for k in sides}
        for fn in sides.values():
            fn()
        for r in range(args.repeats):
            for name, fn in sides.items() if r % 2 == 0 else reversed(sides.items()):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
        print(f"cudnn.benchmark={bench}")
        for name, ts in times.items():
            print(
                f"  {name:16s} median {statistics.median(ts) * 1e3:7.1f} ms, "
                f"min {min(ts) * 1e3:7.1f} ms"
            )
    torch.backends.cudnn.benchmark = False
    from torch.profiler import ProfilerActivity, profile

    for name in (f"convlens @{every}", f"captum @{every}", "convlens @32"):
        sides[name]()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sides[name]()
            torch.cuda.synchronize()
        print(f"\n=== profile {name}")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
            )
        )


if __name__ == "__main__":
    main()
