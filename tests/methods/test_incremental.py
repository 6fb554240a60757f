"""Incremental (Krypton) occlusion against brute force: the box arithmetic, every supported
layer type on its own, VGG- and ResNet-style nets, the fallbacks and the approximate mode."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens import Occlusion
from convlens.accel.incremental import Box, IncrementalEngine, window_box
from convlens.errors import UnsupportedModelError
from convlens.methods.perturbation import blur, window_starts
from tests.helpers.models import TinyResNet, TinyVGG, images, seeded
from tests.helpers.oracles import occlusion_brute_force as brute_force
from tests.helpers.paths import DEV_IMAGES

# --------------------------------------------------------------------------------------------
# Box arithmetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "k", "s", "pb", "pa", "d"),
    [
        (12, 3, 1, 1, 1, 1),
        (12, 3, 2, 1, 1, 1),
        (13, 3, 2, 0, 1, 1),  # "same" padding of TF style: asymmetric
        (12, 1, 2, 0, 0, 1),  # stride larger than the kernel: some inputs are never read
        (12, 3, 1, 2, 2, 2),  # dilated
        (11, 5, 3, 2, 1, 1),
        (9, 2, 2, 0, 0, 1),  # pooling
    ],
)
def test_window_box_equals_brute_force(size: int, k: int, s: int, pb: int, pa: int, d: int) -> None:
    """The box of outputs that read a changed input interval, against a convolution of the
    interval's indicator with a kernel of ones."""
    pairs = [(lo, hi) for lo in range(size) for hi in range(lo, min(size, lo + 5))]
    lo = torch.tensor([p[0] for p in pairs])
    hi = torch.tensor([p[1] for p in pairs])
    width = int((hi - lo).max()) + 1
    fixed_lo = torch.minimum(lo, torch.full_like(lo, size - width))
    box = Box(fixed_lo, width, size, lo, hi)
    out = window_box(box, k, s, pb, pa, d)
    ones = torch.ones(1, 1, k, dtype=torch.float64)
    for i, (a, b) in enumerate(pairs):
        ind = torch.zeros(1, 1, size, dtype=torch.float64)
        ind[..., a : b + 1] = 1
        hit = F.conv1d(F.pad(ind, (pb, pa)), ones, stride=s, dilation=d)[0, 0]
        assert out.extent == hit.numel()
        changed = torch.nonzero(hit).flatten()
        if changed.numel() and d == 1:
            assert int(out.exact_lo[i]) == int(changed.min())
            assert int(out.exact_hi[i]) == int(changed.max())
        elif changed.numel():  # dilation leaves holes: the box is their hull
            assert int(out.exact_lo[i]) <= int(changed.min())
            assert int(out.exact_hi[i]) >= int(changed.max())
        else:
            assert int(out.exact_hi[i]) < int(out.exact_lo[i])
        # the fixed-size box holds every output that reads the fixed-size input box
        ind = torch.zeros(1, 1, size, dtype=torch.float64)
        ind[..., int(fixed_lo[i]) : int(fixed_lo[i]) + width] = 1
        hit = F.conv1d(F.pad(ind, (pb, pa)), ones, stride=s, dilation=d)[0, 0]
        start = int(out.lo[i])
        assert start >= 0 and start + out.size <= out.extent
        inside = torch.zeros_like(hit, dtype=torch.bool)
        inside[start : start + out.size] = True
        assert not (hit.bool() & ~inside).any()


# --------------------------------------------------------------------------------------------
# One layer type at a time: stem conv -> layer -> global average pool -> linear
# --------------------------------------------------------------------------------------------


