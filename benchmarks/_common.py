"""Helpers shared by the benchmark scripts (and ``docs/scripts/metrics_table.py``).

The scripts are run as ``python benchmarks/bench_x.py``, so this folder is ``sys.path[0]`` and
they import it as ``from _common import ...``; scripts elsewhere put this folder on ``sys.path``
first. It holds what every script needs around its measurements: where the dev images are, what
the machine and the checkout are, the header lines of a results section, and how a section of a
results markdown file is replaced or appended. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
"""The root of the convlens checkout these benchmarks belong to."""

DATA_CANDIDATES = (
    REPO.parent / "shared" / "data" / "imagenet-sample-dev",
    REPO / "shared" / "data" / "imagenet-sample-dev",
    REPO / ".gpu-data" / "imagenet-sample-dev",
    REPO / "build" / "devdata",
)
"""Where the labelled dev images may be, in order of preference: beside the checkout (the usual
layout), inside it (``shared/`` of a copy on a lent machine), and the git-ignored copies that
``benchmarks/gpu_session.sh`` and earlier GPU runs used."""

LOAD_NOTE = "near or above the core count: other processes shared the CPU and timings are noisy"
"""The usual explanation after the load averages of a results section."""

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def find_data(candidates: Sequence[Path] = DATA_CANDIDATES) -> Path | None:
    """The first candidate folder that has a ``labels.csv``.

    Args:
        candidates: Folders to try, in order.

    Returns:
        The folder, or ``None`` when none of them has a ``labels.csv``.
    """
    return next((cand for cand in candidates if (cand / "labels.csv").is_file()), None)


def default_data() -> Path:
    """The default ``--data`` folder: the dev images found by :func:`find_data`.

    Returns:
        The first of :data:`DATA_CANDIDATES` with a ``labels.csv``, else the first candidate
        (``../shared/data/imagenet-sample-dev``), so that the error message names the usual place.
    """
    return find_data() or DATA_CANDIDATES[0]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the GPU work queued on ``device`` so that wall-clock timings are real.

    Args:
        device: The device timed; nothing happens unless it is a CUDA device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, GPU work on ``device`` included.

    Args:
        fn: The call to time.
        device: The device whose queued work is waited for before and after the call.

    Returns:
        The seconds the call took.
    """
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Machine and checkout
# --------------------------------------------------------------------------------------------


