"""The command line: outputs, one-line errors with exit code 2, --debug tracebacks."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.cli import main
from tests.helpers.cli import exit_code as run
from tests.helpers.models import tiny_net_source

NET = tiny_net_source()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "labels.txt").write_text("cat\ndog\ncoffee mug\n")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png"
        )
    (tmp_path / "broken.jpg").write_bytes(b"not really a jpeg")
    Image.new("RGB", (20, 20)).save(tmp_path / "tiny.png")
    return {"dir": tmp_path}


def model_args(d: Path) -> list[str]:
    return ["--model", f"{d / 'net.py'}:build", "--classes", str(d / "labels.txt"), "--size", "32"]


def test_predict_prints_top_classes(setup, capsys) -> None:
    d = setup["dir"]
    assert run(["predict", str(d / "a.png"), *model_args(d), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "coffee mug" in text and "dog" in text and "a.png" in text


def test_explain_writes_panels_and_overlays(setup) -> None:
    d = setup["dir"]
    out = d / "out"
    args = [
        "explain",
        str(d / "a.png"),
        str(d / "b.png"),
        *model_args(d),
        "--out",
        str(out),
        "--methods",
        "saliency,occlusion,cam,gradcam",
        "--patch",
        "8",
        "--stride",
        "8",
        "--target",
        "dog",
    ]
    assert run(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "a_panel.png" in names and "b_gradcam.png" in names and "a_occlusion.png" in names
    with Image.open(out / "a_panel.png") as im:
        assert im.width > 4 * im.height / 2


def test_explain_top_k_writes_multiclass_view(setup) -> None:
    d = setup["dir"]
    out = d / "multi"
    assert (
        run(
            [
                "explain",
                str(d / "c.png"),
                *model_args(d),
                "--out",
                str(out),
                "--methods",
                "gradcam",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    assert (out / "c_gradcam_top2.png").exists()
    assert (out / "c_gradcam_1.png").exists() and (out / "c_gradcam_2.png").exists()


def test_layers_lists_shapes(setup, capsys) -> None:
    d = setup["dir"]
    assert run(["layers", f"{d / 'net.py'}:build", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "Conv2d" in text and "1x4x32x32" in text


VIT_NET = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
        return self.head(self.norm(self.blocks(t))[:, 0])


def build():
    torch.manual_seed(0)
    return ViT()
"""


def test_layers_and_explain_on_a_vision_transformer(setup, capsys) -> None:
    d = setup["dir"]
    (d / "vit.py").write_text(VIT_NET)
    assert run(["layers", f"{d / 'vit.py'}:build", "--size", "32"]) == 0
    text = capsys.readouterr().out
    norm1 = next(line for line in text.splitlines() if "blocks.1.norm1" in line)
    assert "tokens 17x16 -> 4x4 grid + 1 prefix" in norm1
    out = d / "vit-out"
    args = ["explain", str(d / "a.png"), "--model", f"{d / 'vit.py'}:build", "--size", "32"]
    assert run([*args, "--out", str(out), "--methods", "gradcam,eigencam"]) == 0
    assert (out / "a_gradcam.png").exists() and (out / "a_eigencam.png").exists()


def test_methods_lists_the_registry(capsys) -> None:
    from convlens import list_methods

    assert run(["methods"]) == 0
    text = capsys.readouterr().out
    for name in list_methods():
        assert name in text


