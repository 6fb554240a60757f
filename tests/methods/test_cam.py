"""CAM, Grad-CAM and Grad-CAM++ against their formulas and each other."""

from __future__ import annotations

import pytest
import torch

from convlens import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerError,
    UnsupportedModelError,
)
from convlens.architecture import default_layer, find_gap_head
from tests.helpers.models import images
from tests.helpers.oracles import features_and_grads


def test_cam_finds_the_pooled_layer(gap_net: torch.nn.Module, shared_net: torch.nn.Module) -> None:
    x = images(2)
    assert find_gap_head(gap_net, x).layer.name == "relu2"
    head = find_gap_head(shared_net, x)
    assert (head.layer.name, head.layer.call) == ("act", -1)
    assert default_layer(shared_net, x) == head.layer


def test_cam_equals_formula(gap_net: torch.nn.Module) -> None:
    x = images(3)
    exp = CAM()(gap_net, x)
    t = exp.targets[:, 0]
    a, _ = features_and_grads(gap_net, x, t)
    expected = torch.einsum("bc,bchw->bhw", gap_net.fc.weight[t].detach(), a)
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], expected.float())
    # The map's spatial mean plus the bias is the class score.
    means = exp.raw_maps[:, 0].mean(dim=(1, 2)) + gap_net.fc.bias[t].detach().float()
    torch.testing.assert_close(means, exp.scores[:, 0])


def test_cam_equals_gradcam_up_to_a_positive_factor(gap_net: torch.nn.Module) -> None:
    x = images(4)
    cam = CAM()(gap_net, x, top_k=2)
    grad = GradCAM()(gap_net, x, top_k=2)
    assert cam.raw_maps is not None and grad.raw_maps is not None
    hw = cam.raw_maps.shape[-1] * cam.raw_maps.shape[-2]
    torch.testing.assert_close(torch.relu(cam.raw_maps) / hw, grad.raw_maps)


def test_gradcam_equals_formula(gap_net: torch.nn.Module) -> None:
    x = images(3)
    exp = GradCAM()(gap_net, x, target=[0, 1, 4])
    t = torch.tensor([0, 1, 4])
    a, g = features_and_grads(gap_net, x, t)
    alpha = g.mean(dim=(2, 3))
    expected = torch.relu(torch.einsum("bc,bchw->bhw", alpha, a))
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], expected.float())
    up = torch.nn.functional.interpolate(expected[:, None], size=(12, 12), mode="bilinear")
    torch.testing.assert_close(exp.maps[:, 0], up[:, 0].float())


def test_gradcam_plus_plus_equals_formula(gap_net: torch.nn.Module) -> None:
    x = images(2)
    exp = GradCAMPlusPlus()(gap_net, x)
    t = exp.targets[:, 0]
    a, g = features_and_grads(gap_net, x, t)
    out = torch.zeros(2, *a.shape[-2:], dtype=torch.float64)
    for b in range(2):
        for c in range(a.shape[1]):
            num = g[b, c] ** 2
            den = 2 * g[b, c] ** 2 + a[b, c].sum() * g[b, c] ** 3
            coeff = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
            out[b] += (coeff * torch.relu(g[b, c])).sum() * a[b, c]
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], torch.relu(out).float())


def test_gradcam_on_a_layer_followed_by_inplace_relu(gap_net: torch.nn.Module) -> None:
    """conv1 feeds ReLU(inplace=True): the captured activation must stay pre-ReLU."""
    x = images(2)
    exp = GradCAM()(gap_net, x, layer="conv1")
    t = exp.targets[:, 0]
    a = gap_net.conv1(x).detach().requires_grad_(True)
    logits = gap_net.fc(
        gap_net.pool(gap_net.relu2(gap_net.bn(gap_net.conv2(torch.relu(a))))).flatten(1)
    )
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    expected = torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a.detach()))
    assert exp.raw_maps is None  # conv1 keeps the input resolution: nothing to upsample
    torch.testing.assert_close(exp.maps[:, 0], expected.float())


def test_gradcam_on_each_call_of_a_shared_module(shared_net: torch.nn.Module) -> None:
    x = images(2)
    net = shared_net
    stem = net.stem(x)
    a0 = torch.relu(stem).detach().requires_grad_(True)
    a1_in = net.block(a0)
    a1 = torch.relu(a1_in)
    h = a0 + a1
    a2 = torch.relu(net.head(h))
    logits = net.fc(a2.mean(dim=(2, 3)))
    t = logits.argmax(1)
    score = logits.gather(1, t[:, None]).sum()
    g0, g1, g2 = torch.autograd.grad(score, [a0, a1, a2])
    for call, a, g in [(0, a0, g0), (1, a1, g1), (2, a2, g2), (-1, a2, g2)]:
        exp = GradCAM()(net, x, layer=f"act@{call}")
        expected = torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a.detach()))
        torch.testing.assert_close(exp.maps[:, 0], expected.float(), msg=f"call {call}")


def test_cam_on_model_without_gap_names_gradcam(nogap_net: torch.nn.Module) -> None:
    x = images(2, size=8)
    with pytest.raises(UnsupportedModelError, match="gradcam"):
        CAM()(nogap_net, x)
    exp = GradCAM()(nogap_net, x)  # Grad-CAM works on it
    assert exp.layer == "relu" and exp.maps.shape == (2, 1, 8, 8)


def test_wrong_layer_name_lists_close_matches(gap_net: torch.nn.Module) -> None:
    with pytest.raises(LayerError, match="conv2"):
        GradCAM()(gap_net, images(1), layer="conv_2")
    with pytest.raises(LayerError, match="no call 5"):
        GradCAM()(gap_net, images(1), layer="conv2@5")


def test_layer_without_spatial_output_is_refused(gap_net: torch.nn.Module) -> None:
    with pytest.raises(LayerError, match="feature map"):
        GradCAM()(gap_net, images(1), layer="fc")


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: proves that no gradient flows below the chosen layer."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("backward went below the explained layer")


class _GuardedNet(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _NoBackward.apply(x)
        return self.inner(x)


def test_gradcam_backward_stops_at_the_layer(gap_net: torch.nn.Module) -> None:
    net = _GuardedNet(gap_net)
    x = images(2)
    for p in net.parameters():
        p.requires_grad_(True)
    exp = GradCAM()(net, x, layer="inner.conv2")
    assert exp.maps.shape == (2, 1, 12, 12)
    assert all(p.grad is None for p in net.parameters())  # no parameter gradients either
    with pytest.raises(AssertionError, match="below"):
        from convlens import Saliency

        Saliency()(net, x)  # an input-gradient method does go through it


def test_explain_gives_no_layer_to_methods_that_find_their_own(gap_net: torch.nn.Module) -> None:
    """``explain``'s layer goes to Grad-CAM, not to CAM (``finds_own_layer``), which refuses
    one, also when CAM runs inside a wrapper."""
    from convlens import explain
    from convlens.methods import TTA

    x = images(2)
    wrapped = TTA(CAM(), flips=False)
    assert CAM.finds_own_layer and wrapped.finds_own_layer and not GradCAM.finds_own_layer
    out = explain(gap_net, x, [CAM(), wrapped, GradCAM()], layer="conv1")
    assert (out["cam"].layer, out["tta"].layer, out["gradcam"].layer) == ("relu2", "relu2", "conv1")
    torch.testing.assert_close(out["tta"].maps, out["cam"].maps)
    with pytest.raises(LayerError, match="CAM always uses"):
        CAM()(gap_net, x, layer="conv1")