class Probe(nn.Module):
    """A stem convolution, the layer under test, then global average pooling and a linear
    head (where the incremental part must end)."""

    def __init__(self, layer: nn.Module, channels: int = 4, out: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.layer = layer
        self.fc = nn.Linear(out, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(self.stem(x))
        return self.fc(y.mean(dim=(2, 3)))


class SamePad(nn.Module):
    """TensorFlow "same" padding with F.pad, as EfficientNet's static-padding convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, None, 2)


class Residual(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.inplace:
            y += x
            return y
        return x + y


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 2, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Gate(nn.Module):
    """Element-wise products: two changed maps, a channel broadcast and a constant scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.g = nn.Conv2d(4, 1, 3, stride=1, padding=2, dilation=2)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * torch.sigmoid(self.g(x)) * self.scale + 0.5 * x


class Functional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        x = F.max_pool2d(x, 3, 2, 1)
        x = torch.tanh(x).relu()
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)


class TwiceAct(nn.Module):
    """One activation module called twice (EfficientNet's shared ``_swish``)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU6(inplace=True)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.act(x)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(gap(x))): the gate depends on the whole map, so the product is computed
    in full from here on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


LAYERS = {
    "conv_strided": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), "mean"),
    "conv_dilated": (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2), "mean"),
    "conv_depthwise": (lambda: nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4), "mean"),
    "conv_grouped_valid": (lambda: nn.Conv2d(4, 4, 3, groups=2), "mean"),
    "conv_same_string": (lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2), "mean"),
    "conv_1x1_stride3": (lambda: nn.Conv2d(4, 4, 1, stride=3), "mean"),
    "conv_rect": (lambda: nn.Conv2d(4, 4, (3, 1), stride=(1, 2), padding=(1, 0)), "mean"),
    "same_pad_fpad": (SamePad, "mean"),
    "zero_pad_module": (
        lambda: nn.Sequential(nn.ZeroPad2d((1, 2, 2, 0)), nn.Conv2d(4, 4, 3)),
        "mean",
    ),
    "batchnorm": (lambda: nn.BatchNorm2d(4), "mean"),
    "activations": (
        lambda: nn.Sequential(nn.ReLU(inplace=True), nn.SiLU(), nn.Hardswish()),
        "mean",
    ),
    "twice_act": (TwiceAct, "mean"),
    "maxpool": (lambda: nn.MaxPool2d(3, 2, 1), "mean"),
    "maxpool_dilated": (lambda: nn.MaxPool2d(2, 1, 0, dilation=2), "mean"),
    "avgpool": (lambda: nn.AvgPool2d(2), "mean"),
    "avgpool_padded": (lambda: nn.AvgPool2d(3, 2, 1), "mean"),
    "functional": (Functional, "mean"),
    "residual": (lambda: Residual(inplace=False), "mean"),
    "residual_inplace": (lambda: Residual(inplace=True), "mean"),
    "concat": (Concat, "mean"),
    "products": (Gate, "mean"),
    "squeeze_excite": (SqueezeExcite, "adaptive_avg_pool2d"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_type_equals_brute_force(name: str) -> None:
    make, first_full = LAYERS[name]
    torch.manual_seed(0)
    net = seeded(Probe(make()), seed=4)
    x = images(2, size=16)
    exp = Occlusion(patch=4, stride=3, fill="mean", mode="exact")(net, x)
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, fill)
    torch.testing.assert_close(exp.maps[:, 0], expected.float(), atol=1e-6, rtol=1e-5)
    assert exp.meta["occlusion_path"] == "exact"
    # the layer under test ran incrementally: full computation starts after it
    assert exp.meta["full_from"] == first_full
    assert exp.meta["macs_fraction"] < 1.0
    naive = Occlusion(patch=4, stride=3, fill="mean", mode="naive")(net, x)
    torch.testing.assert_close(exp.maps, naive.maps, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# VGG- and ResNet-style nets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
@pytest.mark.parametrize("fill", ["mean", "zero", "blur"])
def test_vgg_and_resnet_equal_brute_force(arch: str, fill: str) -> None:
    net = seeded(TinyVGG() if arch == "vgg" else TinyResNet(), seed=5)
    x = images(3, size=16, seed=1)
    # the VGG's logits are ~1000 apart: its probabilities are exactly 0 and 1 and every
    # probability map would be blank (a vacuous comparison), so it is compared on logits
    score = "logit" if arch == "vgg" else "prob"
    exp = Occlusion(patch=5, stride=3, fill=fill, blur_sigma=2.0, mode="exact", score=score)(  # type: ignore[arg-type]
        net, x, top_k=2
    )
    assert exp.meta["occlusion_path"] == "exact"
    assert exp.meta["macs_fraction"] < 1.0
    fills = {
        "mean": x.mean(dim=(2, 3), keepdim=True).expand_as(x),
        "zero": torch.zeros_like(x),
        "blur": blur(x, 2.0),
    }
    for k in range(2):
        expected = brute_force(net, x, exp.targets[:, k], 5, 3, fills[fill], score == "logit")
        atol = 1e-6 if score == "prob" else 5e-4  # scores are float32: logits ~2000 round by 1e-4
        torch.testing.assert_close(exp.maps[:, k], expected.float(), atol=atol, rtol=1e-5)


def test_logit_score_and_float32_match_naive() -> None:
    net = seeded(TinyResNet(), seed=6, dtype=torch.float32)
    x = images(2, size=20, seed=2).float()
    kw = {"patch": 6, "stride": 4, "fill": 0.3, "score": "logit"}
    exact = Occlusion(**kw, mode="exact")(net, x, target=torch.tensor([1, 4]))  # type: ignore[arg-type]
    naive = Occlusion(**kw, mode="naive")(net, x, target=torch.tensor([1, 4]))  # type: ignore[arg-type]
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-4, rtol=1e-4)


def test_batch_size_and_memory_cap_do_not_change_the_map() -> None:
    net = seeded(TinyResNet(), seed=7)
    x = images(2, size=16, seed=3)
    a = Occlusion(patch=4, stride=2, batch_size=1, mode="exact")(net, x)
    b = Occlusion(patch=4, stride=2, batch_size=10_000, mode="exact")(net, x)
    c = Occlusion(patch=4, stride=2, memory_mb=0.01, mode="exact")(net, x)
    torch.testing.assert_close(a.maps, b.maps)
    torch.testing.assert_close(a.maps, c.maps)
    assert c.meta["perturbations_per_batch"] < b.meta["perturbations_per_batch"]


def test_flop_accounting_of_a_single_convolution() -> None:
    """One 3x3 convolution (stride 1, padding 1) on 12x12 and a 4x4 patch: the changed outputs
    are the patch grown by one pixel each side, clipped at the border."""
    net = seeded(Probe(nn.Identity()), seed=8)
    x = images(1, size=12)
    starts = window_starts(12, 4, 4)
    eng = IncrementalEngine(net, x, 4, starts, starts)
    per_px = 4 * 3 * 9
    sizes = torch.tensor([min(s + 4, 11) - max(s - 1, 0) + 1 for s in starts]).double()
    assert eng.macs["full"] == per_px * 144 + 4 * 5
    assert eng.macs["executed"] == per_px * 6 * 6 + 4 * 5
    assert eng.macs["bound"] == pytest.approx(per_px * float(sizes.mean()) ** 2 + 4 * 5)


# --------------------------------------------------------------------------------------------
# Fallbacks
# --------------------------------------------------------------------------------------------


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y.relu()
        return self.fc(y.mean(dim=(2, 3)))


class Custom(nn.Module):
    """An operation without a rule in the middle of the network (a flip): computed in full."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x).relu()
        y = self.conv2(torch.flip(y, dims=(-1,)) * 0.5)
        return self.fc(y.amax(dim=(2, 3)))


class Switchable(nn.Module):
    """``forward(x, features=False)``: traced with the default, as convlens calls ``net(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(
        self, x: torch.Tensor, features: bool = False, scale: float | None = None
    ) -> torch.Tensor:
        y = self.conv(x).relu()
        if features:
            return y
        return self.fc(y.mean(dim=(2, 3)))


def test_forward_with_default_arguments_runs_incrementally() -> None:
    net = seeded(Switchable(), seed=16)
    x = images(2)
    exp = Occlusion(patch=4, stride=3, fill="zero")(net, x)
    assert exp.meta["occlusion_path"] == "exact"
    assert exp.meta["full_from"] == "mean"
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x))
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


def test_untraceable_model_falls_back_to_naive(caplog: pytest.LogCaptureFixture) -> None:
    net = seeded(Branchy(), seed=9)
    x = images(2)
    with caplog.at_level(logging.INFO, logger="convlens.methods.perturbation"):
        exp = Occlusion(patch=4, stride=3, fill="zero")(net, x)
    assert exp.meta["occlusion_path"] == "naive"
    assert "trace" in exp.meta["fallback_reason"]
    assert any("falls back" in r.message for r in caplog.records)
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x))
    torch.testing.assert_close(exp.maps[:, 0], expected.float())
    with pytest.raises(UnsupportedModelError, match="mode='naive'"):
        Occlusion(patch=4, stride=3, mode="exact")(net, x)


def test_unknown_op_mid_network_switches_to_full_computation() -> None:
    net = seeded(Custom(), seed=10)
    x = images(2)
    exp = Occlusion(patch=4, stride=3, fill="zero")(net, x)
    assert exp.meta["occlusion_path"] == "exact"
    assert exp.meta["full_from"] == "flip"
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x))
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


def test_patch_covering_the_image_falls_back() -> None:
    net = seeded(TinyResNet(), seed=11)
    x = images(1, size=8)
    exp = Occlusion(patch=8, stride=4, fill="zero")(net, x)
    assert exp.meta["occlusion_path"] == "naive"
    assert "whole image" in exp.meta["fallback_reason"]


class InplaceReuse(nn.Module):
    """An in-place operation on a value that another operation reads too: the incremental
    pass (out of place on boxes) would give other values than the model."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.kind == "module":  # y is read again after ReLU(inplace=True) changed it
            z = self.relu(y) + y
        elif self.kind == "method":  # the result of relu_ is not assigned; y read again
            y.relu_()
            z = y
        elif self.kind == "function":  # as above, read by a convolution
            torch.relu_(y)
            z = self.conv2(y)
        else:  # read by a convolution before the change
            z = self.conv2(y)
            y.mul_(2)
            z = z + y
        return self.fc(z.amax(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["module", "method", "function", "before"])
def test_inplace_change_of_a_value_read_again_falls_back(kind: str) -> None:
    net = seeded(InplaceReuse(kind), seed=17)
    x = images(2)
    exp = Occlusion(patch=4, stride=3, fill="zero", score="logit")(net, x)
    assert exp.meta["occlusion_path"] == "naive"
    assert "in-place" in exp.meta["fallback_reason"]
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x), logit=True)
    torch.testing.assert_close(exp.maps[:, 0], expected.float())
    with pytest.raises(UnsupportedModelError, match="in-place"):
        Occlusion(patch=4, stride=3, mode="exact")(net, x)