def test_methods_options_lists_each_option_with_type_and_default(capsys) -> None:
    import inspect

    from convlens.methods import METHODS

    assert run(["methods", "--options"]) == 0
    text = capsys.readouterr().out
    assert "occlusion.patch  int (default 32)" in text
    for name, cls in METHODS.items():
        if cls.__init__ is object.__init__:
            continue
        for param in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert f"{name}.{param}  " in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["{d}/broken.jpg"], "not an image"),
        (["{d}/tiny.png"], "32 px"),
        (["{d}/missing.png"], "missing.png"),
        (["{d}/a.png", "--layer", "3x"], "no layer named"),
        (["{d}/a.png", "--target", "dgo"], "dog"),
        (["{d}/a.png", "--target", "7"], "out of range"),
        (["{d}/a.png", "--methods", "gradcma"], "gradcam"),
        ([""], "empty image path"),  # an unset shell variable: not the current folder
        (["{d}/empty"], "no images found in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, capsys, extra, message) -> None:
    d = setup["dir"]
    (d / "empty").mkdir(exist_ok=True)
    args = [
        "explain",
        *[e.format(d=d) for e in extra],
        *model_args(d),
        "--out",
        str(d / "o"),
        "--methods" if "--methods" not in extra else "--cmap",
        "gradcam" if "--methods" not in extra else "jet",
    ]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after the progress bar, if one was started
    assert last.startswith("error:") and message in last


def test_cam_on_a_model_without_gap_names_gradcam(tmp_path: Path, capsys) -> None:
    (tmp_path / "flat.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(2 * 32 * 32, 3))\n"
    )
    Image.new("RGB", (40, 40), "red").save(tmp_path / "r.png")
    code = run(
        [
            "explain",
            str(tmp_path / "r.png"),
            "--model",
            f"{tmp_path / 'flat.py'}:build",
            "--size",
            "32",
            "--methods",
            "cam",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "Grad-CAM" in capsys.readouterr().err


def test_debug_shows_the_traceback(setup) -> None:
    from convlens import ImageError

    d = setup["dir"]
    with pytest.raises(ImageError):
        main(["predict", str(d / "broken.jpg"), *model_args(d), "--debug"])


def test_bad_model_spec_is_one_line(tmp_path: Path, capsys) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    assert run(["predict", str(tmp_path / "x.png"), "--model", "lite9"]) == 2
    assert "lite" in capsys.readouterr().err


def test_docs_list_every_registered_method() -> None:
    from convlens import list_methods

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    notes = (root / "docs" / "methods.md").read_text()
    for name in list_methods():
        assert f"`{name}`" in readme, name
        assert f"`{name}`" in notes, name


def test_evaluate_writes_table_curves_and_sanity(setup) -> None:
    d = setup["dir"]
    (d / "set.csv").write_text("path,label\na.png,dog\nb.png,cat\nc.png,2\n")
    out = d / "eval"
    args = [
        "evaluate",
        str(d / "set.csv"),
        *model_args(d),
        "--out",
        str(out),
        "--methods",
        "gradcam,saliency",
        "--steps",
        "4",
        "--sanity",
        "--sanity-images",
        "2",
        "--use-labels",
    ]
    assert run(args) == 0
    text = (out / "metrics.md").read_text()
    assert "| gradcam |" in text and "(random)" in text and "(centre)" in text
    assert "Sanity checks" in text
    assert (out / "curves.png").exists() and (out / "sanity.png").exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 4  # header + 3 images x (2 methods + 2 baselines)


@pytest.mark.parametrize(
    ("flag", "expected"), [([], None), (["--compile"], True), (["--no-compile"], False)]
)
def test_evaluate_compile_flag(setup, monkeypatch: pytest.MonkeyPatch, flag, expected) -> None:
    import convlens.metrics as metrics

    d = setup["dir"]
    (d / "set.csv").write_text("path,label\na.png,dog\n")
    seen: list[object] = []
    original = metrics.evaluate_methods

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return original(*args, **{**kwargs, "compile": False})

    monkeypatch.setattr(metrics, "evaluate_methods", spy)
    args = [
        "evaluate",
        str(d / "set.csv"),
        *model_args(d),
        "--out",
        str(d / "ev"),
        "--methods",
        "gradcam",
        "--steps",
        "2",
        *flag,
    ]
    assert run(args) == 0
    assert seen == [expected]


@pytest.mark.parametrize("command", ["analyze", "evaluate", "features", "predict"])
def test_an_empty_path_is_an_error_not_the_current_folder(setup, capsys, command) -> None:
    d = setup["dir"]
    out = ["--out", str(d / "o")] if command != "predict" else []
    if command == "features":
        out += ["--layer", "0"]
    assert run([command, "", *model_args(d), *out]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and "empty" in last


def test_a_home_relative_path_is_expanded(setup, capsys, monkeypatch) -> None:
    d = setup["dir"]
    monkeypatch.setenv("HOME", str(d))
    assert run(["predict", "~/a.png", *model_args(d), "--top", "2"]) == 0
    assert "a.png" in capsys.readouterr().out


# ------------------------------------------------------------- one-line errors, user text


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command's stderr (progress output may precede it)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "{d}/a.png", "--top", "x"],  # not an integer
        ["predict", "{d}/a.png", "--bogus"],  # unknown option
        ["predict"],  # missing argument
        ["predict", "{d}/a.png", "--top"],  # option without its value
        ["explain", "{d}/a.png", "--alpha", "half"],  # not a number
        ["no-such-command"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(setup, capsys, args) -> None:
    d = setup["dir"]
    assert run([a.format(d=d) for a in args]) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert "--help" in line  # where to look next
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out.strip()


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["analyze", "--help"]])
def test_help_exits_0(capsys, args) -> None:
    assert run(args) == 0
    assert "Usage" in capsys.readouterr().out


def test_no_arguments_show_the_help(capsys) -> None:
    run([])
    captured = capsys.readouterr()
    assert "Usage" in captured.out and "predict" in captured.out
    assert "error:" not in captured.err


def markup_dir(d: Path) -> Path:
    """A folder whose path holds ``[/x]`` (a closing markup tag rich cannot match)."""
    folder = d / "[" / "x]"
    folder.mkdir(parents=True)
    return folder


def test_markup_in_file_and_class_names_is_printed_as_written(setup, capsys) -> None:
    d = setup["dir"]
    folder = markup_dir(d)
    (folder / "a.png").write_bytes((d / "a.png").read_bytes())
    (d / "labels.txt").write_text("[/x] cat\n:dog: [bold]\n[/] mug\n")
    assert run(["predict", str(folder / "a.png"), *model_args(d), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "[/x]/a.png" in text  # the table title
    for name in ("[/x] cat", ":dog: [bold]", "[/] mug"):  # cells: no markup, no emoji
        assert name in text


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["explain", "{d}/a.png", "--target", "[/x]", "--out", "{d}/x"], "'[/x]'"),
        (["explain", "{d}/a.png", "--layer", "[/x]", "--out", "{d}/x"], "[/x]"),
        (["predict", "{d}/[/x]/missing.png"], "[/x]/missing.png"),
        (["features", "{d}", "--layer", "[/x]", "--out", "{d}/f"], "[/x]"),
        (["classviz", "--class", "[/x]", "--steps", "1", "--out", "{d}/c"], "'[/x]'"),
        (["featviz", "--layer", "[/x]", "--steps", "1", "--out", "{d}/v"], "[/x]"),
        (["evaluate", "{d}/[/x].csv", "--out", "{d}/e"], "[/x].csv"),
    ],
)
def test_markup_in_an_error_message_is_printed_as_written(
    setup, capsys, monkeypatch, args, shown
) -> None:
    d = setup["dir"]
    monkeypatch.chdir(d)  # the default --out (convlens-out) is relative: not in the repository
    markup_dir(d)
    (d / "[" / "x].csv").write_text("path,label\na.png,[/x]\n")
    assert run([*(a.format(d=d) for a in args), *model_args(d)]) == 2
    assert shown in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad", [["--target", "zebra"], ["--layer", "conv@5"]])
def test_explain_with_a_bad_target_or_layer_leaves_no_output_folder(setup, capsys, bad) -> None:
    d = setup["dir"]
    out_dir = d / "maps"
    args = ["explain", str(d / "a.png"), "--methods", "gradcam", *bad, "--out", str(out_dir)]
    assert run([*args, *model_args(d)]) == 2
    error_line(capsys.readouterr().err)
    assert not out_dir.exists()  # no names claimed in a folder of nothing


def test_analyze_prints_markup_in_skipped_file_names(setup, capsys) -> None:
    d = setup["dir"]
    folder = markup_dir(d)
    (folder / "a.png").write_bytes((d / "a.png").read_bytes())
    (folder / "bad.jpg").write_bytes(b"not an image")
    args = ["analyze", str(folder), *model_args(d), "--out", str(d / "run"), "--top-errors", "0"]
    assert run(args) == 0
    assert f"skipped {folder / 'bad.jpg'}" in capsys.readouterr().err


def test_an_error_naming_a_file_with_a_newline_stays_one_line(setup, capsys) -> None:
    d = setup["dir"]
    assert run(["predict", str(d / "two\nlines\x1b[31m.png"), *model_args(d)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "two\\nlines\\x1b[31m.png" in line


def test_a_class_list_not_matching_the_outputs_is_one_line(setup, capsys) -> None:
    d = setup["dir"]
    (d / "labels.txt").write_text("cat\ndog\n")  # the model has 3 outputs
    assert run(["predict", str(d / "a.png"), *model_args(d)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "2 names" in line and "3 outputs" in line and "labels.txt" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label\na.png\n", "line 2: 1 field(s) where the header has 2"),
        ("path,label\na.png,cat,extra\n", "line 2: 3 fields where the header has 2"),
        ("path,label\n\n,cat\n", "line 3: the path cell is empty"),
        ("path,label\r\na.png,caf\xe9\r\n".encode("latin-1"), "byte 0xe9 at offset 21, line 2"),
    ],
)
def test_a_malformed_csv_is_one_line(setup, capsys, content, message) -> None:
    d = setup["dir"]
    csv_file = d / "set.csv"
    if isinstance(content, bytes):
        csv_file.write_bytes(content)
    else:
        csv_file.write_text(content)
    assert run(["evaluate", str(csv_file), *model_args(d), "--out", str(d / "e")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "set.csv" in line and message in line


def undecodable_name_dir(d: Path) -> tuple[Path, str]:
    """A class folder holding an image whose file name is not UTF-8 (byte 0xff)."""
    folder = d / "data" / "cat"
    folder.mkdir(parents=True)
    name = os.fsdecode(b"bad\xff.png")
    try:
        (folder / name).write_bytes((d / "a.png").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system does not take undecodable file names")
    for other in ("b", "c"):
        (folder / f"{other}.png").write_bytes((d / f"{other}.png").read_bytes())
    return folder, name


def test_a_file_name_that_is_not_utf8_does_not_stop_analyze(setup, capsys, caplog) -> None:
    d = setup["dir"]
    folder, _ = undecodable_name_dir(d)
    (folder / os.fsdecode(b"broken\xfe.jpg")).write_bytes(b"not an image")
    out = d / "run"
    args = ["analyze", str(d / "data"), *model_args(d), "--out", str(out), "--top-errors", "3"]
    assert run(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["failures"] == 1
    report = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "bad\\\\xff.png" in report or "bad\\xff.png" in report
    assert "skipped" in capsys.readouterr().err  # the unreadable one, named printably
    # and logged printably: a log file or handler on a strict UTF-8 stream takes every record
    assert any("broken\\xfe.jpg" in r.getMessage() for r in caplog.records)
    for r in caplog.records:
        r.getMessage().encode("utf-8")
    with sqlite3.connect(out / "predictions.sqlite") as db:
        reason = db.execute("SELECT reason FROM failures").fetchone()[0]
    assert "broken\\xfe.jpg" in reason
    assert run(args) == 0  # resumed: the stored path matches the file again
    with sqlite3.connect(out / "predictions.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 3


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate", "features"])
def test_a_file_name_that_is_not_utf8_works_in_every_command(setup, capsys, command) -> None:
    d = setup["dir"]
    folder, name = undecodable_name_dir(d)
    target = str(d / "data") if command in ("evaluate", "features") else str(folder)
    extra = {
        "predict": [],
        "explain": ["--methods", "saliency", "--out", str(d / "x")],
        "evaluate": ["--methods", "saliency", "--steps", "2", "--out", str(d / "e")],
        "features": ["--layer", "0", "--out", str(d / "f")],
    }[command]
    assert run([command, target, *model_args(d), *extra]) == 0
    captured = capsys.readouterr()
    if command == "predict":
        assert "bad\\xff.png" in captured.out
    if command == "explain":
        assert (d / "x" / f"{Path(name).stem}_panel.png").is_file()
    if command == "evaluate":
        assert "bad\\xff.png" in (d / "e" / "metrics.csv").read_text(encoding="utf-8")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
@pytest.mark.parametrize(
    "args",
    [
        ["predict", "{d}/a.png", "--classes", "{fifo}"],
        ["predict", "{fifo}"],
        ["evaluate", "{fifo}.csv"],
        ["predict", "{d}/a.png", "--model", "{fifo}.pt"],
    ],
)
def test_a_fifo_given_as_a_file_is_an_error_not_a_hang(tmp_path: Path, args) -> None:
    import subprocess
    import sys

    d = tmp_path
    Image.new("RGB", (40, 40)).save(d / "a.png")
    for fifo in (d / "pipe", d / "pipe.csv", d / "pipe.pt"):
        os.mkfifo(fifo)
    argv = [a.format(d=d, fifo=d / "pipe") for a in args]
    code = "import sys; from convlens.cli import main; main(sys.argv[1:])"
    proc = subprocess.run(  # a timeout, not a hang, if the pipe were opened
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "named pipe" in error_line(proc.stderr)
