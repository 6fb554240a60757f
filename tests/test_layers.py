"""Tests of convlens.layers: the layer table, its text form, and layer lookup by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.errors import LayerError
from convlens.layers import LayerInfo, format_layer_table, layer_table, resolve_layer
from convlens.models.user import torchscript_deprecation_silenced


class SharedReLU(nn.Module):
    """Calls one ReLU module twice, on tensors of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.unused = nn.Linear(100, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(self.act(x))))


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        return x, x.flatten(1), "label"


class Named(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"logits": x.mean(dim=(2, 3)), "note": None}


class Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class MultiOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.named = Named()
        self.nothing = Nothing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _, _ = self.pair(x)
        self.nothing(a)
        return self.named(a)["logits"]  # type: ignore[return-value]


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _rows(net: nn.Module) -> dict[str, LayerInfo]:
    return {row.name: row for row in layer_table(net, _x())}


def _hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_shared_module_records_each_call() -> None:
    rows = _rows(SharedReLU())
    assert list(rows) == ["act", "conv", "head", "head.0", "head.1", "head.2", "unused"]
    act = rows["act"]
    assert act.type == "ReLU"
    assert act.calls == 2
    assert act.shapes == ((1, 3, 8, 8), (1, 4, 4, 4))
    assert rows["conv"].shapes == ((1, 4, 4, 4),)
    assert rows["head"].shapes == ((1, 2),)
    assert rows["unused"].calls == 0
    assert rows["unused"].shapes == ()


def test_depth_and_subtree_params() -> None:
    rows = _rows(SharedReLU())
    assert rows["head"].depth == 1
    assert rows["head.2"].depth == 2
    assert rows["conv"].params == 4 * 3 * 3 * 3 + 4
    assert rows["head.2"].params == 4 * 2 + 2
    assert rows["head"].params == rows["head.2"].params
    assert rows["act"].params == 0


def test_shared_parameters_counted_once_per_subtree() -> None:
    lin = nn.Linear(3, 3)
    net = nn.Sequential(nn.Sequential(lin, nn.ReLU(), lin), nn.Flatten())
    rows = {r.name: r for r in layer_table(net, torch.zeros(2, 3))}
    assert rows["0"].params == 12
    assert rows["0.0"].calls == 2  # registered twice, listed once under the first name
    assert "0.2" not in rows


def test_non_tensor_and_structured_outputs() -> None:
    rows = _rows(MultiOutput())
    assert rows["pair"].shapes == ((1, 3, 8, 8), (1, 192))
    assert rows["named"].shapes == ((1, 3),)
    assert rows["nothing"].shapes == ()
    assert rows["nothing"].calls == 1


def test_layer_table_restores_flags_and_removes_hooks() -> None:
    net = SharedReLU()
    net.train()
    net.head.eval()
    before = [m.training for m in net.modules()]
    rows = layer_table(net, _x())
    assert rows
    assert [m.training for m in net.modules()] == before
    assert _hook_count(net) == 0


def test_forward_runs_in_eval_mode_without_grad() -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    net = nn.Sequential(Probe(), nn.Dropout(0.9)).train()
    x = torch.ones(1, 50)
    rows = layer_table(net, x)
    assert seen == [(False, False)]
    assert rows[1].shapes == ((1, 50),)
    assert net.training


def test_flags_restored_and_hooks_removed_when_forward_raises() -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Boom())
    net.train()
    net[0].eval()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        layer_table(net, _x())
    assert [m.training for m in net.modules()] == before
    assert _hook_count(net) == 0


def test_registration_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    net = SharedReLU()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot hook this one")

    monkeypatch.setattr(net.head[1], "register_forward_hook", refuse)
    net.train()
    with pytest.raises(RuntimeError, match="cannot hook"):
        layer_table(net, _x())
    assert _hook_count(net) == 0
    assert all(m.training for m in net.modules())


def test_user_hooks_are_left_alone() -> None:
    net = SharedReLU()
    calls: list[int] = []
    handle = net.conv.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        layer_table(net, _x())
        assert len(net.conv._forward_hooks) == 1
        assert calls == [1]
    finally:
        handle.remove()


def test_torchscript() -> None:
    with torchscript_deprecation_silenced():
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()))
    with pytest.raises(LayerError, match="TorchScript models cannot be hooked"):
        layer_table(scripted, _x())
    net = nn.Sequential(scripted, nn.Flatten())
    rows = {r.name: r for r in layer_table(net, _x())}
    assert rows["1"].shapes == ((1, 128),)
    assert rows["0"].calls == 0
    assert rows["0.0"].calls == 0


def test_format_layer_table() -> None:
    text = format_layer_table(layer_table(SharedReLU(), _x()))
    lines = text.splitlines()
    assert lines[0].split() == ["Layer", "Type", "Output", "shape", "Params"]
    assert set(lines[1]) <= {"-", " "}
    act = next(line for line in lines if line.startswith("act "))
    assert "ReLU" in act
    assert "1x3x8x8, 1x4x4x4 (×2 calls)" in act
    assert act.rstrip().endswith(" 0")
    assert any(line.startswith("  head.2 ") and "1x2" in line for line in lines)
    unused = next(line for line in lines if line.startswith("unused "))
    assert unused.split()[-2:] == ["-", "10,100"]
    assert not text.endswith("\n")
    assert format_layer_table([]) == "(the model has no submodules)"


def test_format_many_shapes() -> None:
    row = LayerInfo("_swish", "Swish", 1, tuple((1, c, 4, 4) for c in range(1, 7)), 0, 6)
    cell = format_layer_table([row]).splitlines()[2]
    assert "1x1x4x4, 1x2x4x4, 1x3x4x4, … +3 more (×6 calls)" in cell


def test_resolve_layer() -> None:
    net = SharedReLU()
    assert resolve_layer(net, "head.2") is net.head[2]
    assert resolve_layer(net, "conv") is net.conv
    with pytest.raises(LayerError) as info:
        resolve_layer(net, "haed.2")
    message = str(info.value)
    assert message.startswith("no layer named 'haed.2' in the model. Did you mean: 'head.2'")
    assert message.endswith("Run `convlens layers MODEL` to list the layers.")
    with pytest.raises(LayerError, match=r"no layer named 'zzz' in the model\. Run"):
        resolve_layer(net, "zzz")
    with pytest.raises(
        LayerError, match=r"'conv\.weight' is a parameter or buffer of layer 'conv'"
    ):
        resolve_layer(net, "conv.weight")
    with pytest.raises(LayerError, match="empty layer name"):
        resolve_layer(net, " ")


def test_resolve_layer_efficientnet_style_names() -> None:
    block = nn.Module()
    block._project_conv = nn.Conv2d(4, 4, 1)
    net = nn.Module()
    net._blocks = nn.ModuleList([nn.Identity() for _ in range(15)] + [block])
    assert resolve_layer(net, "_blocks.15._project_conv") is block._project_conv
    with pytest.raises(LayerError, match=r"Did you mean: '_blocks\.15\._project_conv'"):
        resolve_layer(net, "_blocks.15.project_conv")
