"""Receptive fields measured by gradient support equal those found by brute force (perturbing one
input pixel at a time), match the textbook arithmetic, and leave the model as found."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.errors import InputError, LayerError
from convlens.features import ReceptiveField, receptive_field
from tests.helpers.oracles import receptive_field_brute_force

F64 = torch.float64


def seeded(net: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net.to(F64).eval()


def assert_matches_brute_force(
    net: nn.Module, layer: str, size: tuple[int, int], holes: bool = False
) -> ReceptiveField:
    """Every unit's box is the bounding box of the pixels that change it.

    With ``holes`` (dilated convolutions) a border unit may lose the pixels next to the border
    from its support, since those fall in holes of the dilated field: there the support must lie
    within the box, and equal it for units whose field is entirely inside the image.
    """
    rf = receptive_field(net, layer, size, dtype=F64)
    affects = receptive_field_brute_force(net, layer, size)
    assert rf.output_size == tuple(affects.shape[2:])
    assert not rf.clipped
    h, w = size
    for y in range(rf.output_size[0]):
        for x in range(rf.output_size[1]):
            support = affects[:, :, y, x]
            rows = support.any(dim=1).nonzero().flatten()
            cols = support.any(dim=0).nonzero().flatten()
            found = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
            box = rf.box(y, x)
            top, left, bottom, right = rf.box(y, x, clip=False)
            if holes and not (top >= 0 and left >= 0 and bottom <= h and right <= w):
                assert box[:2] <= found[:2] and found[2:] <= box[2:], (layer, y, x)
            else:
                assert box == found, (layer, y, x)
    return rf


# --- models ------------------------------------------------------------------------------------


def conv_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, (3, 5), padding=(1, 2))
    )


def strided() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
    )


def dilated() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, dilation=3)
    )


def max_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def avg_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 3)
    )


def tf_same() -> nn.Module:
    """EfficientNet's static "same" padding: pad right/bottom only, then a strided conv."""
    return nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU6(),
        nn.ZeroPad2d((1, 2, 1, 2)),
        nn.Conv2d(4, 4, 5, stride=2),
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.block = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.block(x + self.conv2(torch.relu(self.conv1(x))))


def depthwise() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 1),
        nn.ReLU6(inplace=True),
        nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6),
        nn.ReLU6(inplace=True),
        nn.Conv2d(6, 4, 1),
    )


def activations() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU6(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU6(),
    )


class Functional(nn.Module):
    """Activations and padding written as functions, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.conv3 = nn.Conv2d(4, 4, 3)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.conv2(F.pad(x, (0, 1, 0, 1))).clamp(min=0)
        x = torch.relu_(self.conv3(x))
        return self.out(F.relu6(x, inplace=True))


class Misc(nn.Module):
    """In-place change of the input, hardswish, functional max pooling with indices, hardsigmoid,
    adaptive max pooling and in-place leaky ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.Hardsigmoid()
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.conv1(x.sub_(0.5)))
        x, _ = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        x = self.act(self.conv2(x))
        x = F.adaptive_max_pool2d(x, (x.shape[2] - 1, x.shape[3] - 1))  # 2x2 windows, stride 1
        return self.out(F.leaky_relu(x, 0.1, inplace=True))


