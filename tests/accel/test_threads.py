"""The thread governor: torch threads follow the cores other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from convlens import get_method
from convlens.accel import Acceleration
from convlens.accel import threads as threads_mod
from convlens.accel.threads import (
    ThreadGovernor,
    governed_threads,
    runnable_elsewhere,
    usable_cores,
)
from tests.helpers.models import GapNet, images, seeded


def _stat(pid: int, state: str, name: str = "python") -> str:
    return f"{pid} ({name}) {state} 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0\n"


def fake_proc(
    root: Path,
    *,
    loadavg_running: int,
    own: list[str],
    others: dict[int, list[str]],
    container: bool = False,
) -> Path:
    """A folder shaped like procfs: ``loadavg``, this process's threads' states under
    ``self/task``, and other processes' threads under ``<pid>/task``."""
    proc = root / "proc"
    proc.mkdir()
    total = len(own) + sum(len(t) for t in others.values())
    (proc / "loadavg").write_text(f"1.00 0.50 0.25 {loadavg_running}/{total} 999\n")
    (proc / "self").mkdir()
    nspid = "4242 7" if container else "4242"
    (proc / "self" / "status").write_text(f"Name:\tpython\nNSpid:\t{nspid}\nThreads:\t1\n")
    for i, state in enumerate(own):
        task = proc / "self" / "task" / str(100 + i)
        task.mkdir(parents=True)
        (task / "stat").write_text(_stat(100 + i, state, "a) b (c"))
    for pid, states in others.items():
        for i, state in enumerate(states):
            task = proc / str(pid) / "task" / str(pid + i)
            task.mkdir(parents=True)
            (task / "stat").write_text(_stat(pid + i, state))
    return proc


def test_other_processes_runnable_threads_are_counted(tmp_path: Path) -> None:
    # 3 runnable on the machine, 1 of them ours; the two others are visible
    proc = fake_proc(
        tmp_path, loadavg_running=3, own=["R", "S", "S"], others={2000: ["R", "S"], 3000: ["R"]}
    )
    assert runnable_elsewhere(samples=2, pause=0, proc=proc) == 2


def test_nothing_else_running_is_zero(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, loadavg_running=2, own=["R", "R"], others={2000: ["S"]})
    assert runnable_elsewhere(proc=proc) == 0


def test_a_hosts_load_invisible_in_the_container_is_ignored(tmp_path: Path) -> None:
    # /proc/loadavg is the host's inside a container: 40 runnable tasks, none of them visible
    proc = fake_proc(
        tmp_path, loadavg_running=40, own=["R"], others={2000: ["S", "R"]}, container=True
    )
    assert runnable_elsewhere(samples=1, proc=proc) == 1


def test_outside_a_container_the_machines_count_stands(tmp_path: Path) -> None:
    # without a PID namespace every process is counted by /proc/loadavg (no scan needed)
    proc = fake_proc(tmp_path, loadavg_running=4, own=["R"], others={2000: ["S"]})
    assert runnable_elsewhere(samples=1, proc=proc) == 3


def test_unreadable_proc_means_no_answer(tmp_path: Path) -> None:
    assert runnable_elsewhere(proc=tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("cores", "limit", "others", "expected"),
    [(2, 2, 0, 2), (2, 2, 1, 1), (2, 2, 5, 1), (8, 4, 2, 4), (8, 8, 3, 5), (4, 1, 0, 1)],
)
def test_threads_are_the_free_cores_up_to_the_limit(
    tmp_path: Path, cores: int, limit: int, others: int, expected: int
) -> None:
    proc = fake_proc(tmp_path, loadavg_running=1 + others, own=["R"], others={2000: ["R"] * others})
    governor = ThreadGovernor(limit=limit, cores=cores, proc=proc)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threads_mod.os, "cpu_count", lambda: cores)
        assert governor.choose() == expected


