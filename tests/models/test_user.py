"""Tests of convlens.models.user: factories in files and packages, TorchScript, weights."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from convlens.errors import ModelLoadError
from convlens.models.user import load_user_network, torchscript_deprecation_silenced

NET_PY = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build():
    return TinyNet()


def build_wide():
    return TinyNet(classes=7)


def build_train_mode():
    return TinyNet().train()


def build_broken():
    raise RuntimeError("no GPU here\\nsecond line")


def build_tensor():
    import torch
    return torch.zeros(3)


def needs_args(classes):
    return TinyNet(classes)
"""


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(NET_PY)
    return path


def _trained(net_file: Path) -> nn.Module:
    """A network from the file with weights different from a fresh build."""
    net, _ = load_user_network(f"{net_file}:build")
    torch.manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_file_factory_with_weights(net_file: Path, tmp_path: Path) -> None:
    trained = _trained(net_file)
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    net, name = load_user_network(f"{net_file}:build", weights=weights)
    assert name == "net:build"
    assert not net.training
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), trained(_x()))


def test_safetensors_weights(net_file: Path, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    trained = _trained(net_file)
    weights = tmp_path / "w.safetensors"
    safetensors_torch.save_file(trained.state_dict(), str(weights))
    net, _ = load_user_network(f"{net_file}:build", weights=weights)
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), trained(_x()), rtol=0, atol=0)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=r"cannot read weights file .* as safetensors"):
        load_user_network(f"{net_file}:build", weights=weights)


def test_safetensors_without_the_package(
    net_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ModelLoadError, match="pip install safetensors"):
        load_user_network(f"{net_file}:build", weights=weights)


def test_factory_without_weights_is_in_eval_mode(net_file: Path) -> None:
    net, _ = load_user_network(f"{net_file}:build_train_mode")
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_wrappers_and_dataparallel_prefix(
    net_file: Path, tmp_path: Path, wrapper: str
) -> None:
    trained = _trained(net_file)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    weights = tmp_path / "ckpt.pth"
    torch.save({wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}, weights)
    net, _ = load_user_network(f"{net_file}:build", weights=str(weights))
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), trained(_x()))


def test_mismatched_weights(net_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "wide.pt"
    wide, _ = load_user_network(f"{net_file}:build_wide")
    state = wide.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["features.0.bias"]
    torch.save(state, weights)
    with pytest.raises(ModelLoadError) as info:
        load_user_network(f"{net_file}:build", weights=weights)
    message = str(info.value)
    assert "\n" not in message
    assert "do not fit net:build" in message
    assert "1 missing key (features.0.bias)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "2 shape mismatches (fc.weight (file 7x4, model 5x4), fc.bias" in message


def test_weights_not_a_state_dict(net_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], weights)
    with pytest.raises(ModelLoadError, match="holds a list, not a state dict"):
        load_user_network(f"{net_file}:build", weights=weights)
    with pytest.raises(ModelLoadError, match=r"weights file .* not found"):
        load_user_network(f"{net_file}:build", weights=tmp_path / "missing.pt")


def test_pickled_module_as_weights(net_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), weights)
    with pytest.raises(ModelLoadError, match="holds Python objects"):
        load_user_network(f"{net_file}:build", weights=weights)


def _save_torchscript(net: nn.Module, path: Path, how: str = "script") -> None:
    """Write a TorchScript file (torch >= 2.10 warns that TorchScript is deprecated; only the
    making of the file is silenced here, loading it is convlens' job)."""
    with torchscript_deprecation_silenced():
        scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, _x())
        torch.jit.save(scripted, str(path))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file(net_file: Path, tmp_path: Path, how: str) -> None:
    """Loading warns nothing (warnings are errors here) on any torch convlens supports."""
    trained = _trained(net_file)
    path = tmp_path / f"scripted_{how}.pt"
    _save_torchscript(trained, path, how)
    net, name = load_user_network(str(path))
    assert name == f"scripted_{how}"
    assert isinstance(net, nn.Module)
    assert not net.training
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), trained(_x()))