class SharedAct(nn.Module):
    """One ReLU module called twice, with different receptive fields."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x)))).mean(dim=(2, 3))


# --- brute force -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "layer", "size"),
    [
        (conv_stack, "1", (12, 10)),
        (conv_stack, "2", (12, 10)),
        (strided, "4", (20, 20)),
        (max_pool, "2", (17, 17)),
        (max_pool, "4", (17, 16)),
        (avg_pool, "3", (16, 16)),
        (tf_same, "1", (16, 16)),
        (tf_same, "4", (19, 20)),
        (Residual, "block", (16, 16)),
        (depthwise, "4", (16, 16)),
        (activations, "1", (12, 12)),
        (activations, "5", (16, 16)),
        (Functional, "out", (16, 16)),
        (Misc, "out", (14, 14)),
        (SharedAct, "act@0", (12, 12)),
        (SharedAct, "act@1", (12, 12)),
    ],
)
def test_matches_brute_force(factory: type[nn.Module], layer: str, size: tuple[int, int]) -> None:
    assert_matches_brute_force(seeded(factory()), layer, size)


def test_dilated_matches_brute_force() -> None:
    rf = assert_matches_brute_force(seeded(dilated()), "2", (24, 20), holes=True)
    assert (rf.size, rf.stride, rf.offset) == ((11, 11), (1, 1), (-2, -2))


def test_calls_of_one_module_differ() -> None:
    net = seeded(SharedAct())
    first = receptive_field(net, "act@0", (24, 24), dtype=F64)
    second = receptive_field(net, "act@1", (24, 24), dtype=F64)
    assert (first.size, first.stride, first.offset) == ((3, 3), (1, 1), (-1, -1))
    assert (second.size, second.stride, second.offset) == ((5, 5), (2, 2), (-2, -2))
    assert second.layer == "act@1"
    assert receptive_field(net, "act", (24, 24), dtype=F64) == replace(second, layer="act")
    assert receptive_field(net, "act@-2", (24, 24), dtype=F64) == replace(first, layer="act@-2")


# --- arithmetic --------------------------------------------------------------------------------


def test_textbook_arithmetic() -> None:
    """r = 1 + 2 + 2 + (2 - 1) * 1 = 6, j = 2, offset = -1 - 1 = -2."""
    net = seeded(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
    )
    rf = receptive_field(net, "4", (32, 32), dtype=F64)
    assert rf == ReceptiveField("4", (6, 6), (2, 2), (-2, -2), (32, 32), (16, 16), clipped=False)
    assert rf.box(0, 0) == (0, 0, 4, 4)
    assert rf.box(0, 0, clip=False) == (-2, -2, 4, 4)
    assert rf.box(5, 7) == (8, 12, 14, 18)
    assert rf.box(15, 15) == (28, 28, 32, 32)


@pytest.mark.parametrize("kind", ["dead", "saturated", "argmax"])
def test_zero_gradients_do_not_shrink_the_field(kind: str) -> None:
    """Dead ReLUs, saturated ReLU6 and max pooling give zero gradients inside the true field; the
    straight-through rules still find all of it (5x5 conv, then a 3x3 window)."""
    conv = nn.Conv2d(1, 1, 5, padding=2)
    second: nn.Module = {
        "dead": nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)),
        "saturated": nn.Sequential(nn.ReLU6(inplace=True), nn.Conv2d(1, 1, 3, padding=1)),
        "argmax": nn.MaxPool2d(3, stride=1, padding=1),
    }[kind]
    net = seeded(nn.Sequential(conv, second, nn.Identity()))
    with torch.no_grad():
        conv.bias.fill_({"dead": -1e6, "saturated": 1e6, "argmax": 0.0}[kind])
    rf = receptive_field(net, "2", (16, 16), dtype=F64, in_channels=1)
    assert (rf.size, rf.stride, rf.offset) == ((7, 7), (1, 1), (-3, -3))


def test_large_field_grows_the_input() -> None:
    """A 3x3 conv with dilation 40 after a stride-2 conv: r = 3 + 2 * 80 = 163 > 32."""
    net = seeded(
        nn.Sequential(
            nn.Conv2d(3, 2, 3, stride=2, padding=1),
            nn.Conv2d(2, 2, 3, padding=40, dilation=40),
            nn.Flatten(),
            nn.Linear(2 * 16 * 16, 3),  # only accepts 32x32 inputs
        )
    )
    rf = receptive_field(net, "1", (32, 32), dtype=F64)
    assert rf == ReceptiveField("1", (163, 163), (2, 2), (-81, -81), (32, 32), (16, 16))
    assert rf.box(8, 8) == (0, 0, 32, 32)


def test_field_larger_than_the_largest_input_is_flagged() -> None:
    net = seeded(nn.Sequential(nn.Conv2d(3, 1, (1101, 1), padding=(550, 0))))
    rf = receptive_field(net, "0", (16, 16), dtype=F64)
    assert rf.clipped
    assert rf.size[1] == 1 and rf.box(8, 8) == (0, 8, 16, 9)


def test_geometry_that_depends_on_the_input_size_is_flagged() -> None:
    """After adaptive pooling the stride is input/output: what the requested size gives is
    reported, flagged."""
    net = seeded(nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(4)))
    rf = receptive_field(net, "1", (16, 16), dtype=F64)
    assert rf.clipped
    assert (rf.stride, rf.output_size) == ((4, 4), (4, 4))
    assert rf.box(1, 2) == (3, 7, 9, 13)


# --- the default model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    import convlens

    return convlens.load_model("lite0").net


@pytest.mark.parametrize(
    ("layer", "size", "stride", "offset"),
    [("_blocks.0", 7, 2, -2), ("_blocks.3", 35, 8, -10)],
)
def test_lite0_early_layers(
    lite0: nn.Module, layer: str, size: int, stride: int, offset: int
) -> None:
    rf = receptive_field(lite0, layer)
    assert not rf.clipped
    assert rf.stride[0] * rf.output_size[0] == 224
    assert rf == ReceptiveField(
        layer, (size, size), (stride, stride), (offset, offset), (224, 224), rf.output_size
    )


def test_lite0_last_layer(lite0: nn.Module) -> None:
    """The last call of the shared ``_swish`` (the head): larger than the image, so measured on a
    larger input; EfficientNet-B0's receptive field is 851 px."""
    rf = receptive_field(lite0, "_swish")
    assert rf == ReceptiveField("_swish", (851, 851), (32, 32), (-394, -394), (224, 224), (7, 7))
    assert rf.box(3, 3) == (0, 0, 224, 224)
    assert receptive_field(lite0, "_swish@0").size == (3, 3)


