"""How convlens commands slow down when other CPU-bound processes share the cores (issue 15).

Runs real commands as child processes, each timed by wall clock, on a quiet machine and beside
competing processes started by this script:

- ``evaluate``: ``convlens evaluate DATA --limit 10 --methods gradcam,saliency`` (goal: beside
  one busy process at most 3x its quiet time);
- ``analyze``: the prediction pass of ``convlens analyze DATA --limit N --top-errors 0
  --no-faithfulness`` with ``--workers 0, 1, 2`` decode workers (goal: workers never make it
  slower than decoding in the main process, i.e. they do not starve the model).

Competitors (``--competitor``): ``busy``, a pure-Python ``while True: pass`` loop (one core);
``torch``, a PyTorch process multiplying 512x512 matrices on its default thread count (a
CPU-heavy PyTorch job like the one in the issue). Each configuration runs ``--repeats`` times,
alternating quiet and loaded runs so load drift hits both; the median is reported. Results are
appended as a section of ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/bench_contention.py                # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_contention.py --only evaluate --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import _common as common

TORCH_JOB = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a) \n"


@contextlib.contextmanager
def competitors(kind: str, n: int) -> Iterator[None]:
    """``n`` competing processes of ``kind`` (``busy`` or ``torch``) for the block."""
    if kind == "busy":
        with common.busy_processes(n):
            yield
        return
    procs = [subprocess.Popen([sys.executable, "-c", TORCH_JOB]) for _ in range(n)]
    try:
        time.sleep(2.0)  # torch imported, the loop running
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def convlens_cmd() -> list[str]:
    """The ``convlens`` command of the interpreter running this script."""
    return [sys.executable, "-m", "convlens.cli"]


def timed_run(args: Sequence[str]) -> float:
    """Wall seconds of one command (its output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}: {tail}")
    return seconds


def evaluate_rows(data: Path, args: argparse.Namespace, work: Path) -> list[str]:
    cmd = [
        *convlens_cmd(),
        "evaluate",
        str(data),
        "--limit",
        "10",
        "--methods",
        "gradcam,saliency",
    ]
    quiet: list[float] = []
    loaded: list[float] = []
    for i in range(args.repeats):
        quiet.append(timed_run([*cmd, "--out", str(work / f"eval-q{i}")]))
        with competitors(args.competitor, 1):
            loaded.append(timed_run([*cmd, "--out", str(work / f"eval-b{i}")]))
    q, b = statistics.median(quiet), statistics.median(loaded)
    ok = "met" if b <= 3 * q else "MISSED"
    return [
        "| evaluate, 10 images, gradcam + saliency | quiet | "
        f"{q:.1f} | {', '.join(f'{t:.1f}' for t in quiet)} | 1.00x | |",
        f"| evaluate, 10 images, gradcam + saliency | beside 1 {args.competitor} process | "
        f"{b:.1f} | {', '.join(f'{t:.1f}' for t in loaded)} | {b / q:.2f}x | "
        f"goal <= 3x quiet: **{ok}** |",
    ]


def analyze_rows(data: Path, args: argparse.Namespace, work: Path) -> list[str]:
    rows = []
    base = None
    for workers in (0, 1, 2):
        times = []
        for i in range(args.repeats):
            out = work / f"an-w{workers}-{i}"
            times.append(
                timed_run(
                    [
                        *convlens_cmd(),
                        "analyze",
                        str(data),
                        "--limit",
                        str(args.analyze_images),
                        "--top-errors",
                        "0",
                        "--no-faithfulness",
                        "--workers",
                        str(workers),
                        "--out",
                        str(out),
                    ]
                )
            )
        t = statistics.median(times)
        base = base or t
        rate = args.analyze_images / t
        verdict = ""
        if workers:
            verdict = "not starved: **met**" if t <= 1.1 * base else "slower than 0 workers"
        rows.append(
            f"| analyze, {args.analyze_images} images, predictions only | --workers {workers} | "
            f"{t:.1f} | {', '.join(f'{x:.1f}' for x in times)} | {rate:.1f} img/s | {verdict} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="labelled folder (labels.csv)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--competitor", choices=["busy", "torch"], default="busy")
    p.add_argument("--only", choices=["evaluate", "analyze"], default=None)
    p.add_argument("--analyze-images", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    data = args.data or common.find_data()
    if data is None:
        raise SystemExit("no labelled data found (../shared/data/imagenet-sample-dev); --data")
    load_before = common.load_average()
    start = time.time()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convlens-contention-") as tmp:
        work = Path(tmp)
        if args.only in (None, "evaluate"):
            rows += evaluate_rows(data, args, work)
        if args.only in (None, "analyze"):
            rows += analyze_rows(data, args, work)
    now = dt.datetime.now(dt.timezone.utc)
    head = [
        f"- date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {common.processor()}, {os.cpu_count()} cores; "
        f"convlens commit {common.git_commit()}",
        f"- command: {common.command_line(argv, script='benchmarks/bench_contention.py')}",
        f"- load average (1 min): {load_before:.2f} before, {common.load_average():.2f} after; "
        f"whole run {time.time() - start:.0f} s",
        f"- competitor: {args.competitor}; quiet and loaded runs alternate; median of "
        f"{args.repeats}",
    ]
    table = [
        "| command | condition | median s | runs (s) | vs quiet / rate | goal |",
        "|---|---|---:|---|---:|---|",
        *rows,
    ]
    body = "\n".join(head) + "\n\n" + "\n".join(table) + "\n"
    print(body)
    if not args.no_write:
        heading = f"## Contention (bench_contention.py), {now.strftime('%Y-%m-%d')} UTC, cpu"
        common.write_section(
            args.out, heading, f"{heading}\n\n{body}", title="# convlens benchmark results"
        )
        print(f"wrote section {heading!r} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
