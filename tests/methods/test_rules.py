"""Deconvnet, guided backprop and guided Grad-CAM: hand-worked values, the literal reference,
functional activations, ReLU6, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens import GradCAM, UnsupportedModelError
from convlens.hooks import backprop_rule
from convlens.methods import Deconvnet, GuidedBackprop, GuidedGradCAM, project_units
from convlens.methods.reference import reference_deconvnet
from tests.helpers.models import images, seeded


class OneByOne(nn.Module):
    """x -> 1x1 conv (3 -> 2) -> act -> global mean -> linear (2 -> 2): worked out by hand."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.act = act
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor([[1.0, -1.0, 0.5], [-2.0, 1.0, 1.0]]).view(2, 3, 1, 1)
            )
            self.fc.weight.copy_(torch.tensor([[1.0, -3.0], [-1.0, 2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def hand(x: torch.Tensor, t: int, rule: str, upper: float = float("inf")) -> torch.Tensor:
    """The rules written out for OneByOne: R_c = W_fc[t, c] / (h w) at the activation."""
    w = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 1.0, 1.0]], dtype=x.dtype)
    fc = torch.tensor([[1.0, -3.0], [-1.0, 2.0]], dtype=x.dtype)[t]
    z = torch.einsum("oc,bchw->bohw", w, x)
    hw = x.shape[-1] * x.shape[-2]
    r = (fc / hw).view(1, 2, 1, 1).expand_as(z)
    active = ((z > 0) & (z < upper)).to(x.dtype)
    if rule == "gradient":
        r = r * active
    elif rule == "deconvnet":
        r = r.clamp(min=0)
    elif rule == "guided":
        r = r.clamp(min=0) * active
    return torch.einsum("oc,bohw->bchw", w, r)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU(inplace=True)])
@pytest.mark.parametrize(("method", "rule"), [(Deconvnet, "deconvnet"), (GuidedBackprop, "guided")])
def test_rules_match_hand_worked_values(act: nn.Module, method, rule: str) -> None:
    net = OneByOne(act).double()
    x = images(2, size=5)
    for t in (0, 1):
        exp = method()(net, x, target=t)
        assert exp.attributions is not None
        torch.testing.assert_close(exp.attributions[:, 0], hand(x, t, rule).float())
        torch.testing.assert_close(exp.maps[:, 0], hand(x, t, rule).abs().amax(1).float())
        assert exp.meta["display"] == "rgb"


def test_relu6_clipped_range() -> None:
    net = OneByOne(nn.ReLU6()).double()
    x = images(2, size=5) * 5  # many units above 6
    z = net.conv(x)
    assert (z > 6).any() and (z < 0).any()
    guided = GuidedBackprop()(net, x, target=1)
    assert guided.attributions is not None
    torch.testing.assert_close(guided.attributions[:, 0], hand(x, 1, "guided", 6.0).float())
    deconv = Deconvnet()(net, x, target=1)
    assert deconv.attributions is not None
    torch.testing.assert_close(deconv.attributions[:, 0], hand(x, 1, "deconvnet").float())
    # The rule mode leaves true gradients untouched, clipped range included.
    xx = x.clone().requires_grad_(True)
    with backprop_rule("gradient"):
        out = net(xx)[:, 1].sum()
    (g,) = torch.autograd.grad(out, xx)
    torch.testing.assert_close(g, hand(x, 1, "gradient", 6.0))


@pytest.mark.parametrize(("method", "rule"), [(GuidedBackprop, "guided"), (Deconvnet, "deconvnet")])
def test_an_outer_rule_applies_to_saliency(method, rule: str) -> None:
    """Saliency builds a lean graph (InputGradientMode); inside ``backprop_rule`` the outer
    rule still applies to every ReLU."""
    from convlens.methods import Saliency

    net = seeded(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2),
            nn.ReLU6(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )
    )
    x = images(2, size=11)
    expected = method()(net, x, target=1).attributions
    plain = Saliency()(net, x, target=1).attributions
    with backprop_rule(rule) as mode:
        got = Saliency()(net, x, target=1).attributions
    assert expected is not None and got is not None and plain is not None
    assert mode.count == 2
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class Functional(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = OneByOne(nn.Identity())
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner.conv(x)
        if self.kind == "F.relu":
            z = F.relu(z)
        elif self.kind == "torch.relu":
            z = torch.relu(z)
        elif self.kind == "clamp":
            z = z.clamp(min=0)
        elif self.kind == "relu_":
            z = z * 1.0
            z.relu_()  # result used through the mutation only
        elif self.kind == "inplace":
            z = F.relu(z * 1.0, inplace=True)
        elif self.kind == "clamp_min":
            z = torch.clamp_min(z, 0)
        return self.inner.fc(z.mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["F.relu", "torch.relu", "clamp", "relu_", "inplace", "clamp_min"])
@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_functional_activations_are_handled(kind: str, rule: str) -> None:
    net = Functional(kind).double()
    x = images(2, size=5)
    method = Deconvnet() if rule == "deconvnet" else GuidedBackprop()
    exp = method(net, x, target=0)
    assert exp.attributions is not None
    torch.testing.assert_close(exp.attributions[:, 0], hand(x, 0, rule).float())


def test_activation_without_rule_is_reported() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3),
        nn.ReLU(),
        nn.Conv2d(2, 2, 1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 2),
    ).double()
    with pytest.raises(UnsupportedModelError, match="silu"):
        GuidedBackprop()(net, images(1))
    assert GuidedBackprop(strict=False)(net, images(1)).maps.shape == (1, 1, 12, 12)
    no_relu = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        Deconvnet()(no_relu, images(1))


