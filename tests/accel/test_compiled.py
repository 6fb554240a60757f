"""Compiled forward passes of the metrics (convlens.accel.compiled): equal to eager, padded
batches, one compilation per network, rebuilt on changed weights, eager fallback; the
deterministic ``compile="auto"`` rule (convlens.accel.settings)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from convlens.accel import Acceleration, clear_caches, settings
from convlens.accel import compiled as comp
from convlens.accel.fingerprint import fingerprint
from convlens.accel.folded import inference_copy
from convlens.metrics import deletion_insertion_many

needs_compiler = pytest.mark.skipif(
    not settings.compiler_available(), reason="torch.compile needs a C++ compiler on PATH"
)


class SmallNet(nn.Module):
    """conv-BN-ReLU6, a TF-style asymmetric pad, a depthwise conv, GAP and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        x = torch.clamp(self.bn(self.conv(x)), 0, 6)
        x = torch.relu(self.dw(x))
        return self.fc(x.mean(dim=(2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _data(b: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 24, 24, generator=g)
    maps = {"a": torch.rand(b, 24, 24, generator=g), "b": torch.rand(b, 24, 24, generator=g)}
    return x, maps, torch.randint(0, 5, (b,), generator=g)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_caches()


class _CountingCompile:
    """Stands in for torch.compile: counts calls and returns ``make(net)``."""

    def __init__(self, make=lambda net: net) -> None:
        self.calls = 0
        self.make = make

    def __call__(self, net: nn.Module, **_kw: object):
        self.calls += 1
        return self.make(net)


def _curves_equal(a: dict, b: dict, atol: float = 1e-6) -> None:
    for k in a:
        assert torch.allclose(a[k].deletion, b[k].deletion, atol=atol), k
        assert torch.allclose(a[k].insertion, b[k].insertion, atol=atol), k


@needs_compiler
def test_compiled_curves_equal_eager() -> None:
    net = _net()
    x, maps, t = _data()
    # 3 * 3 end points + 2 maps * 3 images * 2 curves * 4 inner steps = 57 passes: batches of
    # 8 with a padded last batch
    eager = deletion_insertion_many(net, x, maps, t, steps=5, batch_size=8, compile=False)
    fast = deletion_insertion_many(net, x, maps, t, steps=5, batch_size=8, compile=True)
    _curves_equal(eager, fast)
    ((entry,),) = (d.values() for d in comp._CACHE.values())
    assert entry[1].compiled is True


def test_fixed_batch_pads_and_drops() -> None:
    net = _net()
    seen: list[int] = []

    def make(m: nn.Module):
        def fn(b: torch.Tensor) -> torch.Tensor:
            seen.append(b.shape[0])
            return m(b)

        return fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", _CountingCompile(make))
        fwd = comp.FixedBatchForward(net, 8, torch.device("cpu"))
    x = torch.randn(5, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fwd(x)
        assert fwd.compiled is True
        assert torch.allclose(out, net(x), atol=1e-6)
        assert out.shape == (5, 5)
        assert fwd(x[:2]).shape == (2, 5)
    assert seen == [8, 8]  # always the compiled batch size


def _no_compiler(_m: nn.Module):
    def fn(_b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    return fn


def _wrong(m: nn.Module):
    return lambda b: m(b) + 1.0  # a wrong "compiled" network


@pytest.mark.parametrize(
    ("make", "message"),
    [(_no_compiler, "torch.compile failed"), (_wrong, "differs from eager")],
)
def test_failed_or_disagreeing_compilation_runs_eagerly(
    caplog: pytest.LogCaptureFixture, make, message: str
) -> None:
    net = _net()
    x, maps, t = _data()
    eager = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=False)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(torch, "compile", _CountingCompile(make))
        got = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    _curves_equal(eager, got, atol=0)
    assert message in caplog.text
    (entry,) = comp._CACHE[net].values()
    assert entry[1].compiled is False


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> _CountingCompile:
    """``torch.compile`` replaced for the test by a counting stand-in."""
    counting = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counting)
    return counting


def test_one_compilation_per_network_rebuilt_on_new_weights(counter: _CountingCompile) -> None:
    net = _net()
    x, maps, t = _data()
    deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    first = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    assert counter.calls == 1
    deletion_insertion_many(net, x, maps, t, steps=4, batch_size=4, compile=True)
    assert counter.calls == 2  # another batch size: another compiled copy
    with torch.no_grad():
        net.fc.weight.data.mul_(-1.0)  # .data: no version bump, caught by the values
    flipped = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=4, compile=True)
    assert counter.calls == 3
    eager = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=4, compile=False)
    _curves_equal(eager, flipped)
    assert not torch.allclose(first["a"].deletion, flipped["a"].deletion)


def test_auto_compiles_by_the_size_of_the_job_alone(
    monkeypatch: pytest.MonkeyPatch, counter: _CountingCompile
) -> None:
    """``compile="auto"`` decides from the call's job (2 curves x 2 maps x 3 images x 3 inner
    steps = 36 scored images), not from what ran before in the process."""
    net = _net()
    x, maps, t = _data()
    monkeypatch.setattr(settings, "compiler_available", lambda: True)
    monkeypatch.setattr(settings, "AUTO_COMPILE_PASSES", 37)
    for _ in range(3):  # however often it runs: too short
        deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8)
    assert counter.calls == 0
    monkeypatch.setattr(settings, "AUTO_COMPILE_PASSES", 36)
    got = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8)
    assert counter.calls == 1
    eager = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=False)
    _curves_equal(eager, got)


