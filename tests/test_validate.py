"""One validation layer for numbers and devices (:mod:`convlens.validate`): its checks, the
bounds declared on method options (the constructor and ``-o METHOD.OPTION=VALUE`` fail the same
way), the Python entry points, and every command's numeric options (exit code 2, one
``error:`` line naming the option, no work done)."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens.cli import main
from convlens.errors import InputError
from convlens.methods import METHODS, get_method
from convlens.methods.options import (
    _class_parameters,
    build_methods,
    method_options,
    parse_method_options,
)
from convlens.models import ConvlensModel, Preprocess, load_model
from convlens.models.classes import ClassList
from convlens.validate import (
    Bound,
    at_least,
    bounds_of,
    finite_float,
    finite_floats,
    fraction,
    non_negative_float,
    non_negative_int,
    parse_device,
    positive_float,
    positive_int,
)
from tests.helpers.models import images

# ---------------------------------------------------------------------------- the checks


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (positive_int, [1, 7, np.int64(3)], [0, -1, True, 1.5, "3", None, float("nan")]),
        (non_negative_int, [0, 5], [-1, False, 0.0, "0"]),
        (positive_float, [1e-9, 2, 3.5], [0, -1.0, float("nan"), float("inf"), True, "1", 10**400]),
        (non_negative_float, [0, 0.0, 4], [-1e-9, float("nan"), float("-inf")]),
        (finite_float, [-3, 0, 2.5], [float("nan"), float("inf"), "x"]),
        (fraction, [0, 0.5, 1], [-0.1, 1.01, 2, float("nan")]),
    ],
)
def test_checks_return_good_values_and_name_the_option_for_bad_ones(
    check: Any, good: list[object], bad: list[object]
) -> None:
    for value in good:
        out = check(value, "--opt")
        assert out == value and type(out) in (int, float)
    for value in bad:
        with pytest.raises(InputError, match=r"^--opt must be .*, got "):
            check(value, "--opt")


def test_integer_checks_return_python_ints() -> None:
    assert type(positive_int(np.int64(4), "n")) is int


def test_at_least_and_finite_floats() -> None:
    assert at_least(1.0, "scale", 1.0) == 1.0
    with pytest.raises(InputError, match=r"scale must be a number >= 1, got 0.5"):
        at_least(0.5, "scale", 1.0)
    assert finite_floats([1, 2, 3], "mean", count=3) == (1.0, 2.0, 3.0)
    assert finite_floats(torch.tensor([0.5, 0.25]), "std", count=2) == (0.5, 0.25)
    assert finite_floats(np.array([1.0]), "std") == (1.0,)
    for values in ([1, 2], [1, float("nan"), 3], "abc", 3):
        with pytest.raises(InputError, match="mean must"):
            finite_floats(values, "mean", count=3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="std must be positive finite numbers"):
        finite_floats([1, 0, 1], "std", count=3, positive=True)


@pytest.mark.parametrize(
    ("bound", "words", "inside", "outside"),
    [
        (Bound(integer=True, low=1), "a positive integer", [1, 9], [0]),
        (Bound(integer=True, low=0), "an integer >= 0", [0], [-1]),
        (Bound(low=0, low_open=True), "a positive number", [1e-30], [0.0]),
        (Bound(low=0, high=1), "a number in [0, 1]", [0.0, 1.0], [-1e-9, 1.5]),
        (Bound(low=0, low_open=True, high=1), "a number in (0, 1]", [1.0], [0.0]),
        (Bound(high=2, high_open=True), "a number < 2", [1.9], [2.0]),
        (Bound(), "a finite number", [-1e30], [float("inf")]),
    ],
)
def test_bounds_describe_what_they_check(
    bound: Bound, words: str, inside: list[float], outside: list[float]
) -> None:
    assert bound.describe() == words
    for v in inside:
        bound.check(v, "x")
    for v in outside:
        with pytest.raises(InputError, match=f"^x must be {re.escape(words)}, got "):
            bound.check(v, "x")


# ----------------------------------------------------------------------------- devices


def test_parse_device() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for text, message in [
        ("gpu", r"--device 'gpu' is not a device; use cpu, cuda, cuda:N, mps or auto"),
        ("cuda:x", r"--device 'cuda:x' is not a device"),
        ("", r"--device '' is not a device"),
        ("meta", r"--device 'meta' is not supported"),
        ("cuda:99", r"--device 'cuda:99'"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_device(text, "--device")
    with pytest.raises(InputError, match="must be a device name"):
        parse_device(3, "device")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(InputError, match="no CUDA device is available"):
        parse_device("cuda")
    with pytest.raises(InputError, match="no CUDA device is available"):
        load_model(nn.Linear(2, 2), device="cuda")


def test_load_model_checks_the_device() -> None:
    with pytest.raises(InputError, match="device 'gpu' is not a device"):
        load_model(nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), device="gpu")


# ------------------------------------------------------------- declared method option bounds


def _declared() -> list[tuple[str, str, Bound]]:
    out = []
    for name, cls in METHODS.items():
        for option, (_, extras, _) in _class_parameters(cls).items():
            for bound in bounds_of(extras)[:1]:
                out.append((name, option, bound))
    return out


def _outside(bound: Bound) -> list[float]:
    """Values just outside a bound (and NaN for float bounds)."""
    values: list[float] = [] if bound.integer else [math.nan, math.inf]
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - 1)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + 1)
    if bound.integer:
        return [*values, 2.5]
    return [float(v) for v in values]


DECLARED = _declared()


def test_the_methods_declare_bounds() -> None:
    declared = {(m, o) for m, o, _ in DECLARED}
    for expected in [
        ("occlusion", "patch"),
        ("occlusion", "stride"),
        ("occlusion", "fill"),
        ("occlusion", "tau"),
        ("rise", "p"),
        ("scorecam", "top_channels"),
        ("intgrad", "steps"),
        ("smoothgrad", "samples"),
        ("tta", "scales"),
    ]:
        assert expected in declared


@pytest.mark.parametrize(("method", "option", "bound"), DECLARED)
def test_constructor_and_method_option_text_fail_the_same_way(
    method: str, option: str, bound: Bound
) -> None:
    """Every declared bound, from both sides: the constructor and ``-o METHOD.OPTION=V``."""
    hint = _class_parameters(METHODS[method])[option][1]
    sequence = "tuple" in str(hint)
    for value in _outside(bound):
        given: Any = (1.0, value) if sequence else value
        with pytest.raises(InputError) as from_python:
            get_method(method, **{option: given})
        text = f"1.0,{value}" if sequence else str(value)
        with pytest.raises(InputError) as from_text:
            parse_method_options([f"{method}.{option}={text}"])
        with pytest.raises(InputError) as from_build:
            build_methods({method: {option: given}})
        expected = f"{method}.{option} must be {bound.describe()}"
        assert str(from_python.value).startswith(expected)
        if bound.integer and value == 2.5:
            continue  # "2.5" is not even parsed as an integer from text
        assert str(from_text.value) == str(from_python.value) == str(from_build.value)


def test_method_options_list_the_bounds() -> None:
    opts = method_options("occlusion")
    assert opts["patch"] == "int (default 32), a positive integer"
    assert opts["tau"].endswith("a number in (0, 1]")
    assert opts["score"] == "'prob' | 'logit' (default 'prob')"  # choices, no bound


def test_valid_options_still_work() -> None:
    m = get_method("occlusion", patch=8, stride=4, fill=0.5, tau=1.0, drill=0.0)
    assert (m.patch, m.stride, m.fill) == (8, 4, 0.5)  # type: ignore[attr-defined]
    assert parse_method_options(["occlusion.fill=blur", "tta.scales=1,0.5"]) == {
        "occlusion": {"fill": "blur"},
        "tta": {"scales": (1.0, 0.5)},
    }
    # a subclass calling its parent's constructor is checked under its own name
    with pytest.raises(InputError, match=r"^vargrad.samples must be a positive integer"):
        get_method("vargrad", samples=0)


def test_top_k_is_checked_by_every_method(gap_net: nn.Module) -> None:
    x = images(1)
    for name in ("saliency", "gradcam", "occlusion"):
        for top_k in (0, -2, 1.5):
            with pytest.raises(InputError, match="top_k must be a positive integer"):
                get_method(name)(gap_net, x, top_k=top_k)  # type: ignore[arg-type]


# ------------------------------------------------------------------- Python entry points


def test_preprocess_is_checked() -> None:
    assert Preprocess(resize=None, crop=8, std=[0.2, 0.2, 0.2]).std == (0.2, 0.2, 0.2)
    for kwargs, message in [
        ({"crop": 0}, "preprocess crop must be a positive integer"),
        ({"resize": -1}, "preprocess resize must be a positive integer"),
        ({"std": (0.5, 0.0, 0.5)}, "preprocess std must be positive finite numbers"),
        ({"std": (0.5, -0.5, 0.5)}, "preprocess std must be positive finite numbers"),
        ({"mean": (0.5, float("nan"), 0.5)}, "preprocess mean must be finite numbers"),
        ({"mean": (0.5, 0.5)}, "preprocess mean must have 3 values"),
    ]:
        with pytest.raises(InputError, match=message):
            Preprocess(**kwargs)  # type: ignore[arg-type]


def test_explanation_display_options_are_checked(gap_net: nn.Module) -> None:
    exp = get_method("saliency")(gap_net, images(1))
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="alpha must be a number in"):
            exp.overlay(alpha=alpha)
    assert exp.normalized(percentile=99).shape == exp.signed(percentile=1).shape
    for p in (101, 10, float("nan")):
        with pytest.raises(InputError, match=r"percentile must be a number in \[50, 100\]"):
            exp.normalized(percentile=p)
    for p in (0, -1, 100.5):
        with pytest.raises(InputError, match=r"percentile must be a number in \(0, 100\]"):
            exp.signed(percentile=p)


TINY = ConvlensModel(
    nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ),
    Preprocess(resize=None, crop=16),
    ClassList.generic(3),
    name="tiny",
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("class_0", "class_1"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{k}.png")
    return tmp_path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"workers": -1}, "workers must be an integer >= 0"),
        ({"top_errors": -1}, "top_errors must be an integer >= 0"),
        ({"limit": 0}, "limit must be a positive integer"),
    ],
)
def test_analyze_checks_its_numbers_before_any_work(
    folder: Path, kwargs: dict[str, Any], message: str
) -> None:
    from convlens.analysis import analyze

    with pytest.raises(InputError, match=message):
        analyze(TINY, folder / "data", folder / "run", progress=False, **kwargs)
    assert not (folder / "run").exists()


def test_read_labelled_checks_limit(folder: Path) -> None:
    from convlens.data import read_labelled

    assert len(read_labelled(folder / "data", TINY.classes, limit=3)) == 3
    with pytest.raises(InputError, match="limit must be a positive integer, got -1"):
        read_labelled(folder / "data", TINY.classes, limit=-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top": 0}, "top must be a positive integer"),
        ({"num_channels": -1}, "num_channels must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"workers": -1}, "workers must be an integer >= 0"),
    ],
)
def test_scan_features_checks_its_numbers(
    folder: Path, kwargs: dict[str, Any], message: str
) -> None:
    from convlens.features import scan_features

    files = sorted((folder / "data").rglob("*.png"))
    with pytest.raises(InputError, match=message):
        scan_features(TINY, files, ["1"], progress=False, **kwargs)


def test_metrics_check_their_numbers() -> None:
    from convlens.metrics import cascading_randomization, deletion_insertion, evaluate_methods

    x = torch.rand(2, 3, 16, 16)
    maps, targets = torch.rand(2, 16, 16), torch.tensor([0, 1])
    with pytest.raises(InputError, match="steps must be a positive integer, got 0"):
        deletion_insertion(TINY, x, maps, targets, steps=0)
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        deletion_insertion(TINY, x, maps, targets, batch_size=0)
    with pytest.raises(InputError, match="blur_sigma must be a positive number"):
        deletion_insertion(TINY, x, maps, targets, blur_sigma=float("nan"))
    with pytest.raises(InputError, match="steps must be a positive integer, got -3"):
        evaluate_methods(TINY, x, ["saliency"], steps=-3)
    with pytest.raises(InputError, match="checkpoints must be a positive integer, got 0"):
        cascading_randomization(TINY, x, ["saliency"], checkpoints=0)
    with pytest.raises(InputError, match="seed must be an integer in"):
        cascading_randomization(TINY, x, ["saliency"], seed=2**64)
    with pytest.raises(InputError, match="seed must be an integer in"):
        evaluate_methods(TINY, x, ["saliency"], seed=-(2**64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "steps must be an integer >= 0"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"l2": -1.0}, "l2 must be a number >= 0"),
        ({"jitter": -2}, "jitter must be an integer >= 0"),
        ({"scale": (0.9, float("inf"))}, "scale must be positive finite numbers"),
        ({"decay": 1.0}, r"decay must be in \[0, 1\)"),
        ({"seed": 2**64}, "seed must be an integer in"),
    ],
)
def test_synthesis_settings_are_checked(kwargs: dict[str, Any], message: str) -> None:
    from convlens.synthesis import class_visualization

    with pytest.raises(InputError, match=message):
        class_visualization(TINY, [0], progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"octaves": 0}, "octaves must be a positive integer"),
        ({"octave_scale": float("nan")}, "octave_scale must be a number >= 1"),
        ({"octave_scale": 0.5}, "octave_scale must be a number >= 1"),
        ({"steps_per_octave": -1}, "steps_per_octave must be an integer >= 0"),
        ({"step_size": float("inf")}, "step_size must be a positive number"),
        ({"max_size": 0}, "max_size must be a positive integer"),
        ({"channel": -1}, "channel must be an integer >= 0"),
        ({"seed": 2**64}, "seed must be an integer in"),
    ],
)
def test_deep_dream_checks_its_numbers(kwargs: dict[str, Any], message: str) -> None:
    from convlens.synthesis import deep_dream

    with pytest.raises(InputError, match=message):
        deep_dream(TINY, torch.rand(3, 32, 32), "1", progress=False, **kwargs)


# ------------------------------------------------------------------------------- commands

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )
    """
)


