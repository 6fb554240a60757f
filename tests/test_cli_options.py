"""The options the commands share: parsing, model loading, one help text per shared option."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import typer

from convlens import InputError
from convlens.cli import app
from convlens.cli.options import load_net, parse_device, parse_methods, parse_triple

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