def test_the_compile_rule_depends_on_its_arguments_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    n = settings.AUTO_COMPILE_PASSES
    monkeypatch.setattr(settings, "compiler_available", lambda: True)
    auto = Acceleration()
    assert not auto.compiles(cpu, n - 1)
    assert auto.compiles(cpu, n)
    assert not auto.compiles(cpu, n - 1)  # no memory of the previous answer
    assert not auto.compiles(gpu, 10 * n)  # GPUs: explicit only
    assert Acceleration(compile=True).compiles(gpu, 1)
    assert not Acceleration(compile=False).compiles(cpu, 10 * n)
    assert not Acceleration.plain().compiles(cpu, 10 * n)
    monkeypatch.setattr(settings, "compiler_available", lambda: False)
    assert not auto.compiles(cpu, 10 * n)


def test_a_plain_wrapper_never_compiles(counter: _CountingCompile) -> None:
    from convlens.models import wrap_model

    model = wrap_model(_net())
    model.accel = Acceleration.plain()
    x, maps, t = _data()
    got = deletion_insertion_many(model, x, maps, t, steps=4, batch_size=8, compile=True)
    assert counter.calls == 0
    eager = deletion_insertion_many(_net(), x, maps, t, steps=4, batch_size=8, compile=False)
    _curves_equal(eager, got)


def test_bad_compile_argument() -> None:
    net = _net()
    x, maps, t = _data()
    with pytest.raises(ValueError, match="compile must be"):
        deletion_insertion_many(net, x, maps, t, compile="yes")  # type: ignore[arg-type]


@needs_compiler
def test_inference_copy_compiles_with_freezing_equal() -> None:
    net = _net()
    x = torch.randn(4, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    fwd = comp.FixedBatchForward(inference_copy(net, x), 4, torch.device("cpu"))
    with torch.no_grad():
        got = fwd(x)
        ref = net(x)
    assert fwd.compiled is True
    assert torch.allclose(got, ref, atol=1e-5)


def test_changed_structure_or_settings_rebuild_the_compiled_copy(counter: _CountingCompile) -> None:
    net = _net()
    x, maps, t = _data()
    deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    net.bn.eps = 10.0  # a setting, no tensor changes
    a = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    assert counter.calls == 2
    eager_a = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=False)
    _curves_equal(eager_a, a)
    net.fc = nn.Linear(8, 5)  # a replaced module
    b = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    assert counter.calls == 3
    eager = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=False)
    _curves_equal(eager, b)


def test_a_model_changing_between_every_call_stops_being_compiled(
    caplog: pytest.LogCaptureFixture, counter: _CountingCompile
) -> None:
    net = _net()
    x, maps, t = _data()
    with caplog.at_level(logging.INFO):
        for i in range(comp._MAX_BUILDS + 2):
            with torch.no_grad():
                net.fc.bias.add_(0.01 * (i + 1))
            got = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
        eager = deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=False)
    assert counter.calls == comp._MAX_BUILDS + 2  # built, but the last ones never run compiled
    (entry,) = comp._CACHE[net].values()
    assert entry[1].compiled is False
    assert "keeps changing" in caplog.text
    _curves_equal(eager, got)


def test_inference_tensors_and_nan_weights_in_the_fingerprint(counter: _CountingCompile) -> None:
    with torch.inference_mode():
        net = _net()
    x, maps, t = _data()
    deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    deletion_insertion_many(net, x, maps, t, steps=4, batch_size=8, compile=True)
    assert counter.calls == 1
    nan_net = _net()
    with torch.no_grad():
        nan_net.fc.bias[0] = float("nan")
    assert fingerprint(nan_net) == fingerprint(nan_net)


def test_a_new_input_shape_is_checked_again(caplog: pytest.LogCaptureFixture) -> None:
    net = _net()
    shapes: list[tuple[int, ...]] = []

    def make(m: nn.Module):
        def fn(b: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(b.shape))
            out = m(b)
            return out + 1.0 if b.shape[-1] == 20 else out  # wrong at the second size only

        return fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", _CountingCompile(make))
        fwd = comp.FixedBatchForward(net, 4, torch.device("cpu"))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        a = torch.randn(4, 3, 24, 24)
        torch.testing.assert_close(fwd(a), net(a))
        assert fwd.compiled is True
        b = torch.randn(4, 3, 20, 20)
        torch.testing.assert_close(fwd(b), net(b))  # the wrong compiled output is not used
    assert fwd.compiled is False and "differs from eager" in caplog.text