class InplaceSoleUser(nn.Module):
    """In-place operations on values nothing else reads (as in VGG, ResNet): incremental."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.conv1(x))).mul_(0.5)
        y = F.relu(self.conv3(y), inplace=True)
        y += 0.5
        return self.fc(y.relu_().mean(dim=(2, 3)))


def test_inplace_change_of_a_sole_user_value_stays_incremental() -> None:
    net = seeded(InplaceSoleUser(), seed=18)
    x = images(2)
    exp = Occlusion(patch=4, stride=3, fill="zero")(net, x)
    assert exp.meta["occlusion_path"] == "exact"
    assert exp.meta["full_from"] == "mean"
    expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x))
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.act(self.conv1(x))).amax(dim=(2, 3)))


@pytest.mark.parametrize("where", ["conv1", "act", "pre_conv2"])
def test_hooked_module_is_computed_in_full(where: str) -> None:
    """A hook that changes a module's output: the module is called for real from there on."""
    net = seeded(TwoConvs(), seed=19)
    if where == "pre_conv2":
        handle = net.conv2.register_forward_pre_hook(lambda m, a: (a[0] * 2 - 1,))
    else:
        handle = getattr(net, where).register_forward_hook(lambda m, a, o: o * 2 + 1)
    try:
        x = images(2)
        exp = Occlusion(patch=4, stride=3, fill="zero", score="logit")(net, x)
        expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x), logit=True)
    finally:
        handle.remove()
    assert exp.meta["occlusion_path"] == "exact"
    name = "conv2" if where == "pre_conv2" else where
    assert exp.meta["full_from"] == name
    assert exp.meta["hooked_modules"] == [name]
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