@pytest.fixture
def cli_setup(folder: Path) -> Path:
    (folder / "net.py").write_text(NET)
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(folder / "photo.png")
    return folder


BAD_OPTIONS = [
    ("predict", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("predict", ["--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
    ("predict", ["--top", "0"], "--top must be a positive integer, got 0"),
    ("predict", ["--top", "-1"], "--top must be a positive integer, got -1"),
    ("predict", ["--size", "0"], "--size must be a positive integer, got 0"),
    ("predict", ["--resize", "-5"], "--resize must be a positive integer, got -5"),
    ("predict", ["--std", "0"], "--std must be positive finite numbers"),
    ("predict", ["--std", "nan"], "--std must be positive finite numbers"),
    ("predict", ["--mean", "0.5,inf,0.5"], "--mean must be finite numbers"),
    ("predict", ["--device", "gpu"], "--device 'gpu' is not a device"),
    ("predict", ["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    ("predict", ["--device", "meta"], "--device 'meta' is not supported"),
    ("explain", ["--patch", "0"], "--patch must be a positive integer, got 0"),
    ("explain", ["--stride", "0"], "--stride must be a positive integer, got 0"),
    ("explain", ["--top-k", "0"], "--top-k must be a positive integer, got 0"),
    ("explain", ["--alpha", "2"], r"--alpha must be a number in \[0, 1\], got 2.0"),
    ("explain", ["--alpha", "nan"], r"--alpha must be a number in \[0, 1\], got nan"),
    ("explain", ["--batch-size", "0"], "--batch-size must be a positive integer"),
    ("explain", ["--fill", "nan"], "occlusion.fill must be a finite number, got nan"),
    ("explain", ["--std", "0,1,1"], "--std must be positive finite numbers"),
    ("layers", ["--size", "0"], "--size must be a positive integer"),
    ("layers", ["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    ("features", ["--num-channels", "0"], "--num-channels must be a positive integer"),
    ("features", ["--top", "0"], "--top must be a positive integer"),
    ("features", ["--limit", "0"], "--limit must be a positive"),
    ("features", ["--workers", "-1"], "--workers must be an integer >= 0, got -1"),
    ("features", ["--batch-size", "0"], "--batch-size must be a positive integer"),
    ("analyze", ["--top-errors", "-1"], "--top-errors must be an integer >= 0, got -1"),
    ("analyze", ["--batch-size", "0"], "--batch-size must be a positive integer"),
    ("analyze", ["--workers", "-1"], "--workers must be an integer >= 0"),
    ("analyze", ["--limit", "0"], "--limit must be a positive integer"),
    ("analyze", ["-o", "occlusion.patch=0"], "occlusion.patch must be a positive integer"),
    ("analyze", ["--device", "gpu"], "--device 'gpu' is not a device"),
    ("evaluate", ["--steps", "0"], "--steps must be a positive integer, got 0"),
    ("evaluate", ["--sanity-images", "0"], "--sanity-images must be a positive integer"),
    ("evaluate", ["--limit", "-2"], "--limit must be a positive integer, got -2"),
    ("evaluate", ["--batch-size", "0"], "--batch-size must be a positive integer"),
    ("classviz", ["--steps", "-1"], "--steps must be an integer >= 0, got -1"),
    ("classviz", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("classviz", ["--samples", "0"], "--samples must be a positive integer"),
    ("classviz", ["--size", "0"], "--size must be a positive integer"),
    ("featviz", ["--steps", "-4"], "--steps must be an integer >= 0"),
    ("featviz", ["--lr", "-1"], "--lr must be a positive number"),
    ("dream", ["--octaves", "0"], "--octaves must be a positive integer, got 0"),
    ("dream", ["--octave-scale", "nan"], "--octave-scale must be a number >= 1, got nan"),
    ("dream", ["--octave-scale", "0.5"], "--octave-scale must be a number >= 1"),
    ("dream", ["--steps", "-1"], "--steps must be an integer >= 0"),
    ("dream", ["--step-size", "0"], "--step-size must be a positive number"),
    ("dream", ["--jitter", "-1"], "--jitter must be an integer >= 0"),
    ("dream", ["--max-size", "0"], "--max-size must be a positive integer"),
    ("dream", ["--channel", "-1"], "--channel must be an integer >= 0"),
    ("dream", ["--seed", str(2**64)], "--seed must be an integer in"),
    ("classviz", ["--seed", str(-(2**63) - 1)], "--seed must be an integer in"),
    ("demo", ["--top-k", "0"], "--top-k must be a positive integer"),
]


def _command(command: str, d: Path) -> list[str]:
    model = ["--model", f"{d / 'net.py'}:build"]
    out = ["--out", str(d / "out")]
    photo, data = str(d / "photo.png"), str(d / "data")
    return {
        "predict": ["predict", photo, *model],
        "explain": ["explain", photo, *model, *out],
        "layers": ["layers", f"{d / 'net.py'}:build"],
        "features": ["features", data, "--layer", "1", *model, *out],
        "analyze": ["analyze", data, *model, *out],
        "evaluate": ["evaluate", data, *model, *out],
        "classviz": ["classviz", "--class", "0", *model, *out],
        "featviz": ["featviz", "--layer", "1", *model, *out],
        "dream": ["dream", photo, "--layer", "1", *model, *out],
        "demo": ["demo", *out],
    }[command]


@pytest.mark.parametrize(("command", "args", "message"), BAD_OPTIONS)
def test_every_numeric_option_is_checked_with_one_error_line(
    cli_setup: Path, capsys: pytest.CaptureFixture[str], command: str, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*_command(command, cli_setup), *args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err + captured.out
    assert re.search(message, lines[0]), lines[0]
    assert not (cli_setup / "out").exists()  # nothing was written