# --- errors and state --------------------------------------------------------------------------


def hooks_left(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in net.modules()
    )


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.unused = nn.Conv2d(4, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(self.conv(x)).mean(dim=(2, 3))))


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        ("bn", None),
        ("cnov", "Did you mean: 'conv'"),
        ("fc", "needs a \\(B, C, H, W\\) feature map"),
        ("unused", "not used in the model's forward pass"),
        ("conv@3", "called 1 time"),
        ("conv@-2", "called 1 time"),
    ],
)
def test_errors_and_state_restored(layer: str, match: str | None) -> None:
    net = seeded(WithUnused()).train()
    net.conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    if match is None:
        assert receptive_field(net, layer, (12, 12), dtype=F64).size == (3, 3)
    else:
        with pytest.raises(LayerError, match=match):
            receptive_field(net, layer, (12, 12), dtype=F64)
    assert [m.training for m in net.modules()] == flags and all(flags)
    assert [p.requires_grad for p in net.parameters()] == grads
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert hooks_left(net) == 0


def test_bad_arguments() -> None:
    net = seeded(conv_stack())
    with pytest.raises(InputError, match="two positive integers"):
        receptive_field(net, "0", (0, 12), dtype=F64)
    with pytest.raises(InputError, match="input_size"):
        receptive_field(net, "0", (12, 12), dtype=F64, in_channels=2)
    rf = receptive_field(net, "0", (12, 12), dtype=F64)
    with pytest.raises(InputError, match="outside layer"):
        rf.box(12, 0)
    assert hooks_left(net) == 0


def test_inplace_after_layer_and_global_modes_untouched() -> None:
    """The captured output is the layer's, even when an in-place op follows; no torch-function
    mode or gradient setting leaks out of the call."""
    net = seeded(activations())
    grad_enabled = torch.is_grad_enabled()
    rf = receptive_field(net, "0", (12, 12), dtype=F64)
    assert rf.size == (3, 3)
    assert torch.is_grad_enabled() == grad_enabled
    x = torch.randn(1, 3, 8, 8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.relu(x - 10).sum(), x)
    assert torch.all(g == 0)  # ordinary ReLU gradients again