@pytest.mark.parametrize("where", ["model", "global"])
def test_hooks_tracing_would_miss_fall_back(where: str) -> None:
    net = seeded(TwoConvs(), seed=20)
    hook = lambda m, a, o: o * 2 + 1 if isinstance(m, nn.Conv2d) else None  # noqa: E731
    if where == "model":
        handle = net.register_forward_hook(lambda m, a, o: o * 2 + 1)
    else:
        handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        x = images(2)
        exp = Occlusion(patch=4, stride=3, fill="zero", score="logit")(net, x)
        expected = brute_force(net, x, exp.targets[:, 0], 4, 3, torch.zeros_like(x), logit=True)
    finally:
        handle.remove()
    assert exp.meta["occlusion_path"] == "naive"
    assert "hooks" in exp.meta["fallback_reason"]
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


class ScalesInput(nn.Module):
    """Doubles its input, in place or not, then reads the input again (``reuse``) or not."""

    def __init__(self, inplace: bool, reuse: bool) -> None:
        super().__init__()
        self.inplace, self.reuse = inplace, reuse
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and self.reuse:
            x.mul_(2)
        elif self.inplace:
            x = x.mul_(2)
        else:
            x = x * 2
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["auto", "naive"])
@pytest.mark.parametrize("reuse", [True, False])
def test_model_changing_its_input_leaves_the_callers_tensor(mode: str, reuse: bool) -> None:
    net = seeded(ScalesInput(inplace=True, reuse=reuse), seed=21)
    twin = seeded(ScalesInput(inplace=False, reuse=reuse), seed=21)  # same weights
    x = images(2)
    before = x.clone()
    exp = Occlusion(patch=4, stride=3, fill="mean", score="logit", mode=mode)(net, x)  # type: ignore[arg-type]
    assert torch.equal(x, before)
    path = "exact" if mode == "auto" and not reuse else "naive"
    assert exp.meta["occlusion_path"] == path
    if mode == "auto" and reuse:
        assert "changes the model's input" in exp.meta["fallback_reason"]
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    expected = brute_force(twin, x, exp.targets[:, 0], 4, 3, fill, logit=True)
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


