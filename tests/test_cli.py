"""The command line: outputs, one-line errors with exit code 2, --debug tracebacks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.cli import main

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
        )
    """
)


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


def run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


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
    ("flag", "expected"), [([], "auto"), (["--compile"], True), (["--no-compile"], False)]
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