def processor() -> str:
    """The processor as ``platform`` names it (its architecture where it has no better name)."""
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: ``cuda (<GPU name>)`` or ``cpu (<processor>)``.

    Args:
        device: The device the benchmark runs on.

    Returns:
        The name, as used in section headings and machine lines.
    """
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({processor()})"


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` CPU-bound processes (``while True: pass``) running for the block: the competing
    load of the contention measurements (issue 15). Killed on exit, also on error."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        if procs:
            time.sleep(1.0)  # let the scheduler see them
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def load_average() -> float:
    """The 1-minute load average of the machine (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def dist_version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(paths: Sequence[str] = ("src",)) -> str:
    """Short HEAD commit of this convlens checkout, marked when the measured code has changes.

    Only read-only git calls are made. The dirty check is path-limited: ``git status
    --porcelain -- <paths>`` (by default ``src/``, the library being measured), which counts
    modified tracked files and untracked files that git does not ignore there. Edits elsewhere,
    such as results files or notes written during a benchmark session, do not mark the commit.

    Args:
        paths: Folders, relative to the checkout root, whose changes mark the commit.

    Returns:
        ``CONVLENS_BENCH_COMMIT`` when that environment variable is set (copies without git);
        otherwise ``abc1234`` or ``abc1234 (+ uncommitted changes in src/)``; ``unknown`` without
        git, and ``unknown (not run from a convlens checkout)`` for a copy inside another
        repository.
    """
    if os.environ.get("CONVLENS_BENCH_COMMIT"):
        return os.environ["CONVLENS_BENCH_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != REPO:
            return "unknown (not run from a convlens checkout)"
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    where = ", ".join(f"{p.rstrip('/')}/" for p in paths)
    return f"{head} (+ uncommitted changes in {where})" if dirty else head


# --------------------------------------------------------------------------------------------
# Section header
# --------------------------------------------------------------------------------------------


def section_heading(
    stamp: str,
    device: torch.device,
    *,
    label: str | None = None,
    threads: bool = True,
    plural_one: bool = False,
) -> str:
    """The ``##`` heading of one run: ``## <stamp> UTC, [<label>, ]<device>[, N torch threads]``.

    A rerun whose heading is equal replaces the section (see :func:`write_section`), so the
    format must stay as it is: existing results files are matched against it.

    Args:
        stamp: The UTC date (``2026-11-26``) or date and time of the run.
        device: The device the benchmark ran on (named with :func:`device_name`).
        label: What was benchmarked, when the results file is shared (``"feature browser"``).
        threads: On CPU, append the torch thread count, so that runs with different counts are
            kept side by side.
        plural_one: Write ``1 torch threads`` rather than ``1 torch thread`` (the form
            ``bench_metrics.py`` has always used).

    Returns:
        The heading line, without a newline.
    """
    heading = f"## {stamp} UTC, " + (f"{label}, " if label else "") + device_name(device)
    if threads and device.type == "cpu":
        n = torch.get_num_threads()
        heading += f", {n} torch thread" + ("" if n == 1 and not plural_one else "s")
    return heading


def date_line(now: dt.datetime) -> str:
    """``- date: YYYY-mm-dd HH:MM UTC`` for a section header.

    Args:
        now: The time of the run, in UTC.
    """
    return f"- date: {now:%Y-%m-%d %H:%M} UTC"


def machine_line(
    device: torch.device | str,
    *,
    processor_name: str | None = None,
    python: bool = False,
    extra: str = "",
) -> str:
    """``- machine: processor `P`, N cores, [python V, ]torch T, K torch threads, device D``.

    Args:
        device: The device; a ``torch.device`` is named with :func:`device_name`, a string is
            written as it is.
        processor_name: The processor to name (default :func:`processor`).
        python: Also give the Python version.
        extra: Text appended to the line as it is (e.g. ``", convlens 0.1 (commit abc)"``).

    Returns:
        The line, without a newline.
    """
    dev = device_name(device) if isinstance(device, torch.device) else device
    return (
        f"- machine: processor `{processor_name or processor()}`, {os.cpu_count()} cores, "
        + (f"python {platform.python_version()}, " if python else "")
        + f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device {dev}"
        + extra
    )


def command_line(argv: Sequence[str] | None = None, *, script: str | None = None) -> str:
    """The command of this run as one shell-quoted line.

    Args:
        argv: The script's arguments (default ``sys.argv[1:]``); used only with ``script``.
        script: The script's path relative to the checkout. With it the line is ``python
            <script> <argv>``, the same whatever the interpreter; without it, the interpreter's
            file name and ``sys.argv`` as run (``python3 benchmarks/bench_methods.py ...``).

    Returns:
        The command line.
    """
    if script is None:
        return shlex.join([Path(sys.executable).name, *sys.argv])
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def load_line(load: tuple[float, float], note: str = LOAD_NOTE, *, before: str = "before") -> str:
    """``- 1-minute load average: A before, B after (<note>)`` for a section header.

    Args:
        load: The 1-minute load average before and after the run (:func:`load_average`).
        note: The explanation in parentheses.
        before: The word after the first value (``"before the run"`` in ``RESULTS.md``).

    Returns:
        The line, without a newline.
    """
    return f"- 1-minute load average: {load[0]:.2f} {before}, {load[1]:.2f} after ({note})"


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def write_section(out: Path, heading: str, section: str, *, title: str, intro: str = "") -> None:
    """Replace the section with ``heading`` in the markdown file ``out``, or append it.

    The file is a head (a title and an introduction) followed by sections, each starting with a
    line ``## ...``. It is read right before writing, so sections that other scripts added
    meanwhile are kept, in their order. The first section whose heading line equals ``heading``
    (surrounding white space ignored) is replaced by ``section`` in place, further sections with
    that heading are dropped; when there is none, ``section`` is appended. A missing file, or
    one whose head is blank, gets ``title`` and ``intro`` as its head. The head and every
    section are written with their leading and trailing blank lines removed and one blank line
    between them; the file ends with one newline.

    Args:
        out: The results file (created with its folder when missing).
        heading: The heading line of this run's section, ``## ...``.
        section: The markdown of the section, starting with the heading line.
        title: The ``#`` title line for a new file.
        intro: The introduction under the title for a new file (may be empty).
    """
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    head: list[str] = []
    sections: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            head.append(line)
    if not any(line.strip() for line in head):
        head = [title, "", *intro.splitlines()] if intro.strip() else [title]
    new = section.strip() + "\n"
    blocks = ["\n".join(head).strip() + "\n"]
    replaced = False
    for sec in sections:
        if sec[0].strip() == heading.strip():
            if not replaced:
                blocks.append(new)
                replaced = True
            continue
        blocks.append("\n".join(sec).strip() + "\n")
    if not replaced:
        blocks.append(new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(blocks), encoding="utf-8")
