"""Throughput of ``analyze``'s prediction pass: the local engine against the Ray engine.

Both engines run ``analyze(..., top_errors=0, faithfulness=False, failure_modes=False)`` on the
same labelled folder or CSV (``--data``; default the dev images' ``labels.csv``) into fresh run
folders, and the script prints the images per second of each, the ratio ray / local (the issue
asks for >= 0.8 on one machine), and whether both gave the same predictions (top-5 classes and
probabilities to 1e-9). The Ray engine joins ``--address`` (default: a new local cluster with
``--cpus`` CPUs, started by this script and timed apart from the pass). Nothing is written to
the repository; the lead copies the printed table into ``docs/scale.md``.

With ``--sweep-decode-cpus C1 C2 ...`` it measures instead the Ray engine's prediction pass
alone (``RayEngine.infer`` into a fresh store, the actors on the GPUs when there are any)
against the model's raw forward throughput on ``--device`` (one batch of decoded images, on
the device, through the network again and again), once per CPUs of a decoding task, i.e. per
decode fan-out (the CPUs beside the actors divided by C), and prints which fan-out came
closest to the raw throughput (the issue asks for >= 0.8x on a 16-CPU GPU machine).
``--images N`` first makes an augmented set of N images from the dev images
(``bench_analyze.make_set``), large enough that the pass is not all actor start.

Run it on a quiet machine:
    python benchmarks/bench_ray.py                           # this machine, local Ray
    python benchmarks/bench_ray.py --address auto --batch 128 --device cuda   # a cluster
    python benchmarks/bench_ray.py --device cuda --batch 256 --images 4000 \
        --sweep-decode-cpus 2 1 0.5                          # a GPU machine: the fan-out
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    p.add_argument(
        "--sweep-decode-cpus",
        type=float,
        nargs="+",
        default=None,
        metavar="CPUS",
        help="only the Ray prediction pass against the raw forward throughput on --device, "
        "once per CPUs of a decoding task",
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="with --sweep-decode-cpus: first make an augmented set of this many images",
    )
    return p.parse_args(argv)


def raw_throughput(model: Any, items: Sequence[tuple[str, int | None]], batch: int) -> float:
    """Images per second of the model's forward pass alone on its device: one batch of
    decoded images (repeated to ``batch`` if fewer), already on the device, 8 passes over 4
    copies of it, the median."""
    import torch
    from bench_analyze import raw_forward

    from convlens.images import load_image

    x = torch.stack([model.preprocess(load_image(p)) for p, _ in items[:batch]])
    x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    x = x.repeat(4, 1, 1, 1).to(model.device)
    return len(x) / raw_forward(model, x, batch, repeats=8)


def _best(whole: float, steady: float) -> float:
    """The better of a pass's two rates (the steady one is NaN with a single shard)."""
    return whole if math.isnan(steady) else max(whole, steady)


def sweep(args: argparse.Namespace, data: Path) -> int:
    """The Ray prediction pass against the raw forward throughput, per decode fan-out."""
    import ray

    from convlens.analysis import engine_ray
    from convlens.analysis.store import PredictionStore
    from convlens.data import read_labelled

    model = load_model(args.model, device=args.device)
    spec = functools.partial(load_model, args.model)  # each actor moves it to its GPU
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-sweep-") as tmp:
        if args.images:
            from bench_analyze import make_set, read_dev

            data = make_set(read_dev(data.parent), args.images, Path(tmp) / "set")
        items = [(str(p), lbl) for p, lbl in read_labelled(data, model.classes, limit=args.limit)]
        raw = raw_throughput(model, items, args.batch)
        ray.init(
            address=args.address or "local",
            num_cpus=None if args.address else args.cpus,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            resources = ray.cluster_resources()
            for cpus in args.sweep_decode_cpus:
                folder = Path(tmp) / f"run-{cpus}"
                (folder / "thumbs").mkdir(parents=True)
                shards: list[float] = []
                with (
                    engine_ray.RayEngine(spec, {}, decode_cpus=cpus) as engine,
                    PredictionStore(folder / "predictions.sqlite") as store,
                ):
                    actor, _ = engine._resources(most=math.ceil(len(items) / args.batch))
                    size = actor["compute"].min_size
                    at_once = int((resources["CPU"] - size * actor["num_cpus"]) / cpus + 1e-6)
                    finish = engine._finish_shard

                    def timed(
                        *a: Any, _finish: Any = finish, _shards: list[float] = shards
                    ) -> None:
                        _finish(*a)
                        _shards.append(time.perf_counter())

                    engine._finish_shard = timed  # type: ignore[method-assign]
                    t0 = time.perf_counter()
                    engine.infer(
                        model,
                        store,
                        items,
                        thumbs=folder / "thumbs",
                        batch_size=args.batch,
                        workers=0,
                        progress=False,
                    )
                    seconds = time.perf_counter() - t0
                    n = len(store.predictions()) + len(store.failures())
                first = min(engine_ray.SHARD_SIZE, n)
                steady = (n - first) / (shards[-1] - shards[0]) if len(shards) > 1 else math.nan
                rows.append((cpus, at_once, seconds, n / seconds, steady))
        finally:
            ray.shutdown()
    print(machine_line(args.device, python=True))
    print(f"- commit {git_commit()}; load average now {load_average():.1f}")
    print(f"ray cluster: {resources}")
    print(f"{n} images, model {args.model}, batch {args.batch}, device {args.device}")
    print(f"raw forward throughput on {args.device}: {raw:.1f} images/s")
    print(
        "| decode CPUs per task | decoding tasks at once | seconds | images/s (whole pass) "
        "| images/s (after the first shard) | best / raw |"
    )
    print("|---|---|---|---|---|---|")
    for cpus, at_once, seconds, whole, steady in rows:
        print(
            f"| {cpus:g} | {at_once} | {seconds:.1f} | {whole:.1f} | {steady:.1f} | "
            f"{_best(whole, steady) / raw:.2f}x |"
        )
    cpus, at_once, _, whole, steady = max(rows, key=lambda r: _best(r[3], r[4]))
    print(
        f"best fan-out: {cpus:g} CPUs per decoding task ({at_once} at once): "
        f"{_best(whole, steady):.1f} images/s, {_best(whole, steady) / raw:.2f}x the raw "
        "forward throughput"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    data = args.data or default_data() / "labels.csv"
    if args.sweep_decode_cpus:
        return sweep(args, data)
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
