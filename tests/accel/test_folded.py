"""The BatchNorm-folded copy that input-gradient methods run through, and its cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.accel import folded as folded_mod
from convlens.accel.folded import (
    cached_inference_copy,
    clear_inference_copies,
    has_forward_hooks,
)
from convlens.accel.lean_graph import input_gradient_mode
from convlens.hooks import backprop_rule
from convlens.methods import IntegratedGradients, Saliency
from convlens.models.user import torchscript_deprecation_silenced
from tests.helpers.models import images, seeded


def _net() -> nn.Module:
    return seeded(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU6(),
            nn.Conv2d(6, 6, 3, stride=2, groups=6),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        ),
        seed=3,
    )


def _batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_the_copy_is_folded_kept_and_rebuilt_when_the_network_changes() -> None:
    net = _net()
    x = images(2, size=9)
    fast = cached_inference_copy(net, x)
    assert fast is not None and fast is not net
    assert _batchnorms(net) == 2 and _batchnorms(fast) == 0  # folded into the convolutions
    assert not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))
    assert cached_inference_copy(net, x) is fast  # unchanged network: the same copy
    with torch.no_grad():
        net[1].running_mean.add_(0.5)  # a buffer changes
    again = cached_inference_copy(net, x)
    assert again is not None and again is not fast
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))
        net[0].weight.data[0, 0, 0, 0] += 1.0  # a .data write: no version bump
    third = cached_inference_copy(net, x)
    assert third is not again
    # another layout or dtype is another copy, kept beside the first (keyed on the network
    # and the slot only)
    other = cached_inference_copy(net, x, channels_last=False)
    assert other is not None and other is not third
    assert cached_inference_copy(net, x, channels_last=False) is other
    assert cached_inference_copy(net, x) is third
    clear_inference_copies()
    assert cached_inference_copy(net, x) is not third
    assert cached_inference_copy(net, x, channels_last=False) is not other


def test_no_copy_when_hooks_or_modes_must_see_the_network() -> None:
    net = _net()
    x = images(1, size=9)
    handle = net[2].register_forward_hook(lambda *_: None)
    try:
        assert has_forward_hooks(net)
        assert cached_inference_copy(net, x) is None
    finally:
        handle.remove()
    assert not has_forward_hooks(net)
    with backprop_rule("guided"):
        assert cached_inference_copy(net, x) is None
    with input_gradient_mode():
        assert cached_inference_copy(net, x) is None
    assert cached_inference_copy(net, x) is not None
    with torchscript_deprecation_silenced():
        scripted = torch.jit.script(_net())
    assert cached_inference_copy(scripted, x) is None  # cannot be deep-copied


@pytest.mark.parametrize("graph", ["plain", "lean"])
@pytest.mark.parametrize("channels_last", [None, True, False])
def test_integrated_gradients_through_the_copy_equals_the_network(
    graph: str, channels_last: bool | None
) -> None:
    net = _net()
    x = images(3, size=9, seed=1)
    ref = IntegratedGradients(steps=6, fuse=False, graph="lean", batch_size=6)(net, x, top_k=2)
    assert ref.meta["fused"] is False and ref.meta["graph"] == "lean"
    got = IntegratedGradients(steps=6, graph=graph, channels_last=channels_last, batch_size=6)(
        net, x, top_k=2
    )
    assert got.meta["fused"] is True and got.meta["graph"] == graph
    assert torch.equal(got.targets, ref.targets)
    assert got.attributions is not None and ref.attributions is not None
    torch.testing.assert_close(got.attributions, ref.attributions)
    torch.testing.assert_close(got.meta["delta"], ref.meta["delta"])


def test_integrated_gradients_runs_the_network_when_a_hook_watches() -> None:
    net = _net()
    x = images(2, size=9)
    seen: list[int] = []
    handle = net[2].register_forward_hook(lambda _m, _i, out: seen.append(out.shape[0]))
    try:
        exp = IntegratedGradients(steps=4, batch_size=8)(net, x)
    finally:
        handle.remove()
    assert exp.meta["fused"] is False
    assert 8 in seen  # the path points went through the hooked module


def test_saliency_through_the_copy_equals_autograd_on_the_network() -> None:
    net = _net()
    x = images(3, size=9, seed=2)
    exp = Saliency()(net, x, top_k=2)
    assert exp.attributions is not None
    xi = x.clone().requires_grad_(True)
    logits = net(xi)
    torch.testing.assert_close(exp.scores, logits.gather(1, exp.targets).detach().float())
    for j in range(2):
        (g,) = torch.autograd.grad(
            logits.gather(1, exp.targets[:, j : j + 1]).sum(), xi, retain_graph=True
        )
        torch.testing.assert_close(exp.attributions[:, j], g.float())


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_integrated_gradients_with_the_endpoints_in_the_first_pass(baseline: str) -> None:
    """Off the CPU the images and the baseline ride along in the first path pass; the result
    is that of separate no-grad passes."""
    net = _net()
    x = images(3, size=9, seed=4)
    ref = IntegratedGradients(steps=5, baseline=baseline, blur_sigma=1.0, batch_size=6)
    got = IntegratedGradients(steps=5, baseline=baseline, blur_sigma=1.0, batch_size=6)
    got.merge_endpoints = True
    a, b = ref(net, x, top_k=2), got(net, x, top_k=2)
    assert torch.equal(a.targets, b.targets)
    assert a.attributions is not None and b.attributions is not None
    torch.testing.assert_close(b.attributions, a.attributions)
    torch.testing.assert_close(b.meta["delta"], a.meta["delta"])
    torch.testing.assert_close(b.scores, a.scores)


def test_saliency_switches_to_the_lean_graph_for_large_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import convlens.methods.gradient as gradient

    net = _net()
    x = images(2, size=9, seed=6)
    plain = Saliency()(net, x)
    monkeypatch.setattr(gradient, "PLAIN_GRAPH_BYTES", 0)  # every batch is "large"
    entered: list[int] = []
    real = gradient.InputGradientMode.__enter__

    def spy(self: object) -> object:
        entered.append(1)
        return real(self)  # type: ignore[arg-type]

    monkeypatch.setattr(gradient.InputGradientMode, "__enter__", spy)
    lean = Saliency()(net, x)
    assert entered
    assert lean.attributions is not None and plain.attributions is not None
    torch.testing.assert_close(lean.attributions, plain.attributions)


def test_no_copy_for_backward_hooks_or_training_mode() -> None:
    net = _net()
    x = images(1, size=9)
    seen: list[object] = []
    handle = net[0].register_full_backward_hook(lambda m, gi, go: seen.append(m))
    try:
        assert cached_inference_copy(net, x) is None
        Saliency()(net, x)
        assert seen and all(m is net[0] for m in seen)  # the network's own module
    finally:
        handle.remove()
    net.train()
    assert cached_inference_copy(net, x) is None


def test_a_network_changed_between_calls_gets_a_new_copy_every_call() -> None:
    """No count of earlier calls decides: however many times the weights changed before, the
    call gets a copy of the network as it is now."""
    net = _net()
    x = images(1, size=9)
    copies = []
    for _ in range(6):
        with torch.no_grad():
            net[0].weight.add_(0.01)  # changes before every call
        fast = cached_inference_copy(net, x)
        assert fast is not None and all(fast is not c for c in copies)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x))
        copies.append(fast)
    assert len(folded_mod._COPIES[net]) == 1  # one slot: the stale copies were let go


class _CountingNet(nn.Module):
    """Conv -> BatchNorm -> GAP -> linear whose forward counts its calls in a buffer and adds
    the count to the logits: its own forward pass changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3))) + self.calls