def test_shared_activation_module(shared_net: nn.Module) -> None:
    x = images(2)
    exp = GuidedBackprop()(shared_net, x)

    # Independent: the same network written with explicit guided units.
    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return g.clamp(min=0) * (z > 0)

    net = shared_net
    xx = x.clone().requires_grad_(True)
    h = Guided.apply(net.stem(xx))
    h = h + Guided.apply(net.block(h))
    h = Guided.apply(net.head(h))
    logits = net.fc(h.mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(logits.gather(1, exp.targets).sum(), xx)
    assert exp.attributions is not None
    torch.testing.assert_close(exp.attributions[:, 0], g.float())


def test_guided_gradcam_is_the_product(gap_net: nn.Module) -> None:
    x = images(2)
    ggc = GuidedGradCAM()(gap_net, x, target=[1, 3])
    cam = GradCAM()(gap_net, x, target=[1, 3])
    guided = GuidedBackprop()(gap_net, x, target=[1, 3])
    assert ggc.attributions is not None and guided.attributions is not None
    torch.testing.assert_close(ggc.attributions, guided.attributions * cam.maps.unsqueeze(2))
    assert ggc.layer == cam.layer


def vgg_like(overlap: bool) -> nn.Sequential:
    pool = (lambda: nn.MaxPool2d(3, 2, padding=1)) if overlap else (lambda: nn.MaxPool2d(2))
    return seeded(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            pool(),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            pool(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 1, ceil_mode=True) if overlap else nn.MaxPool2d(2),
            nn.Conv2d(8, 5, 1),
        ),
        dtype=torch.float32,
    )  # type: ignore[return-value]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("upto", [4, 7, 10, 11])
def test_rule_deconvnet_equals_literal_reference(overlap: bool, upto: int) -> None:
    stack = vgg_like(overlap)
    g = torch.Generator().manual_seed(upto)
    x = torch.randn(2, 3, 32, 32, generator=g)
    prefix = nn.Sequential(*list(stack)[: upto + 1])
    with torch.no_grad():
        shape = prefix(x).shape
    signal = torch.randn(shape, generator=g)  # any signal, negative parts included
    expected = reference_deconvnet(stack, x, upto, signal)
    xx = x.clone().requires_grad_(True)
    with backprop_rule("deconvnet"):
        out = prefix(xx)
    (got,) = torch.autograd.grad(out, xx, signal)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert expected.abs().max() > 0


def test_project_units_equals_reference_for_single_activations() -> None:
    stack = vgg_like(True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    units = torch.tensor([[0, 1, 2, 3], [2, 4, 0, 0], [0, 1, 2, 3], [1, 5, 3, 1]])
    got = project_units(stack, x, "6", units, batch_size=3)
    prefix = nn.Sequential(*list(stack)[:7])
    with torch.no_grad():
        shape = prefix(x[:1]).shape
    for n, (b, c, yy, xx) in enumerate(units.tolist()):
        signal = torch.zeros(shape)
        signal[0, c, yy, xx] = 1.0
        expected = reference_deconvnet(stack, x[b : b + 1], 6, signal)[0]
        assert (got[n] - expected).abs().max().item() <= 1e-5


def test_project_units_restores_the_model() -> None:
    stack = vgg_like(False).train()
    project_units(stack, torch.randn(1, 3, 32, 32), "4", torch.tensor([[0, 0, 1, 1]]))
    assert all(m.training for m in stack.modules())
    assert all(not m._forward_hooks for m in stack.modules())
    assert all(p.requires_grad for p in stack.parameters())
