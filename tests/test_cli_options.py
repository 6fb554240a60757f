"""The options the commands share: parsing, model loading, one help text per shared option."""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from convlens import InputError
from convlens.cli import app
from convlens.cli.explain import multiclass_method
from convlens.cli.options import (
    ModelOptions,
    load_net,
    option_group,
    parse_device,
    parse_methods,
    parse_triple,
)
from convlens.console import progress_bar, progress_callback

NET = textwrap.dedent(
    """
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """
)


def test_parse_triple() -> None:
    assert parse_triple(None, "mean") is None
    assert parse_triple("0.5", "mean") == (0.5, 0.5, 0.5)
    assert parse_triple("0.1,0.2,0.3", "std") == (0.1, 0.2, 0.3)
    with pytest.raises(InputError, match="--std must have 1 or 3 values"):
        parse_triple("0.1,0.2", "std")
    with pytest.raises(InputError, match="--mean must be three numbers"):
        parse_triple("a,b,c", "mean")


def test_parse_device() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            parse_device("cuda")


def test_parse_methods() -> None:
    assert parse_methods(" gradcam, saliency ,") == ["gradcam", "saliency"]
    with pytest.raises(InputError, match="at least one"):
        parse_methods(" , ")


def test_load_net_preprocessing(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(NET)
    spec = f"{tmp_path / 'net.py'}:build"
    default = load_net(spec).preprocess
    assert (default.resize, default.crop) == (256, 224)
    pre = load_net(spec, size=32, mean="0.5").preprocess
    assert (pre.resize, pre.crop) == (round(32 / 0.875), 32)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.229, 0.224, 0.225)
    pre = load_net(spec, None, None, 32, 40, None, "0.25", "cpu").preprocess
    assert (pre.resize, pre.crop, pre.std) == (40, 32, (0.25, 0.25, 0.25))


# Options whose meaning differs by command, and whose help text says so.
OWN_HELP = {
    ("model", "layers"),  # an argument there
    ("size", "classviz"),
    ("size", "featviz"),
    ("methods", "analyze"),
    ("out_dir", "analyze"),
    ("limit", "features"),
}


def test_each_shared_option_has_one_help_text() -> None:
    helps: dict[str, set[str]] = {}
    for cmd_name, cmd in typer.main.get_group(app).commands.items():
        for param in cmd.params:
            if (param.name, cmd_name) not in OWN_HELP:
                helps.setdefault(str(param.name), set()).add(getattr(param, "help", None))
    model = ("model", "weights", "classes", "size", "resize", "mean", "std", "device")
    for name in (*model, "batch_size", "workers", "methods", "out_dir", "limit"):
        assert len(helps[name]) == 1, (name, helps[name])


def _invoke(command: Callable[..., None], args: list[str]) -> None:
    """Run ``command`` as the one command of a typer app, with ``args``."""
    single = typer.Typer(add_completion=False)
    single.command()(command)
    result = CliRunner().invoke(single, args)
    assert result.exit_code == 0, result.output


def _option_names(command: Callable[..., None]) -> list[str]:
    single = typer.Typer(add_completion=False)
    single.command()(command)
    return [str(p.name) for p in typer.main.get_command(single).params]


def test_option_group_gathers_its_options_into_one_argument() -> None:
    seen: list[tuple[str, ModelOptions, int]] = []

    @option_group(ModelOptions, only=("model", "size", "device"))
    def command(image: Annotated[str, typer.Argument()], *, opts: ModelOptions, k: int = 1) -> None:
        seen.append((image, opts, k))

    assert _option_names(command) == ["image", "model", "size", "device", "k"]
    _invoke(command, ["a.png", "--size", "32", "-m", "lite1", "--k", "2"])
    _invoke(command, ["b.png"])
    assert seen == [  # the fields the command does not offer keep their defaults
        ("a.png", ModelOptions(model="lite1", size=32), 2),
        ("b.png", ModelOptions(), 1),
    ]


def test_option_group_takes_another_type_for_a_field() -> None:
    seen: list[ModelOptions] = []
    model_arg = Annotated[str, typer.Argument(help="the model")]

    @option_group(ModelOptions, only=("model", "plain"), types={"model": model_arg})
    def command(opts: ModelOptions) -> None:
        seen.append(opts)

    _invoke(command, ["lite2", "--plain"])
    assert seen == [ModelOptions(model="lite2", plain=True)]


def test_option_group_refuses_what_does_not_fit() -> None:
    def no_group(k: int = 1) -> None: ...

    def clash(opts: ModelOptions, size: int = 1) -> None: ...

    with pytest.raises(ValueError, match="no field colour"):
        option_group(ModelOptions, only=("model", "colour"))
    with pytest.raises(ValueError, match="no parameter of type ModelOptions"):
        option_group(ModelOptions)(no_group)
    with pytest.raises(ValueError, match=r"parameters named \['size'\]"):
        option_group(ModelOptions)(clash)


def test_every_command_loading_a_model_takes_the_model_options_group() -> None:
    """The model options of every command come from :class:`ModelOptions` (one declaration):
    each command's options of that name are the group's."""
    fields = {f.name for f in dataclasses.fields(ModelOptions)}
    for name, cmd in typer.main.get_group(app).commands.items():
        taken = {str(p.name) for p in cmd.params} & fields
        assert name == "methods" or "device" in taken, name
        callback = cmd.callback
        assert callback is not None
        wrapped = inspect.unwrap(callback)
        assert not taken & set(inspect.signature(wrapped).parameters), name


def test_multiclass_method_follows_the_methods_ranks() -> None:
    assert multiclass_method(["saliency", "cam", "gradcam"]) == "gradcam"
    assert multiclass_method(["cam", "gradcam++"]) == "cam"
    assert multiclass_method(["gradcam++", "cam"]) == "gradcam++"
    assert multiclass_method(["xgradcam", "gradcam"]) == "gradcam"
    assert multiclass_method(["saliency", "xgradcam", "occlusion"]) is None


def test_progress_callback_draws_one_task() -> None:
    bar = progress_bar(console=Console(file=io.StringIO()))
    report = progress_callback(bar, "scanning")
    assert not bar.tasks  # added at the first call, when the total is known
    report(0, 10)
    report(4, 12)
    (task,) = bar.tasks
    assert (task.description, task.completed, task.total) == ("scanning", 4, 12)