@pytest.mark.filterwarnings("ignore:the model changed:RuntimeWarning")
def test_a_network_whose_forward_changes_it_runs_as_it_is_from_the_first_call() -> None:
    """Its copy would count its own calls: the network runs as it is, from the first call on
    (not after some number of calls), and the copy's check pass leaves its buffer untouched, so
    a method gives the plain path's result whatever ran before."""
    from convlens.accel import Acceleration

    def saliency(history: int, accel: Acceleration) -> tuple[torch.Tensor, float]:
        clear_inference_copies()
        net = seeded(_CountingNet())
        x = images(1, size=9)
        for _ in range(history):
            assert cached_inference_copy(net, x) is None
            assert float(net.calls) == 0.0  # the check pass was undone
        got = Saliency()(net, x, accel=accel).maps
        return got, float(net.calls)

    plain, plain_calls = saliency(0, Acceleration.plain())
    for history in (0, 1, 4):
        got, calls = saliency(history, Acceleration())
        assert calls == plain_calls
        torch.testing.assert_close(got, plain, atol=0, rtol=0)


def test_the_fingerprint_sees_plain_attributes_and_a_replaced_forward() -> None:
    from convlens.accel.fingerprint import fingerprint as _fingerprint

    net = _net()
    before = _fingerprint(net)
    net[2].temperature = 2.0  # type: ignore[assignment]
    after = _fingerprint(net)
    assert after != before
    net[2].temperature = 3.0  # type: ignore[assignment]
    assert _fingerprint(net) != after
    again = _fingerprint(net)
    net[2].forward = lambda x: x  # type: ignore[method-assign]
    assert _fingerprint(net) != again


