"""Throughput of ``analyze``'s prediction pass: the local engine against the Ray engine.

Both engines run ``analyze(..., top_errors=0, faithfulness=False, failure_modes=False)`` on the
same labelled folder or CSV (``--data``; default the dev images' ``labels.csv``) into fresh run
folders, and the script prints the images per second of each, the ratio ray / local (the issue
asks for >= 0.8 on one machine), and whether both gave the same predictions (top-5 classes and
probabilities to 1e-9). The Ray engine joins ``--address`` (default: a new local cluster with
``--cpus`` CPUs, started by this script and timed apart from the pass). Nothing is written to
the repository; the lead copies the printed table into ``docs/scale.md``.

Run it on a quiet machine:
    python benchmarks/bench_ray.py                           # this machine, local Ray
    python benchmarks/bench_ray.py --address auto --batch 128 --device cuda   # a cluster
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from convlens.analysis import analyze
from convlens.models import load_model

from _common import default_data, git_commit, load_average, machine_line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lite0")
    p.add_argument("--data", type=Path, default=None, help="class folders or a CSV path,label")
    p.add_argument("--device", default="cpu", help="the local engine's device")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="the local engine's decode workers")
    p.add_argument("--address", default=None, help="Ray cluster (default: a new local one)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the new local Ray cluster")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    data = args.data or default_data() / "labels.csv"
    spec = functools.partial(load_model, args.model)
    model = load_model(args.model, device=args.device)
    common = {
        "top_errors": 0,
        "faithfulness": False,
        "failure_modes": False,
        "progress": False,
        "batch_size": args.batch,
        "limit": args.limit,
    }
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        t0 = time.perf_counter()
        local = analyze(model, data, Path(tmp) / "local", workers=args.workers, **common)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(
            # "local": a new instance even where another cluster runs on this machine (Ray
            # would join the one it finds)
            address=args.address or "local",
            num_cpus=None if args.address else args.cpus,
            include_dashboard=False,
            log_to_driver=False,
        )
        t_start = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            remote = analyze(
                model, data, Path(tmp) / "ray", engine="ray", model_spec=spec, **common
            )
            t_ray = time.perf_counter() - t0
            resources = ray.cluster_resources()
        finally:
            ray.shutdown()
    n = len(local.predictions) + len(local.failures)
    top5_same = [p.top5 for p in local.predictions] == [p.top5 for p in remote.predictions]
    gap = max(
        (
            abs(a - b) / max(abs(b), 1e-12)
            for p, q in zip(local.predictions, remote.predictions, strict=True)
            for a, b in zip(p.probs5, q.probs5, strict=True)
        ),
        default=0.0,
    )
    same = top5_same and gap <= 1e-5  # float32 sums in another process, other thread counts
    print(machine_line(args.device, python=True))
    print(f"- commit {git_commit()}; load average now {load_average():.1f}")
    print(f"ray cluster: {resources}; started in {t_start:.1f} s (not counted)")
    print(f"{n} images, model {args.model}, batch {args.batch}, local device {args.device}")
    print("| engine | seconds | images/s |")
    print("|---|---|---|")
    print(f"| local (workers {args.workers}) | {t_local:.1f} | {n / t_local:.1f} |")
    print(f"| ray | {t_ray:.1f} | {n / t_ray:.1f} |")
    print(
        f"ray / local: {t_local / t_ray:.2f}x; same top-5: {top5_same}; "
        f"largest relative difference of a probability: {gap:.1e}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