def test_no_proc_keeps_the_limit(tmp_path: Path) -> None:
    assert ThreadGovernor(limit=3, cores=8, proc=tmp_path / "missing").choose() == 3


def test_check_applies_and_rechecks_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = fake_proc(tmp_path, loadavg_running=2, own=["R"], others={2000: ["R"]})
    monkeypatch.setattr(threads_mod.os, "cpu_count", lambda: 2)
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    governor = ThreadGovernor(limit=2, cores=2, proc=proc, interval=3600)
    assert governor.check() == 1
    (proc / "loadavg").write_text("1.00 0.50 0.25 1/3 999\n")  # the other process stopped
    assert governor.check() == 1  # not re-counted within the interval
    governor.interval = 0
    assert governor.check() == 2
    assert set_to == [1, 2]


def test_governed_block_restores_the_setting_also_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), governed_threads(limit=1) as governor:
        assert torch.get_num_threads() == 1
        assert governor.threads == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs Linux procfs")
def test_a_real_busy_process_is_seen() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        seen = 0
        while time.monotonic() < deadline and not seen:
            time.sleep(0.1)
            seen = runnable_elsewhere() or 0
        assert seen >= 1
    finally:
        busy.kill()
        busy.wait()


def test_usable_cores_matches_the_affinity() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    assert usable_cores() == (expected or os.cpu_count())


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("occlusion", {"patch": 4, "stride": 2, "batch_size": 3}),
        ("rise", {"masks": 12, "batch_size": 4}),
        ("scorecam", {"batch_size": 2}),
        ("intgrad", {"steps": 8, "batch_size": 4}),
        ("smoothgrad", {"samples": 6, "batch_size": 2}),
    ],
)
def test_long_methods_recount_between_chunks(
    name: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting_check(self: ThreadGovernor) -> int:
        calls.append(1)
        return self.limit

    monkeypatch.setattr(threads_mod.ThreadGovernor, "check", counting_check)
    net, x = seeded(GapNet()), images(2)
    get_method(name, **options)(net, x, accel=Acceleration(threads="auto"))
    assert len(calls) >= 3  # on entry and between chunks


def test_auto_threads_equal_fixed_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The governor switching between 2 and 1 threads between chunks changes nothing that is
    computed (to float rounding)."""
    counts = iter([2, 1] * 50)
    seen: list[int] = []

    def alternate(self: ThreadGovernor) -> int:
        seen.append(next(counts))
        return seen[-1]

    clock = iter(range(0, 10**6, 10))  # every check is a re-count (10 s apart)
    monkeypatch.setattr(threads_mod.ThreadGovernor, "choose", alternate)
    monkeypatch.setattr(threads_mod.time, "monotonic", lambda: float(next(clock)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net, x = seeded(GapNet()), images(2)
        method = get_method("occlusion", patch=4, stride=2, batch_size=5)
        auto = method(net, x, accel=Acceleration(threads="auto"))
        fixed = method(net, x, accel=Acceleration(threads=1))
    finally:
        torch.set_num_threads(before)
    assert 1 in seen and 2 in seen
    torch.testing.assert_close(auto.maps, fixed.maps)


def test_a_narrower_affinity_mask_leaves_the_threads_alone(tmp_path: Path) -> None:
    # /proc/loadavg counts every core's tasks; with 2 of 8 cores it says nothing about ours
    proc = fake_proc(tmp_path, loadavg_running=6, own=["R"], others={2000: ["R"] * 5})
    with_mask = ThreadGovernor(limit=2, cores=2, proc=proc)
    if (os.cpu_count() or 1) > 2:
        assert with_mask.choose() == 2


def test_auto_changes_nothing_off_the_cpu_or_when_deterministic() -> None:
    with Acceleration(threads="auto").threads_for_call(torch.device("meta")) as governor:
        assert governor is None
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with Acceleration(threads="auto").threads_for_call(torch.device("cpu")) as governor:
            assert governor is None
    finally:
        torch.use_deterministic_algorithms(before)