def test_torchscript_given_as_weights(net_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    _save_torchscript(_trained(net_file), path)
    with pytest.raises(ModelLoadError, match="is a TorchScript model, not a state dict"):
        load_user_network(f"{net_file}:build", weights=path)


def test_state_dict_given_as_model(net_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_trained(net_file).state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_user_network(str(path))
    message = str(info.value)
    assert "is a state dict, not a TorchScript model" in message
    assert "--model net.py:build --weights" in message


def test_pickled_module_given_as_model(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ModelLoadError, match="pickled Python object"):
        load_user_network(str(path))


def test_garbage_model_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match=r"cannot load .* as a TorchScript model"):
        load_user_network(str(path))
    with pytest.raises(ModelLoadError, match="not found"):
        load_user_network(str(tmp_path / "absent.pt"))


def test_missing_factory_lists_close_matches(net_file: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_user_network(f"{net_file}:buidl")
    message = str(info.value)
    assert "has no function 'buidl'" in message
    assert "Did you mean: 'build'" in message


def test_factory_may_be_a_class(net_file: Path) -> None:
    net, name = load_user_network(f"{net_file}:TinyNet")
    assert type(net).__name__ == "TinyNet"
    assert name == "net:TinyNet"


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        ("build_broken", r"calling net:build_broken\(\) failed: RuntimeError: no GPU here$"),
        ("build_tensor", r"net:build_tensor\(\) returned Tensor, not a torch.nn.Module"),
        ("needs_args", r"calling net:needs_args\(\) failed: TypeError"),
    ],
)
def test_factory_failures(net_file: Path, factory: str, pattern: str) -> None:
    with pytest.raises(ModelLoadError, match=pattern):
        load_user_network(f"{net_file}:{factory}")


def test_missing_file_and_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model file .*nothere\.py' not found"):
        load_user_network(f"{tmp_path / 'nothere.py'}:build")
    bad = tmp_path / "bad.py"
    bad.write_text("def build(:\n    pass\n")
    with pytest.raises(ModelLoadError, match=r"syntax error in '.*bad\.py' line 1"):
        load_user_network(f"{bad}:build")
    assert not [m for m in sys.modules if m.startswith("_convlens_user_bad_")]


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fails.py"
    path.write_text("raise ValueError('first\\nsecond')\n")
    with pytest.raises(ModelLoadError, match=r"importing '.*fails\.py' failed: ValueError: first$"):
        load_user_network(f"{path}:build")
    script = tmp_path / "script.py"
    script.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(ModelLoadError, match=r"called sys\.exit\(\)"):
        load_user_network(f"{script}:build")


def test_file_imports_its_sibling_module(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "convlens_test_blocks.py").write_text(
        "from torch import nn\n\ndef head():\n    return nn.Linear(3, 2)\n"
    )
    (folder / "model.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            import convlens_test_blocks

            def build():
                return nn.Sequential(nn.Flatten(), convlens_test_blocks.head())
            """
        )
    )
    before = list(sys.path)
    try:
        net, name = load_user_network(f"{folder / 'model.py'}:build")
    finally:
        sys.modules.pop("convlens_test_blocks", None)
    assert name == "model:build"
    assert isinstance(net[1], nn.Linear)
    assert sys.path == before


def test_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "convlens_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NET_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        net, name = load_user_network("convlens_test_pkg.nets:build")
        assert name == "convlens_test_pkg.nets:build"
        assert type(net).__name__ == "TinyNet"
        with pytest.raises(ModelLoadError, match="Did you mean: 'build'"):
            load_user_network("convlens_test_pkg.nets:bild")
    finally:
        for mod in ("convlens_test_pkg", "convlens_test_pkg.nets"):
            sys.modules.pop(mod, None)
    with pytest.raises(ModelLoadError, match=r"cannot import module 'no_such_pkg_xyz\.mod'"):
        load_user_network("no_such_pkg_xyz.mod:build")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "empty model specification"),
        ("net.py", "no factory; write it as 'net.py:build'"),
        ("lite9", r"unknown model 'lite9'\. Did you mean: .*'lite0'"),
        ("pkg.mod:", "expected 'path/to/net.py:factory'"),
    ],
)
def test_bad_specs(spec: str, pattern: str) -> None:
    with pytest.raises(ModelLoadError, match=pattern):
        load_user_network(spec)