# --------------------------------------------------------------------------------------------
# Approximate mode
# --------------------------------------------------------------------------------------------


def test_approx_without_approximations_is_exact() -> None:
    net = seeded(TinyResNet(), seed=12)
    x = images(2, size=16)
    exact = Occlusion(patch=4, stride=2, mode="exact")(net, x)
    same = Occlusion(patch=4, stride=2, mode="approx", tau=1.0, coarse=1, drill=1.0)(net, x)
    torch.testing.assert_close(exact.maps, same.maps)
    assert same.meta["forward_passes"] == exact.meta["forward_passes"]


def test_approx_projective_field_cap_skips_more_work() -> None:
    net = seeded(TinyVGG(), seed=13)
    x = images(2, size=16)
    exact = Occlusion(patch=4, stride=2, mode="exact")(net, x)
    approx = Occlusion(patch=4, stride=2, mode="approx", tau=0.3, coarse=1, drill=1.0)(net, x)
    assert approx.meta["occlusion_path"] == "approx"
    assert approx.meta["macs_fraction"] < exact.meta["macs_fraction"]
    assert not torch.equal(approx.maps, exact.maps)
    r = torch.corrcoef(torch.stack([approx.maps.flatten(), exact.maps.flatten()]))[0, 1]
    assert r > 0.5


def test_approx_drill_down_evaluates_coarse_grid_and_top_windows() -> None:
    net = seeded(TinyResNet(), seed=14)
    x = images(2, size=16)
    exact = Occlusion(patch=4, stride=2, mode="exact", score="logit")(net, x)
    py = len(window_starts(16, 4, 2))  # 7 -> coarse rows 0, 2, 4, 6
    coarse_only = Occlusion(patch=4, stride=2, mode="approx", tau=1.0, coarse=2, drill=0.0)
    a = coarse_only(net, x)
    assert a.meta["forward_passes"] == 2 * 16 + 2
    some = Occlusion(patch=4, stride=2, mode="approx", tau=1.0, coarse=2, drill=0.5)(net, x)
    assert some.meta["forward_passes"] == 2 * (16 + round(0.5 * (py * py - 16))) + 2
    err_a = (a.maps - exact.maps).abs().max()
    err_some = (some.maps - exact.maps).abs().max()
    assert err_some <= err_a


# --------------------------------------------------------------------------------------------
# Default model, GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_exact_equals_naive() -> None:
    convlens = pytest.importorskip("convlens")
    try:
        model = convlens.load_model("lite0")
    except convlens.ModelLoadError:
        pytest.skip("lite0 weights not installed")
    files = sorted(p for p in DEV_IMAGES.glob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if files:
        x = model.load_images(files[:1])
    else:
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    kw = {"patch": 32, "stride": 32, "fill": "mean"}
    exact = Occlusion(**kw, mode="exact")(model, x)  # type: ignore[arg-type]
    naive = Occlusion(**kw, mode="naive")(model, x)  # type: ignore[arg-type]
    assert exact.meta["occlusion_path"] == "exact"
    assert (exact.maps - naive.maps).abs().max() <= 1e-4


@pytest.mark.gpu
def test_exact_equals_naive_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    net = seeded(TinyResNet(), seed=15, dtype=torch.float32).cuda()
    x = images(2, size=20).float().cuda()
    exact = Occlusion(patch=4, stride=2, mode="exact")(net, x, top_k=2)
    naive = Occlusion(patch=4, stride=2, mode="naive")(net, x, top_k=2)
    assert exact.maps.is_cuda
    torch.testing.assert_close(exact.maps, naive.maps, atol=1e-5, rtol=1e-4)
