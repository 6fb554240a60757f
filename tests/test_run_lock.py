"""One writer per output folder: the run-folder lock, and no mixing of two runs in one folder."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens.analysis import analyze
from convlens.errors import RunFolderError
from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from convlens.outputs import LOCK_NAME, lock_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

NET = textwrap.dedent(
    """
    import os, pathlib, time
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            started, gate = os.environ.get("TEST_STARTED"), os.environ.get("TEST_GATE")
            # Tell the test the run is under way, then wait for its go; not on the one-image
            # pass that counts the outputs when the model is loaded (before the folder is locked).
            if started and x.shape[0] > 1:
                pathlib.Path(started).touch()
                while not pathlib.Path(gate).exists():
                    time.sleep(0.02)
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def build():
        return Net()
    """
)

HOLD = textwrap.dedent(
    """
    import sys, time
    from convlens.outputs import lock_folder

    with lock_folder(sys.argv[1], "analyze"):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def make_data(root: Path, colours: tuple[int, int] = (0, 2)) -> Path:
    rng = np.random.default_rng(0)
    for c, folder in enumerate(("cat", "dog")):
        (root / folder).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
            pixels[..., colours[c]] = 250 - 30 * k
            Image.fromarray(pixels).save(root / folder / f"img{k}.png")
    return root


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    return {
        "dir": tmp_path,
        "data": make_data(tmp_path / "data"),
        "other": make_data(tmp_path / "other", colours=(1, 0)),
        "run": tmp_path / "run",
    }


def cli(setup: dict[str, Path], data: Path, **env: str) -> subprocess.Popen[str]:
    """``convlens analyze`` in a new process."""
    d = setup["dir"]
    args = ["analyze", str(data), "--model", f"{d / 'net.py'}:build"]
    args += ["--classes", str(d / "labels.txt"), "--size", "32", "--out", str(setup["run"])]
    args += ["--batch-size", "4", "--top-errors", "1", "--no-faithfulness"]
    return subprocess.Popen(
        [sys.executable, "-m", "convlens.cli", *args],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def stored(run: Path) -> tuple[dict[str, object], int, int]:
    with sqlite3.connect(run / "predictions.sqlite") as conn:
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        preds = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
        fails = conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
    return meta, preds, fails


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.communicate()}")
        assert time.monotonic() < end, "the first run did not start"
        time.sleep(0.05)


def test_two_concurrent_runs_one_fails_cleanly(setup) -> None:
    started, gate = setup["dir"] / "started", setup["dir"] / "gate"
    first = cli(setup, setup["data"], TEST_STARTED=str(started), TEST_GATE=str(gate))
    try:
        wait_for(started, first)  # the first run holds the folder and is predicting
        second = cli(setup, setup["other"])
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2
        line = error_line(err)
        assert f"being written by another convlens analyze (pid {first.pid})" in line
        assert "--out" in line
    finally:
        gate.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    # the folder holds the first run only, whole
    meta, preds, fails = stored(setup["run"])
    assert meta["data"] == str(setup["data"].resolve())
    assert preds + fails == 6
    metrics = json.loads((setup["run"] / "metrics.json").read_text())
    assert metrics["images"] == preds == 6
    assert not (setup["run"] / LOCK_NAME).exists()


def tiny_model(classes: Path) -> ConvlensModel:
    spec = f"{classes.parent / 'net.py'}:build"
    return load_model(spec, classes=classes, preprocess=Preprocess(resize=32, crop=32))


def test_a_folder_of_another_run_is_not_mixed_into(setup) -> None:
    model = tiny_model(setup["dir"] / "labels.txt")
    kw: dict[str, Any] = {"batch_size": 4, "top_errors": 1, "progress": False}
    kw["faithfulness"] = False
    analyze(model, setup["data"], setup["run"], **kw)
    before = stored(setup["run"])
    metrics = (setup["run"] / "metrics.json").read_bytes()
    with pytest.raises(RunFolderError, match=r"holds another analysis run \(data .*new --out"):
        analyze(model, setup["other"], setup["run"], **kw)
    (setup["dir"] / "renamed.txt").write_text("dog\ncat\n")
    renamed = tiny_model(setup["dir"] / "renamed.txt")
    with pytest.raises(RunFolderError, match="other class names"):
        analyze(renamed, setup["data"], setup["run"], **kw)
    assert stored(setup["run"]) == before
    assert (setup["run"] / "metrics.json").read_bytes() == metrics
    # the same data given another way (a relative path) is the same run
    cwd = os.getcwd()
    os.chdir(setup["dir"])
    try:
        again = analyze(model, "data", setup["run"], **kw)
    finally:
        os.chdir(cwd)
    assert again.metrics["images"] == 6


def test_the_lock_goes_with_the_process_that_held_it(tmp_path) -> None:
    folder = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"another convlens analyze \(pid {holder.pid}\)"
        with pytest.raises(RunFolderError, match=busy), lock_folder(folder, "analyze"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no cleanup of its own
        holder.communicate(timeout=60)
    assert (folder / LOCK_NAME).exists()  # left behind, but not held any more
    # a killed run's folder can be written again at once; a second writer in this process too
    # is refused
    with (
        lock_folder(folder, "analyze"),
        pytest.raises(RunFolderError, match="another convlens analyze"),
        lock_folder(folder, "features"),
    ):
        pass
    assert not (folder / LOCK_NAME).exists()


def test_explain_into_a_folder_being_written_fails_cleanly(tmp_path) -> None:
    from convlens.cli.explain import run_explain

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)))

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "a.png")
    model = load_model(Tiny(), classes=None, preprocess=Preprocess(resize=32, crop=32))
    out = tmp_path / "out"
    busy = "being written by another convlens analyze"
    with lock_folder(out, "analyze"), pytest.raises(RunFolderError, match=busy):
        run_explain(model, [tmp_path / "a.png"], out, methods=["saliency"])
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("command", ["evaluate", "classviz", "featviz"])
def test_commands_writing_a_folder_being_written_fail_cleanly(tmp_path, capsys, command) -> None:
    from convlens.cli import main

    out = tmp_path / "out"
    args = {
        "evaluate": ["evaluate", str(tmp_path)],
        "classviz": ["classviz", "--class", "0"],
        "featviz": ["featviz", "--layer", "x"],
    }[command]
    with lock_folder(out, "analyze"), pytest.raises(SystemExit) as info:
        main([*args, "--model", "nope.py:build", "--out", str(out)])
    assert info.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert f"{out} is being written by another convlens analyze (pid {os.getpid()})" in line
    assert not out.exists()  # made for the lock only, and gone with it


def test_a_bad_input_leaves_no_empty_output_folder(tmp_path, capsys) -> None:
    from convlens.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(tmp_path / "missing"), "--model", "nope.py:b", "--out", str(out)])
    assert info.value.code == 2 and not out.exists()
    capsys.readouterr()