def test_a_failed_copy_is_not_kept() -> None:
    """Inputs the network cannot take fail the copy's check pass too; the next call, with
    good inputs, gets the copy."""
    from convlens.errors import InputError

    net = _net()
    with pytest.raises(InputError):
        Saliency()(net, images(1, size=9)[:, :2])  # two channels
    assert cached_inference_copy(net, images(1, size=9)) is not None


def test_what_the_model_cannot_take_and_what_a_method_gets_wrong_are_told_apart() -> None:
    from convlens.errors import InputError
    from convlens.methods import GradientXInput
    from convlens.methods.wrappers import TTA

    fixed = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16 * 16, 3))
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(InputError, match=r"TTA scale 0\.75 makes 12x12 inputs"):
        TTA(GradientXInput(), scales=(1.0, 0.75))(fixed, x)
    tta = TTA(GradientXInput(), scales=(1.0,))(fixed, x)
    assert tta.is_signed and tta.meta["display_percentile"] == 99.0  # the inner display
    with pytest.raises(InputError, match="baseline's shape"):
        IntegratedGradients(steps=2, baseline=torch.zeros(2, 3, 5, 5))(fixed, x)
    broken = nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)
    )
    with pytest.raises(InputError, match="the model fails on inputs of shape"):
        Saliency()(broken, x)  # fails on any input: still one clear line


def test_signed_display_of_a_sparse_map_keeps_its_scale() -> None:
    from dataclasses import replace

    exp = Saliency()(_net(), images(1, size=9))
    maps = torch.zeros(1, 1, 40, 40)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1] = 1.0, 0.01  # 99.9% zeros: the 99th percentile is 0
    signed = replace(exp, maps=maps, meta={"display": "signed", "display_percentile": 99.0})
    s = signed.signed()
    assert float(s[0, 0, 0, 0]) == 1.0 and float(s[0, 0, 0, 1]) == pytest.approx(0.01)


@pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning")
@pytest.mark.parametrize("layer", ["3", "4", "5", "0", "1"])
def test_layer_methods_use_the_copy_only_where_it_keeps_the_layer(layer: str) -> None:
    """Module 3 is a convolution whose BatchNorm (4) is folded into it: its own output exists
    only in the network. The BatchNorm (an identity in the copy) and the ReLU after it read the
    same in both."""
    from convlens import get_method
    from convlens.accel import Acceleration
    from convlens.accel.folded import copy_keeping_layer

    clear_inference_copies()
    net, x = _net(), images(2, size=12)
    fast = copy_keeping_layer(net.eval(), x, layer, channels_last=False)
    assert (fast is None) == (layer in ("0", "3"))
    for name in ("gradcam", "layercam", "gradcam++"):
        method = get_method(name)
        got = method(net, x, layer=layer, accel=Acceleration(channels_last=True))
        plain = method(net, x, layer=layer, accel=Acceleration.plain())
        torch.testing.assert_close(got.maps, plain.maps, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.scores, plain.scores, rtol=1e-9, atol=1e-12)


def test_a_container_holding_a_folded_convolution_runs_on_the_network() -> None:
    """``stem`` is a Sequential holding only a convolution whose BatchNorm (outside it) is
    folded: in the copy ``stem`` would output the normalised map. The same convolution reached
    under a second name is caught too."""
    from convlens import get_method
    from convlens.accel import Acceleration
    from convlens.accel.folded import copy_keeping_layer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
            self.bn = nn.BatchNorm2d(6)
            self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(6, 4)
            self.alias = self.stem[0]  # the same convolution under another name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.head(self.bn(self.stem(x))))

    clear_inference_copies()
    net, x = seeded(Net(), seed=4).eval(), images(2, size=12)
    for layer in ("stem", "stem.0", "alias"):
        assert copy_keeping_layer(net, x, layer, channels_last=False) is None, layer
    assert copy_keeping_layer(net, x, "bn", channels_last=False) is not None
    for layer in ("stem", "alias", "bn"):
        got = get_method("gradcam")(net, x, layer=layer, accel=Acceleration())
        plain = get_method("gradcam")(net, x, layer=layer, accel=Acceleration.plain())
        torch.testing.assert_close(got.maps, plain.maps, rtol=1e-9, atol=1e-12)
