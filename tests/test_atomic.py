"""Atomic artifact writes (convlens.atomic) and output names unique per input (convlens.outputs)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from convlens import atomic
from convlens.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    is_complete,
    remove_stale_temporaries,
    save_image,
)
from convlens.errors import ConvlensError, OutputError
from convlens.outputs import MANIFEST_NAME, claim_output_stems, lock_folder, output_stems


def leftovers(folder: Path) -> list[str]:
    """Temporary files of unfinished writes under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*.tmp-*"))


def png_bytes(size: int = 8) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_atomic_write_replaces_whole_and_leaves_nothing_else(tmp_path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    atomic_write_bytes(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_failing_writer_keeps_the_previous_version(tmp_path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer broke"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer broke")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_full_disk_is_an_output_error_naming_the_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("previous")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_fsync", full)
    with pytest.raises(OutputError) as info:
        atomic_write_text(target, "new")
    message = str(info.value)
    assert str(target) in message and "free some space" in message and "\n" not in message
    assert isinstance(info.value, ConvlensError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "previous" and leftovers(tmp_path) == []


def test_temporary_keeps_the_suffix_so_the_format_follows_the_destination(tmp_path) -> None:
    image = Image.new("RGB", (16, 12), (0, 128, 255))
    for name, fmt in (("t.jpg", "JPEG"), ("t.png", "PNG"), ("t.gif", "GIF")):
        path = save_image(image, tmp_path / name)
        with Image.open(path) as im:
            assert im.format == fmt and im.size == (16, 12)
    with atomic_path(tmp_path / "x.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".x.")
        tmp.write_bytes(png_bytes())


def test_save_figure_is_atomic(tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from convlens.render import save_figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png")
    assert is_complete(path)
    before = path.read_bytes()

    def broken(self, fname, **kwargs):  # type: ignore[no-untyped-def]
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OutputError, match=r"plot\.png"):
        save_figure(fig, path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_is_complete_tells_truncated_files(tmp_path) -> None:
    data = png_bytes()
    (tmp_path / "ok.png").write_bytes(data)
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    jpeg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(jpeg[:-10])
    (tmp_path / "notes.json").write_text("{}")
    got = {p.name: is_complete(p) for p in tmp_path.iterdir()}
    assert got == {
        "ok.png": True,
        "half.png": False,
        "empty.jpg": False,
        "ok.jpg": True,
        "half.jpg": False,
        "notes.json": True,
    }
    assert not is_complete(tmp_path / "missing.png") and not is_complete(tmp_path)


KILLED_WRITE = textwrap.dedent(
    """
    import os, sys
    from convlens.atomic import atomic_path

    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"\\x89PNG half of a picture")
            fh.flush()
            os._exit(9)  # killed mid-write: no cleanup runs
    """
)


def test_killed_write_leaves_no_partial_destination(tmp_path) -> None:
    target = tmp_path / "out" / "cat_panel.png"
    target.parent.mkdir()
    target.write_bytes(png_bytes())
    before = target.read_bytes()
    script = tmp_path / "kill.py"
    script.write_text(KILLED_WRITE)
    res = subprocess.run([sys.executable, str(script), str(target)], check=False)
    assert res.returncode == 9
    assert target.read_bytes() == before  # the previous version, whole
    assert len(leftovers(tmp_path)) == 1  # the dead process's temporary file
    mine = tmp_path / "out" / f".other.tmp-{os.getpid()}-0123abcd.png"
    mine.write_bytes(b"in progress")  # a write of this process: kept
    assert remove_stale_temporaries(tmp_path / "out") == 1
    assert leftovers(tmp_path) == [mine.name]
    # a fresh write of the killed file goes through
    atomic_write_bytes(target, png_bytes(4))
    assert is_complete(target) and target.read_bytes() != before


def test_lock_folder_removes_stale_temporaries(tmp_path) -> None:
    stale = tmp_path / ".x.tmp-999999999-deadbeef.png"
    stale.write_bytes(b"")
    with lock_folder(tmp_path, "explain"):
        assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == []  # the lock file goes with the lock


def test_output_stems_unique_stable_and_plain_when_possible(tmp_path) -> None:
    a, b = tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg"
    upper = tmp_path / "c" / "PHOTO.png"  # the same name on a case-insensitive file system
    cat = tmp_path / "cat.png"
    stems = output_stems([a, b, cat, upper, a])
    assert stems[2] == "cat" and stems[0] == stems[4]
    assert len({s.casefold() for s in stems[:4]}) == 4
    for path, stem in zip((a, b, upper), (stems[0], stems[1], stems[3]), strict=True):
        assert stem.startswith(path.stem + "-") and len(stem) == len(path.stem) + 5
    assert output_stems([b, a]) == [stems[1], stems[0]]  # stable: a function of the path only
    assert output_stems([a, cat]) == ["photo", "cat"]


def test_claimed_names_are_not_reused_for_another_input(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a, b = tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg"

    def marker(stem: str) -> str:
        return f"{stem}_panel.png"

    assert claim_output_stems(out, [a], marker) == ["photo"]
    (out / "photo_panel.png").write_bytes(png_bytes())
    assert claim_output_stems(out, [a], marker) == ["photo"]  # same input: same name
    other = claim_output_stems(out, [b], marker)
    assert other == output_stems([a, b])[1:]  # the hashed name, not "photo"
    # a file convlens did not record (an older run, the user's own) is not overwritten either
    (out / "dog_panel.png").write_bytes(png_bytes())
    assert claim_output_stems(out, [tmp_path / "dog.png"], marker)[0].startswith("dog-")
    assert (out / MANIFEST_NAME).is_file()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_explain_keeps_both_images_that_share_a_stem(tmp_path) -> None:
    from convlens.cli.explain import run_explain
    from convlens.models import Preprocess, load_model

    model = load_model(Tiny(), classes=None, preprocess=Preprocess(resize=32, crop=32))
    files = []
    for folder, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 40), colour).save(tmp_path / folder / "photo.png")
        files.append(tmp_path / folder / "photo.png")
    out = tmp_path / "out"
    written = run_explain(model, files, out, methods=["saliency"])
    assert len(written) == len(set(written)) == 4  # a panel and an overlay per image
    assert all(is_complete(p) for p in written)
    panels = sorted(p for p in written if p.name.endswith("_panel.png"))
    assert len(panels) == 2 and panels[0].read_bytes() != panels[1].read_bytes()
    # a later run of one of them alone does not overwrite the other's outputs
    alone = run_explain(model, files[1:], out, methods=["saliency"])
    assert set(alone) <= set(written)
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 4


def test_a_live_process_s_temporary_file_is_kept(tmp_path) -> None:
    # A subfolder can be another run's folder, locked and being written by a live process.
    sub = tmp_path / "out" / "nested-run"
    sub.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = sub / f".metrics.tmp-{sleeper.pid}-0123abcd.json"
        live.write_text("{}")
        assert remove_stale_temporaries(tmp_path / "out") == 0
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(tmp_path / "out") == 1  # its writer is gone now
    assert not live.exists()


def test_a_long_name_in_a_multibyte_script_is_written(tmp_path) -> None:
    name = "猫" * 80 + "_panel.png"  # 247 bytes in UTF-8: fits; the temporary name must too
    path = save_image(Image.new("RGB", (8, 8)), tmp_path / name)
    assert is_complete(path) and leftovers(tmp_path) == []
