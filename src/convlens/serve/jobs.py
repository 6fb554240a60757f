"""Map computations of the live explorer: a cache, one computation per key, progress, cancel.

A :class:`JobQueue` runs computations on a small thread pool. Each is identified by a hashable
key (image, model, method, target, layer, options): a request for a key already queued, running
or done gets that job back, so several tabs asking for the same map share one computation, and
a map asked for again is served from the cache (least recently used jobs dropped beyond
``cache_size``). A failed or cancelled job, or one asked to cancel, is forgotten, so asking
again computes anew; such jobs stay known by id (for their status) up to ``cache_size`` of them.

Computations on one model run one at a time (``model_lock``): a method hooks the model's modules
for its call, and two calls at once on the same modules would see each other's hooks.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from convlens.errors import ConvlensError
from convlens.methods.base import Cancelled, pace_listener

__all__ = ["Job", "JobQueue"]

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass
class Job:
    """One computation.

    Attributes:
        id: short identifier, used in URLs.
        key: what it computes (the cache key).
        state: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        progress: fraction done in [0, 1], or ``None`` while unknown.
        result: what the computation returned (``done``).
        error: one line saying why it failed (``failed``).
        seconds: how long the computation ran.
    """

    id: str
    key: Hashable
    state: str = QUEUED
    progress: float | None = None
    result: Any = None
    error: str | None = None
    seconds: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to finish; whether it has."""
        return self.finished.wait(timeout)

    def wait_change(self, seen: tuple[str, float | None], timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the state or progress to differ from ``seen``."""
        with self.changed:
            self.changed.wait_for(lambda: (self.state, self.progress) != seen, timeout)

    def _set(self, **values: Any) -> None:
        with self.changed:
            for k, v in values.items():
                setattr(self, k, v)
            self.changed.notify_all()

    def status(self) -> dict[str, Any]:
        """The job as JSON values (without its result)."""
        return {
            "job": self.id,
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            "seconds": self.seconds,
        }


class JobQueue:
    """Runs keyed computations on a thread pool; see the module docstring.

    Args:
        workers: threads of the pool.
        cache_size: finished jobs kept (least recently used dropped first).
    """

    def __init__(self, workers: int = 2, cache_size: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convlens-job")
        self._lock = threading.Lock()
        self._by_key: OrderedDict[Hashable, Job] = OrderedDict()
        self._by_id: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self.cache_size = cache_size
        self.model_lock = threading.Lock()
        """Held while a computation runs on the model."""
        self.computations = 0
        """How many computations were started (requests served from the cache or joined to a
        running job do not count)."""

    def submit(self, key: Hashable, compute: Callable[[], Any]) -> Job:
        """The job for ``key``: the one known, or a new one running ``compute()`` in the pool.

        ``compute`` runs with a :func:`~convlens.methods.base.pace_listener` that records the
        progress the method reports and stops it with :class:`Cancelled` once
        :meth:`cancel` is called. A :class:`~convlens.errors.ConvlensError` fails the job with
        its message; any other exception fails it with the exception's type and message
        (logged with its traceback).
        """
        with self._lock:
            job = self._by_key.get(key)
            if (
                job is not None
                and job.state not in (FAILED, CANCELLED)
                and not job.cancel_requested.is_set()
            ):
                self._by_key.move_to_end(key)
                return job
            job = Job(id=f"j{next(self._ids)}", key=key)
            self._by_key[key] = job
            self._by_id[job.id] = job
            self.computations += 1
            self._trim()
        self._pool.submit(self._run, job, compute)
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, if it is still known."""
        with self._lock:
            return self._by_id.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask the job to stop at its next chunk (a queued job never starts)."""
        job = self.get(job_id)
        if job is not None and job.state in (QUEUED, RUNNING):
            job.cancel_requested.set()
        return job

    def shutdown(self) -> None:
        """Cancel every unfinished job and stop the pool."""
        with self._lock:
            jobs = list(self._by_id.values())
        for job in jobs:
            job.cancel_requested.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _trim(self) -> None:
        finished = [k for k, j in self._by_key.items() if j.finished.is_set()]
        for k in finished[: max(0, len(finished) - self.cache_size)]:
            job = self._by_key.pop(k)
            self._by_id.pop(job.id, None)
        # jobs no longer cached (failed, cancelled, replaced): known by id for a while only
        cached = {j.id for j in self._by_key.values()}
        stale = [i for i, j in self._by_id.items() if i not in cached and j.finished.is_set()]
        for i in stale[: max(0, len(stale) - self.cache_size)]:
            del self._by_id[i]

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._by_key.get(job.key) is job:
                del self._by_key[job.key]

    def _run(self, job: Job, compute: Callable[[], Any]) -> None:
        def listen(fraction: float | None) -> None:
            if job.cancel_requested.is_set():
                raise Cancelled
            if fraction is not None and fraction != job.progress:
                job._set(progress=fraction)

        start = time.perf_counter()
        try:
            if job.cancel_requested.is_set():
                raise Cancelled
            with self.model_lock:
                if job.cancel_requested.is_set():
                    raise Cancelled
                job._set(state=RUNNING, progress=0.0)
                start = time.perf_counter()
                with pace_listener(listen):
                    result = compute()
        except Cancelled:
            self._forget(job)
            job._set(state=CANCELLED, seconds=time.perf_counter() - start)
        except ConvlensError as exc:
            self._forget(job)
            job._set(state=FAILED, error=str(exc), seconds=time.perf_counter() - start)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._forget(job)
            job._set(
                state=FAILED,
                error=f"{type(exc).__name__}: {exc}",
                seconds=time.perf_counter() - start,
            )
        else:
            job._set(state=DONE, progress=1.0, result=result, seconds=time.perf_counter() - start)
        finally:
            job.finished.set()
            with self._lock:
                self._trim()
