"""The fused suffix of incremental occlusion (convlens.accel.incremental.suffix): BatchNorm
folded, channels_last, optionally compiled; equal to naive occlusion, the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens import Occlusion
from convlens.accel import Acceleration, clear_caches, settings
from convlens.accel import compiled as comp
from convlens.accel.incremental import IncrementalEngine
from convlens.methods.perturbation import window_starts
from tests.helpers.models import TinyResNet, TinyVGG, images, seeded


class SameConv(nn.Conv2d):
    """EfficientNet-style convolution: a fixed TF "same" padding module, then ``F.conv2d`` on
    its own parameters (traced through by torch.fx, so the weight is a graph attribute)."""

    def __init__(self, *args: object, pad: tuple[int, int, int, int] = (0, 0, 0, 0), **kw: object):
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class LiteLike(nn.Module):
    """Stem, an inverted-residual block with a depthwise convolution, head, and the
    ``view(x.size(0), -1)`` of EfficientNet's classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(3, 6, 3, stride=2, bias=False, pad=(0, 1, 0, 1))
        self.bn0 = nn.BatchNorm2d(6)
        self.expand = SameConv(6, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = SameConv(12, 12, 3, groups=12, bias=False, pad=(1, 1, 1, 1))
        self.bn2 = nn.BatchNorm2d(12)
        self.project = SameConv(12, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = SameConv(6, 10, 1, stride=2, bias=False)
        self.bn4 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        x = F.relu6(self.bn4(self.head(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def _with_stats(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(
                    torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5
                )
                m.running_var.copy_(
                    torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5
                )
    return net.eval()


NETS = {"lite": LiteLike, "resnet": TinyResNet, "vgg": TinyVGG}


def _engine(net: nn.Module, x: torch.Tensor, patch: int = 9, stride: int = 4) -> IncrementalEngine:
    h = x.shape[-1]
    ys = window_starts(h, patch, stride)
    return IncrementalEngine(net, x, patch, ys, ys)


@pytest.mark.parametrize("name", list(NETS))
def test_suffix_built_folded_and_equal_to_naive(name: str) -> None:
    net = _with_stats(seeded(NETS[name](), seed=2))
    before = copy.deepcopy(net.state_dict())
    x = images(2, size=16, seed=4)
    engine = _engine(net, x)
    assert engine.suffix is not None
    if name != "vgg":  # the VGG has no BatchNorm
        assert engine.suffix.folded >= 1
        module = engine.suffix.module
        called = [
            module.get_submodule(str(n.target)) for n in module.graph.nodes if n.op == "call_module"
        ]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in called)
    # the VGG's softmax saturates (probabilities exactly 0 and 1: blank probability maps), so
    # it is compared on logits
    score = "logit" if name == "vgg" else "prob"
    exact = Occlusion(patch=9, stride=4, mode="exact", compile=False, score=score)(net, x)  # type: ignore[arg-type]
    naive = Occlusion(patch=9, stride=4, mode="naive", score=score)(net, x)  # type: ignore[arg-type]
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-6, rtol=1e-5)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) >= (name != "vgg")


@pytest.mark.parametrize("name", ["lite", "resnet"])
def test_fold_batchnorm_off_runs_every_batchnorm_as_a_batchnorm(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Acceleration.fold_batchnorm=False``: neither the incremental part nor the fused
    suffix folds a BatchNorm (the folding code refuses to run), the suffix calls the model's
    BatchNorm modules, and the maps equal the folded ones and naive occlusion's."""
    from convlens.accel.incremental import engine as engine_mod
    from convlens.accel.incremental import suffix as suffix_mod
    from convlens.accel.incremental.plan import StepKind

    net = _with_stats(seeded(NETS[name](), seed=2))
    x = images(2, size=16, seed=4)
    folded = Occlusion(patch=9, stride=4, mode="exact", compile=False)(net, x)
    naive = Occlusion(patch=9, stride=4, mode="naive")(net, x, accel=Acceleration.plain())

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a BatchNorm was folded with fold_batchnorm=False")

    monkeypatch.setattr(suffix_mod, "_fold_in_graph", refuse)
    monkeypatch.setattr(engine_mod, "fold_batch_norms", refuse)
    engine = IncrementalEngine(
        net, x, 9, window_starts(16, 9, 4), window_starts(16, 9, 4), fold_batchnorm=False
    )
    assert engine.suffix is not None and engine.suffix.folded == 0
    module = engine.suffix.module
    called = [
        module.get_submodule(str(n.target)) for n in module.graph.nodes if n.op == "call_module"
    ]
    assert any(isinstance(m, nn.BatchNorm2d) for m in called)
    assert not any(
        step.kind is StepKind.PASS
        and step.node.op == "call_module"
        and isinstance(net.get_submodule(str(step.node.target)), nn.BatchNorm2d)
        for step in engine.steps.values()
    )
    off = Acceleration().but(fold_batchnorm=False, compile=False)
    unfolded = Occlusion(patch=9, stride=4, mode="exact")(net, x, accel=off)
    assert unfolded.meta["occlusion_path"] == "exact"
    torch.testing.assert_close(unfolded.maps, folded.maps, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(unfolded.maps, naive.maps, atol=1e-9, rtol=1e-9)


def test_no_suffix_when_a_module_is_hooked() -> None:
    net = _with_stats(seeded(LiteLike(), seed=2))
    calls: list[int] = []
    handle = net.fc.register_forward_hook(lambda _m, _a, out: calls.append(out.shape[0]))
    try:
        x = images(1, size=16, seed=4)
        engine = _engine(net, x)
        assert engine.suffix is None
        exact = Occlusion(patch=9, stride=4, mode="exact")(net, x)
    finally:
        handle.remove()
    assert exact.meta["hooked_modules"] == ["fc"]
    assert sum(calls) > 1  # the hook saw the occluded copies


class _Counting:
    """Stands in for torch.compile: records the batch sizes the "compiled" code gets."""

    def __init__(self) -> None:
        self.calls = 0
        self.batches: list[int] = []

    def __call__(self, net: nn.Module, **_kw: object):
        self.calls += 1

        def fn(*args: torch.Tensor) -> torch.Tensor:
            self.batches.append(args[0].shape[0])
            return net(*args)

        return fn


@pytest.fixture
def fresh_cache() -> None:
    clear_caches()


def test_compiled_suffix_runs_full_batches_only(
    monkeypatch: pytest.MonkeyPatch, fresh_cache
) -> None:
    net = _with_stats(seeded(LiteLike(), seed=2))
    x = images(2, size=16, seed=4)  # 2 images x 3 x 3 windows = 18 pairs: batches 4, 4, 4, 4, 2
    counting = _Counting()
    monkeypatch.setattr(torch, "compile", counting)
    exact = Occlusion(patch=9, stride=4, mode="exact", batch_size=4, compile=True)(net, x)
    naive = Occlusion(patch=9, stride=4, mode="naive")(net, x)
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-6, rtol=1e-5)
    assert counting.calls == 1
    assert counting.batches == [4, 4, 4, 4]  # the last batch of 2 ran eagerly
    Occlusion(patch=9, stride=4, mode="exact", batch_size=4, compile=True)(net, x)
    assert counting.calls == 1  # the compiled suffix is kept for the same model


def test_auto_compiles_the_suffix_for_long_calls_only(
    monkeypatch: pytest.MonkeyPatch, fresh_cache
) -> None:
    """``compile="auto"`` (the default ``Acceleration``) compiles when the call has at least
    ``AUTO_COMPILE_PASSES`` (image, window) pairs: 18 here. The answer is the same however
    often and in whichever order the calls run."""
    net = _with_stats(seeded(LiteLike(), seed=2))
    x = images(2, size=16, seed=4)
    counting = _Counting()
    monkeypatch.setattr(torch, "compile", counting)
    monkeypatch.setattr(settings, "compiler_available", lambda: True)
    monkeypatch.setattr(settings, "AUTO_COMPILE_PASSES", 19)
    for _ in range(2):
        Occlusion(patch=9, stride=4, mode="exact", batch_size=4)(net, x)
    assert counting.calls == 0
    monkeypatch.setattr(settings, "AUTO_COMPILE_PASSES", 18)
    plain = Acceleration.plain()
    Occlusion(patch=9, stride=4, mode="exact", batch_size=4)(net, x, accel=plain)
    assert counting.calls == 0  # the plain path never compiles
    exact = Occlusion(patch=9, stride=4, mode="exact", batch_size=4)(net, x)
    assert counting.calls == 1  # before the first batch
    naive = Occlusion(patch=9, stride=4, mode="naive")(net, x)
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not settings.compiler_available(), reason="needs a C++ compiler")
def test_really_compiled_suffix_equals_naive(fresh_cache) -> None:
    net = _with_stats(seeded(LiteLike(), seed=2, dtype=torch.float32))
    x = images(2, size=16, seed=4).float()
    exact = Occlusion(patch=9, stride=4, mode="exact", batch_size=4, compile=True)(net, x)
    naive = Occlusion(patch=9, stride=4, mode="naive")(net, x)
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-5, rtol=1e-4)
    ((entry,),) = (d.values() for d in comp._CACHE.values())
    assert entry[1].compiled is True


def test_naive_path_runs_a_fused_copy_unless_hooked() -> None:
    from convlens.methods.perturbation import _naive_forward

    net = _with_stats(seeded(TinyResNet(), seed=2))
    x = images(2, size=16, seed=4)
    fast = _naive_forward(net, x, Acceleration())
    assert fast is not net
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-10, rtol=1e-8)
    plain = Occlusion(patch=9, stride=4, mode="naive")(net, x)
    seen: list[int] = []
    handle = net.layer1.register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[0]))
    try:
        assert _naive_forward(net, x, Acceleration()) is net  # the hook sees the copies
        hooked = Occlusion(patch=9, stride=4, mode="naive")(net, x)
    finally:
        handle.remove()
    assert sum(seen) > x.shape[0]
    torch.testing.assert_close(plain.maps, hooked.maps, atol=1e-10, rtol=1e-8)


def test_suffix_shares_the_models_tensors_and_leaves_them_as_they_are() -> None:
    net = _with_stats(seeded(TinyVGG(), seed=2))
    x = images(2, size=16, seed=4)
    layouts = {k: (v.stride(), v.data_ptr()) for k, v in net.state_dict().items()}
    engine = _engine(net, x)
    assert engine.suffix is not None
    fc = net.classifier[1].weight
    assert any(p is fc for p in engine.suffix.module.parameters())  # the head is not copied
    assert layouts == {k: (v.stride(), v.data_ptr()) for k, v in net.state_dict().items()}
