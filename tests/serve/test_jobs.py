"""The explorer's job queue: one computation per key, cache, progress, cancel, failures."""

from __future__ import annotations

import threading

import pytest

from convlens.errors import InputError
from convlens.methods.base import Context
from convlens.serve.jobs import JobQueue


def paced(steps: int, gate: threading.Event | threading.Semaphore | None = None) -> object:
    """A computation that reports progress like a method (through ``Context.pace``), waiting
    for ``gate`` after each step."""
    ctx = Context(net=None, x=None, target=None, top_k=None, classes=None, layer=None)  # type: ignore[arg-type]

    def compute() -> int:
        for k in range(steps):
            ctx.pace(k, steps)
            if isinstance(gate, threading.Semaphore):
                gate.acquire(timeout=5)
            elif gate is not None:
                gate.wait(5)
        return steps

    return compute


def test_identical_requests_share_one_computation() -> None:
    q = JobQueue(workers=4)
    gate = threading.Event()
    try:
        jobs = [q.submit(("a", 1), paced(3, gate)) for _ in range(10)]
        other = q.submit(("b", 1), paced(3, gate))
        gate.set()
        assert len({j.id for j in jobs}) == 1
        assert other.id != jobs[0].id
        assert jobs[0].wait(10) and other.wait(10)
        assert jobs[0].result == 3
        assert q.computations == 2
        again = q.submit(("a", 1), paced(3))  # from the cache
        assert again is jobs[0] and q.computations == 2
    finally:
        q.shutdown()


def test_progress_and_cancel() -> None:
    q = JobQueue(workers=1)
    steps = threading.Semaphore(0)
    try:
        job = q.submit("long", paced(100, steps))
        job.wait_change(("queued", None), 5)
        assert (job.state, job.progress) == ("running", 0.0)
        steps.release(2)
        job.wait_change(("running", 0.0), 5)
        assert job.state == "running" and 0 < (job.progress or 0) < 1
        q.cancel(job.id)
        steps.release(1)
        assert job.wait(10)
        assert job.state == "cancelled" and job.result is None
        fresh = q.submit("long", paced(2))  # a cancelled job is not cached
        assert fresh is not job and fresh.wait(10) and fresh.result == 2
    finally:
        q.shutdown()


def test_failures_are_one_line_and_not_cached() -> None:
    q = JobQueue(workers=1)

    def bad() -> None:
        raise InputError("no such option")

    def crash() -> None:
        raise RuntimeError("boom")

    try:
        a, b = q.submit("a", bad), q.submit("b", crash)
        assert a.wait(10) and b.wait(10)
        assert (a.state, a.error) == ("failed", "no such option")
        assert b.state == "failed" and b.error == "RuntimeError: boom"
        assert q.submit("a", lambda: 1) is not a
    finally:
        q.shutdown()


def test_cache_keeps_the_most_recent() -> None:
    q = JobQueue(workers=1, cache_size=2)
    try:
        for k in range(4):
            assert q.submit(k, lambda k=k: k).wait(10)
        q.submit(4, lambda: 4).wait(10)
        assert q.get("j1") is None and q.get("j5") is not None
    finally:
        q.shutdown()


@pytest.mark.parametrize("workers", [1, 3])
def test_computations_on_the_model_never_overlap(workers: int) -> None:
    q = JobQueue(workers=workers)
    running = 0
    most = 0
    lock = threading.Lock()

    def compute() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.02)
        with lock:
            running -= 1

    try:
        jobs = [q.submit(k, compute) for k in range(6)]
        assert all(j.wait(10) for j in jobs)
        assert most == 1
    finally:
        q.shutdown()


def test_a_job_asked_to_cancel_is_not_handed_to_the_next_request() -> None:
    q = JobQueue(workers=1)
    gate = threading.Event()
    try:
        first = q.submit("k", paced(50, gate))
        q.cancel(first.id)  # still running until its next step
        second = q.submit("k", paced(2))
        assert second is not first
        gate.set()
        assert first.wait(10) and first.state == "cancelled"
        assert second.wait(10) and second.state == "done" and second.result == 2
    finally:
        q.shutdown()


def test_failed_jobs_are_not_kept_by_id_forever() -> None:
    q = JobQueue(workers=1, cache_size=3)

    def fail() -> None:
        raise InputError("no")

    try:
        jobs = [q.submit(("f", k), fail) for k in range(20)]
        for job in jobs:
            assert job.wait(10) and job.state == "failed"
        assert len(q._by_id) <= 3
        assert q.get(jobs[-1].id) is jobs[-1]  # the newest still answer their status
    finally:
        q.shutdown()
