"""Torch thread counts that follow the CPU cores other processes leave free.

PyTorch runs a CPU operator on ``torch.get_num_threads()`` OpenMP threads and waits for the
slowest of them at the end of every parallel region. When another CPU-bound process shares the
cores, one of those threads is descheduled for a whole scheduler time slice while the others
wait for it, and the job slows far more than the share of the cores it lost; with only the
free cores in use it slows in proportion (measured in ``benchmarks/RESULTS.md``, "Contention",
and ``benchmarks/RESULTS_OCCLUSION.md``).

:class:`ThreadGovernor` does that for the duration of one call: it counts the runnable
threads of *other* processes, sets ``torch.set_num_threads(max(1, cores - others))`` (never
more than the process's own setting at entry), re-counts at most every ``interval`` seconds
when a long job calls :meth:`ThreadGovernor.check` between chunks, and restores the setting on
exit. The count reads ``/proc/loadavg`` (its fourth field: runnable tasks / all tasks) and this
process's own threads' states in ``/proc/self/task``; when another process seems to run, the
count is confirmed, inside a container (a child PID namespace, whose ``/proc/loadavg`` is the
host's), by the states of the threads of the processes it can see in ``/proc``. Elsewhere (no
``/proc``, or an affinity mask narrower than the machine) nothing changes. Only the number of
threads changes, never what is computed: the results equal those of any fixed thread count to
float rounding (reductions may round differently, so two calls under different load can differ
in the last bits; with ``torch.use_deterministic_algorithms(True)`` the count is left alone).
``torch.set_num_threads`` is process-wide: methods called from several Python threads at once
should run with a fixed ``Acceleration(threads=N)`` or ``threads=None``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ThreadGovernor", "governed_threads", "runnable_elsewhere", "usable_cores"]

log = logging.getLogger(__name__)

_PROC = Path("/proc")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where the
    platform has no affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _state(stat: str) -> str:
    """The one-letter state of a ``/proc/.../stat`` line (after the parenthesised name, which
    may itself hold spaces and parentheses)."""
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]


def _own_running(proc: Path) -> int:
    """Threads of this process in state R (running or waiting for a core)."""
    count = 0
    for task in (proc / "self" / "task").iterdir():
        try:
            count += _state((task / "stat").read_text()) == "R"
        except OSError:
            continue  # the thread ended
    return count


def _loadavg_running(proc: Path) -> int:
    """Runnable tasks on the machine (``/proc/loadavg``, field 4 before the slash)."""
    return int((proc / "loadavg").read_text().split()[3].split("/")[0])


def _visible_running_elsewhere(proc: Path) -> int:
    """Runnable threads of the other processes listed in ``proc`` (this process excluded)."""
    me = str(os.getpid())
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                count += _state((task / "stat").read_text()) == "R"
            except OSError:
                continue
    return count


def _in_child_pid_namespace(proc: Path) -> bool:
    """Whether this process runs in a PID namespace below the host's (a container): its
    ``NSpid`` line in ``/proc/self/status`` lists more than one process id."""
    for line in (proc / "self" / "status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return len(line.split()) > 2
    return False


def runnable_elsewhere(samples: int = 3, pause: float = 0.001, proc: Path = _PROC) -> int | None:
    """How many threads of other processes are running or waiting for a core right now.

    The smallest count over ``samples`` snapshots ``pause`` seconds apart: a CPU-bound process
    is runnable in every snapshot, a short-lived one (a shell command, a page fault) rarely.

    Args:
        samples: snapshots to take (at least 1).
        pause: seconds between snapshots.
        proc: the procfs mount (a folder of fake files in tests).

    Returns:
        The count, or ``None`` where ``proc`` cannot be read (not Linux).
    """
    best: int | None = None
    try:
        for i in range(max(1, samples)):
            if i:
                time.sleep(pause)
            others = max(0, _loadavg_running(proc) - _own_running(proc))
            best = others if best is None else min(best, others)
            if best == 0:
                return 0
        if best and _in_child_pid_namespace(proc):
            # /proc/loadavg counts the whole host inside a container: count what we can see
            return min(best, _visible_running_elsewhere(proc))
        return best
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ThreadGovernor:
    """Torch intra-op threads for one call, following the cores other processes leave free.

    Attributes:
        limit: the most threads to use (the process's ``torch.get_num_threads()`` at entry, or
            a fixed count).
        cores: the cores this process may run on.
        interval: seconds between re-counts in :meth:`check`.
        proc: the procfs mount.
    """

    limit: int
    cores: int = field(default_factory=usable_cores)
    interval: float = 1.0
    proc: Path = _PROC
    threads: int = 0
    _checked: float = -1e9

    def choose(self) -> int:
        """The thread count for the cores free now: ``max(1, min(limit, cores - others))``.

        ``limit`` itself where the count would not be about this process's cores: no
        ``/proc``, or an affinity mask narrower than the machine (``taskset``, a cgroup cpuset,
        a batch scheduler's slot), since ``/proc/loadavg`` counts the other cores' tasks too.
        """
        if self.cores < (os.cpu_count() or self.cores):
            return self.limit
        others = runnable_elsewhere(proc=self.proc)
        if others is None:
            return self.limit
        return max(1, min(self.limit, self.cores - others))

    def check(self) -> int:
        """Re-count (at most every ``interval`` seconds) and apply the thread count; call it
        between chunks of a long job. Returns the threads in use."""
        now = time.monotonic()
        if now - self._checked < self.interval and self.threads:
            return self.threads
        self._checked = now
        threads = self.choose()
        if threads != self.threads:
            if self.threads:
                log.debug("torch threads %d -> %d (other processes' load)", self.threads, threads)
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


@contextmanager
def governed_threads(
    limit: int | None = None, *, interval: float = 1.0
) -> Iterator[ThreadGovernor]:
    """A :class:`ThreadGovernor` for the block: the threads are chosen on entry, re-chosen by
    :meth:`ThreadGovernor.check`, and the process's setting is restored on exit (also on error).

    Args:
        limit: the most threads to use; default the process's current setting.
        interval: seconds between re-counts.
    """
    before = torch.get_num_threads()
    governor = ThreadGovernor(limit=before if limit is None else limit, interval=interval)
    try:
        governor.check()
        yield governor
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
