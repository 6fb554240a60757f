"""The wider family against formulas and brute force: XGrad-CAM, HiResCAM, Layer-CAM,
Eigen-CAM, Score-CAM, Ablation-CAM, integrated gradients, RISE, VarGrad, TTA."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.accel.lean_graph import input_gradient_mode
from convlens.errors import BlankMapWarning
from convlens.hooks import model_state
from convlens.methods import (
    RISE,
    TTA,
    AblationCAM,
    EigenCAM,
    GradCAM,
    HiResCAM,
    IntegratedGradients,
    LayerCAM,
    Saliency,
    ScoreCAM,
    SmoothGrad,
    VarGrad,
    XGradCAM,
)
from convlens.result import Explanation
from tests.helpers.models import images, seeded
from tests.helpers.oracles import (
    ablation_cam_brute_force,
    features_and_grads,
    score_cam_brute_force,
)


def test_xgradcam_formula(gap_net: nn.Module) -> None:
    x = images(2)
    exp = XGradCAM()(gap_net, x)
    a, g = features_and_grads(gap_net, x, exp.targets[:, 0])
    alpha = (a / a.sum(dim=(2, 3), keepdim=True).clamp_min(1e-30) * g).sum(dim=(2, 3))
    expected = torch.relu(torch.einsum("bc,bchw->bhw", alpha, a))
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], expected.float())


def test_hirescam_formula_and_gradcam_identity_on_gap(gap_net: nn.Module) -> None:
    x = images(3)
    hi = HiResCAM()(gap_net, x, top_k=2)
    gc = GradCAM()(gap_net, x, top_k=2)
    torch.testing.assert_close(hi.maps, gc.maps)
    exp = HiResCAM()(gap_net, x, layer="conv2")
    t = exp.targets[:, 0]
    a = gap_net.conv2(gap_net.relu1(gap_net.conv1(x))).detach().requires_grad_(True)
    logits = gap_net.fc(gap_net.pool(gap_net.relu2(gap_net.bn(a))).flatten(1))
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], torch.relu((g * a).sum(1)).float())


def test_layercam_formula_and_fusion(gap_net: nn.Module) -> None:
    x = images(2)
    exp = LayerCAM()(gap_net, x)
    a, g = features_and_grads(gap_net, x, exp.targets[:, 0])
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], torch.relu((torch.relu(g) * a).sum(1)).float())
    fused = LayerCAM(layers=["relu1", "relu2"])(gap_net, x)
    one = LayerCAM()(gap_net, x, layer="relu1").maps
    two = LayerCAM()(gap_net, x, layer="relu2").maps

    def unit(m: torch.Tensor) -> torch.Tensor:
        f = m.flatten(2)
        lo, hi = f.amin(2, keepdim=True), f.amax(2, keepdim=True)
        return ((f - lo) / (hi - lo)).view_as(m)

    torch.testing.assert_close(fused.maps, torch.maximum(unit(one), unit(two)))
    assert fused.layer == "relu1+relu2"


def test_eigencam_is_the_first_principal_component(gap_net: nn.Module) -> None:
    x = images(2)
    exp = EigenCAM()(gap_net, x, top_k=2)
    a = gap_net.features(x).detach()
    for i in range(2):
        m = a[i].flatten(1).T.numpy()  # (hw, C)
        m = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(m, full_matrices=False)
        proj = m @ vt[0]
        mean_act = a[i].mean(0).flatten().numpy()
        if (proj * (mean_act - mean_act.mean())).sum() < 0:
            proj = -proj
        expected = torch.relu(torch.from_numpy(proj)).view(a.shape[-2:])
        assert exp.raw_maps is not None
        torch.testing.assert_close(exp.raw_maps[i, 0], expected.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(exp.raw_maps[i, 1], exp.raw_maps[i, 0])  # class-agnostic


def paper_scorecam(exp: Explanation) -> torch.Tensor:
    """Score-CAM's raw maps (B, h, w) of the first target on the paper's scale: with
    probability scores the weights are rescaled by exp(-meta["log_scale"]) per image."""
    assert exp.raw_maps is not None
    maps = exp.raw_maps[:, 0]
    if "log_scale" in exp.meta:
        maps = maps * exp.meta["log_scale"][:, 0].exp().view(-1, 1, 1)
    return maps


@pytest.mark.parametrize(("score", "softmax"), [("prob", False), ("logit", True)])
def test_scorecam_equals_brute_force(gap_net: nn.Module, score: str, softmax: bool) -> None:
    x = images(2)
    exp = ScoreCAM(score=score, channel_softmax=softmax, batch_size=5)(gap_net, x)  # type: ignore[arg-type]
    expected = score_cam_brute_force(gap_net, x, exp.targets[:, 0], score == "logit", softmax)
    assert ("log_scale" in exp.meta) == (score == "prob" and not softmax)
    torch.testing.assert_close(paper_scorecam(exp), expected.float(), atol=1e-6, rtol=1e-5)


def test_scorecam_top_channels_uses_only_those(gap_net: nn.Module) -> None:
    x = images(2)
    full = ScoreCAM()(gap_net, x)
    approx = ScoreCAM(top_channels=6)(gap_net, x)  # all 6 channels: the same
    torch.testing.assert_close(full.maps, approx.maps)
    few = ScoreCAM(top_channels=2)(gap_net, x)
    assert few.meta["forward_passes"] == 2 + 2 * 2


def test_ablationcam_closed_form_equals_brute_force(gap_net: nn.Module) -> None:
    x = images(3)
    exp = AblationCAM()(gap_net, x)
    assert exp.meta["closed_form"] and exp.meta["suffix_passes"] == 0
    expected = ablation_cam_brute_force(gap_net, x, exp.targets[:, 0])
    assert exp.raw_maps is not None
    torch.testing.assert_close(exp.raw_maps[:, 0], expected.float())
    rerun = AblationCAM(exact="never", batch_size=4)(gap_net, x)
    assert not rerun.meta["closed_form"] and rerun.meta["suffix_passes"] == 3 * 2
    torch.testing.assert_close(rerun.maps, exp.maps, atol=1e-6, rtol=1e-5)


class BatchOneHead(nn.Module):
    """A head that reshapes with the input's batch size (as EfficientNet does): the suffix
    cannot take the ablated copies as a batch, so Ablation-CAM must re-run everything."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.shape[0]
        return self.fc(self.act(self.conv(x)).reshape(bs, -1))


def test_ablationcam_on_a_model_without_gap() -> None:
    net = seeded(BatchOneHead())
    x = images(2, size=6)
    exp = AblationCAM(batch_size=3)(net, x, layer="act")
    t = exp.targets[:, 0]
    a = net.act(net.conv(x)).detach()
    for i in range(2):
        s = net.fc(a[i : i + 1].flatten(1))[0, t[i]]
        alpha = []
        for c in range(4):
            ab = a[i : i + 1].clone()
            ab[:, c] = 0
            alpha.append((s - net.fc(ab.flatten(1))[0, t[i]]) / s)
        expected = torch.relu((torch.stack(alpha)[:, None, None] * a[i]).sum(0))
        torch.testing.assert_close(exp.maps[i, 0], expected.detach().float())


def test_integrated_gradients_is_exact_on_a_linear_model(linear_net: nn.Module) -> None:
    x = images(2, size=6)
    exp = IntegratedGradients(steps=3, rule="left")(linear_net, x, target=1)
    w = linear_net.fc.weight.detach().view(3, 3, 6, 6)[1]
    assert exp.attributions is not None
    torch.testing.assert_close(exp.attributions[:, 0], (w * x).float())
    assert exp.meta["delta"].abs().max() < 1e-5


def test_integrated_gradients_converges_and_reports_delta(gap_net: nn.Module) -> None:
    x = images(2)
    ref = IntegratedGradients(steps=2000, rule="middle", batch_size=512)(gap_net, x, target=2)
    gl = IntegratedGradients(steps=48, batch_size=16)(gap_net, x, target=2)
    left = IntegratedGradients(steps=48, rule="left", batch_size=16)(gap_net, x, target=2)
    err_gl = (gl.maps - ref.maps).abs().max()
    err_left = (left.maps - ref.maps).abs().max()
    assert err_gl < err_left
    assert gl.meta["delta"].abs().max() < left.meta["delta"].abs().max()
    # Independent Riemann sum with autograd, one point at a time.
    t = 2
    total = torch.zeros_like(x)
    for k in range(8):
        pt = (x * (k + 0.5) / 8).requires_grad_(True)
        gap_net(pt)[:, t].sum().backward()
        assert pt.grad is not None
        total += pt.grad / 8
    mid = IntegratedGradients(steps=8, rule="middle", batch_size=3)(gap_net, x, target=t)
    assert mid.attributions is not None
    torch.testing.assert_close(mid.attributions[:, 0], (total * x).float())


class LeanNet(nn.Module):
    """Every case the input-gradient mode rewrites, and some it must leave to autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU6(inplace=True)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=6)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.same = nn.Conv2d(6, 5, 3, padding="same", bias=False)  # left to autograd
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.hardtanh(self.bn2(self.dw(x)), 0.0, 2.0)
        x = torch.relu(self.same(x).clamp(min=0) - 0.1)
        return self.fc(F.silu(x).mean(dim=(2, 3)))


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the tensors its autograd graph saved (parameters excluded)."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes)


@pytest.mark.parametrize("channels_last", [False, True])
def test_input_gradient_mode_gives_autograd_gradients_with_a_smaller_graph(
    channels_last: bool,
) -> None:
    net = seeded(LeanNet())
    x = images(2, size=10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with model_state(net):
        xa = x.clone().requires_grad_(True)
        out, plain = _saved_bytes(lambda: net(xa))
        (expected,) = torch.autograd.grad((out * w).sum(), xa)
        xb = x.clone().requires_grad_(True)
        with input_gradient_mode() as mode:
            out_lean, lean = _saved_bytes(lambda: net(xb))
            (got,) = torch.autograd.grad((out_lean * w).sum(), xb)
    torch.testing.assert_close(out_lean, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert mode.count == 4  # relu6, hardtanh(0, 2), clamp(min=0), relu: one-byte masks
    assert lean < plain / 2


# Every ReLU-like op the mode replaces. Autograd's convention at the bounds is the running
# torch's: relu, relu6, hardtanh pass nothing at a bound; clamp/clip/clamp_min pass both bounds
# on torch 2.13 and neither on torch 2.14.
BOUND_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F.relu": F.relu,
    "F.relu_inplace": lambda z: F.relu(z * 1.0, inplace=True),
    "torch.relu_": lambda z: torch.relu_(z * 1.0),
    "Tensor.relu": lambda z: z.relu(),
    "F.relu6": F.relu6,
    "nn.ReLU6_inplace": lambda z: nn.ReLU6(inplace=True)(z * 1.0),
    "F.hardtanh(0,2)": lambda z: F.hardtanh(z, 0.0, 2.0),
    "F.hardtanh_inplace(0,2)": lambda z: F.hardtanh(z * 1.0, 0.0, 2.0, inplace=True),
    "clamp(0,2)": lambda z: z.clamp(0, 2),
    "torch.clamp(0,6)": lambda z: torch.clamp(z, 0, 6),
    "clamp_(0,2)": lambda z: (z * 1.0).clamp_(0, 2),
    "clip(0,2)": lambda z: z.clip(0, 2),
    "clamp(min=0)": lambda z: z.clamp(min=0),
    "clamp_(min=0)": lambda z: (z * 1.0).clamp_(min=0),
    "clamp_min(0)": lambda z: z.clamp_min(0),
    "torch.clamp_min_": lambda z: torch.clamp_min_(z * 1.0, 0),
}


@pytest.mark.parametrize("op", sorted(BOUND_OPS))
def test_input_gradient_mode_matches_autograd_on_the_bounds(op: str) -> None:
    fn = BOUND_OPS[op]
    z = torch.tensor([-1.0, -0.0, 0.0, 0.5, 2.0, 3.0, 6.0, 7.0, float("nan")], dtype=torch.float64)
    w = torch.arange(1.0, 10.0, dtype=torch.float64)  # a distinct weight per entry
    za = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fn(za), za, w)
    zb = z.clone().requires_grad_(True)
    with input_gradient_mode() as mode:
        out = fn(zb)
    (got,) = torch.autograd.grad(out, zb, w)
    assert mode.count == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _FakeClamp(torch.autograd.Function):
    """``clamp(t, 0, upper)`` with a chosen backward on the bounds and at NaN, standing in for
    a torch whose autograd has another convention than the one installed."""

    @staticmethod
    def forward(ctx, t, upper, on_lower, on_upper, at_nan):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(t)
        ctx.conv = (upper, on_lower, on_upper, at_nan)
        return t.clamp(0.0, upper)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (t,) = ctx.saved_tensors
        upper, on_lower, on_upper, at_nan = ctx.conv
        factor = ((t > 0) & (t < upper)).to(g.dtype)
        factor = factor + on_lower * (t == 0) + on_upper * (t == upper) + at_nan * t.isnan()
        return g * factor, None, None, None, None


@pytest.mark.parametrize(
    "on_lower, on_upper, at_nan",
    [(1.0, 1.0, 0.0), (0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (0.5, 0.5, 0.0)],
)
def test_input_gradient_mode_follows_the_bound_convention_torch_has(
    monkeypatch: pytest.MonkeyPatch, on_lower: float, on_upper: float, at_nan: float
) -> None:
    """The lean graph's convention on the bounds is measured from torch's autograd, not assumed:
    whatever torch does there (here a stand-in), the lean graph does; where torch's gradient is
    no pass-or-block mask (half the gradient on a bound), the unit is left to autograd."""
    from convlens.hooks import rules

    def fake(kind: str, upper: float) -> Callable[[torch.Tensor], torch.Tensor]:
        assert kind == "clamp"
        return lambda t: _FakeClamp.apply(t, upper, on_lower, on_upper, at_nan)

    monkeypatch.setattr(rules, "_reference_unit", fake)
    rules._measured_convention.cache_clear()
    try:
        z = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, float("nan")], dtype=torch.float64)
        w = torch.arange(1.0, 7.0, dtype=torch.float64)
        zb = z.clone().requires_grad_(True)
        with input_gradient_mode() as mode:
            out = zb.clamp(0, 2)
        (got,) = torch.autograd.grad(out, zb, w)
    finally:
        rules._measured_convention.cache_clear()  # no stand-in convention for later tests
    assert mode.count == 1
    if on_lower == 0.5:  # not a mask: torch's own clamp ran, with torch's own gradient
        za = z.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(za.clamp(0, 2), za, w)
    else:
        expected = w * torch.tensor([0.0, on_lower, 1.0, on_upper, 0.0, at_nan], dtype=w.dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class ClampFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.clamp(0, 1))).mean(dim=(2, 3)))


def test_saliency_of_black_and_white_pixels_is_autograd_s() -> None:
    """Pixels exactly on the bounds of ``x.clamp(0, 1)`` get the gradient the running torch's
    autograd gives them (torch 2.13 passes it, 2.14 does not), pixels between get theirs."""
    net = seeded(ClampFirst())
    x = (images(2, size=6) > 0).double()  # every pixel exactly 0 or 1 ...
    x[:, :, ::2, ::2] = 0.5  # ... but a quarter, between the bounds
    exp = Saliency()(net, x, target=0)
    xx = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xx)[:, 0].sum(), xx)
    assert expected[:, :, ::2, ::2].abs().amin() > 0
    assert exp.attributions is not None
    torch.testing.assert_close(exp.attributions[:, 0], expected.float())


def test_input_gradient_mode_under_autocast_convolves_back_in_one_dtype() -> None:
    """Under autocast the forward convolves a 16-bit copy of the float32 weight; the backward
    kernel must get the weight in the gradient's dtype (cuDNN refuses a mix; the CPU accepts
    it, so the arguments are checked)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[torch.dtype, ...]] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.convolution_backward.default:
                seen.append((args[0].dtype, args[1].dtype, args[2].dtype))
            return func(*args, **(kwargs or {}))

    net = seeded(LeanNet(), dtype=torch.float32)
    x = images(2, size=10).float()
    with model_state(net):
        xa = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (expected,) = torch.autograd.grad(net(xa).float().sum(), xa)
        xb = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), input_gradient_mode():
            out = net(xb)
        with Spy():
            (got,) = torch.autograd.grad(out.float().sum(), xb)
    assert len(seen) == 3  # conv1 and the depthwise conv (lean), the "same" one (autograd)
    assert all(d == (torch.bfloat16,) * 3 for d in seen), seen
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_input_gradient_mode_leaves_trainable_parameters_to_autograd() -> None:
    net = seeded(LeanNet())
    x = images(2, size=10).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(x).sum(), net.conv1.weight)
    with input_gradient_mode():
        (got,) = torch.autograd.grad(net(x).sum(), net.conv1.weight)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_integrated_gradients_matches_brute_force_for_several_targets() -> None:
    net = seeded(LeanNet(), seed=4)
    x = images(3, size=10, seed=5)
    base = torch.full_like(x, 0.25)
    exp = IntegratedGradients(steps=5, baseline=base, batch_size=4)(net, x, top_k=2)
    assert exp.attributions is not None  # float32 (results are); computed in float64
    nodes, weights = np.polynomial.legendre.leggauss(5)
    for i in range(3):
        for j in range(2):
            t = int(exp.targets[i, j])
            total = torch.zeros_like(x[i])
            for a, wt in zip((nodes + 1) / 2, weights / 2, strict=True):
                pt = (base[i] + float(a) * (x[i] - base[i]))[None].requires_grad_(True)
                (g,) = torch.autograd.grad(net(pt)[0, t], pt)
                total += float(wt) * g[0]
            torch.testing.assert_close(exp.attributions[i, j], (total * (x[i] - base[i])).float())
            with torch.no_grad():
                gap = net(x[i : i + 1])[0, t] - net(base[i : i + 1])[0, t]
            delta = float(exp.attributions[i, j].sum() - gap)
            assert float(exp.meta["delta"][i, j]) == pytest.approx(delta, abs=1e-5)


def test_integrated_gradients_points_per_pass() -> None:
    cpu = torch.empty(4, 3, 224, 224)
    gpu_like = torch.empty(4, 3, 224, 224, device="meta")  # any device but the CPU
    assert IntegratedGradients(steps=32).points_per_pass(cpu) == 32
    assert IntegratedGradients(steps=32, batch_size=10).points_per_pass(cpu) == 8
    assert IntegratedGradients(steps=32, batch_size=2).points_per_pass(cpu) == 4  # >= 1 each
    assert IntegratedGradients(steps=4, batch_size=64).points_per_pass(cpu) == 16  # <= all
    # Off the CPU: as many as the memory cap allows (224 px, 588 kB per image: 128 x that per
    # path point estimated for the plain graph, the default, 32 x for the lean one).
    assert IntegratedGradients(steps=32).points_per_pass(gpu_like) == 52
    assert IntegratedGradients(steps=32, graph="lean").points_per_pass(gpu_like) == 128
    assert IntegratedGradients(steps=32, graph="lean", memory_mb=200).points_per_pass(gpu_like) == 8
    with pytest.raises(ValueError, match="graph"):
        IntegratedGradients(graph="auto")
    with pytest.raises(ValueError):
        IntegratedGradients(batch_size=0)


def test_integrated_gradients_baselines(gap_net: nn.Module) -> None:
    x = images(1)
    with pytest.warns(BlankMapWarning, match=r"intgrad .* all-zero .* image 0"):
        same = IntegratedGradients(steps=4, baseline=x.clone())(gap_net, x)
    assert same.maps.abs().max() == 0
    assert same.meta["blank"].tolist() == [[True]]
    blur = IntegratedGradients(steps=4, baseline="blur", blur_sigma=1.0)(gap_net, x)
    assert blur.maps.abs().max() > 0
    with pytest.raises(ValueError):
        IntegratedGradients(rule="simpson")


def test_rise_equals_the_mask_weighted_average(gap_net: nn.Module) -> None:
    x = images(2)
    method = RISE(masks=30, cells=3, batch_size=7, seed=3)
    exp = method(gap_net, x)
    gen = torch.Generator().manual_seed(3)
    masks = method.masks(*method.draw((12, 12), gen, torch.device("cpu")), (12, 12))
    assert masks.min() >= 0 and masks.max() <= 1
    t = exp.targets[:, 0]
    for i in range(2):
        total = torch.zeros(12, 12, dtype=torch.float64)
        for m in masks:
            with torch.no_grad():
                p = torch.softmax(gap_net(x[i : i + 1] * m.double()), 1)[0, t[i]]
            total += p * m[0].double()
        # the map is the paper's divided by exp(log_scale), the largest masked probability
        scale = exp.meta["log_scale"][i, 0].exp()
        torch.testing.assert_close(exp.maps[i, 0] * scale, (total / (30 * 0.5)).float())
    # batches that see their largest probability at different times rescale the same way
    again = RISE(masks=30, cells=3, batch_size=30, seed=3)(gap_net, x)
    torch.testing.assert_close(again.maps, exp.maps)
    torch.testing.assert_close(again.meta["log_scale"], exp.meta["log_scale"])


def test_rise_map_of_an_image_does_not_depend_on_its_batch(gap_net: nn.Module) -> None:
    """Seeded per image: the masks come from the seed alone, so image i's map (and its scale)
    is the same alone, in a batch at any position, and at any batch_size."""
    x = images(3)
    together = RISE(masks=20, cells=3, batch_size=7, seed=2)(gap_net, x)
    for i in range(3):
        alone = RISE(masks=20, cells=3, batch_size=4, seed=2)(gap_net, x[i : i + 1])
        torch.testing.assert_close(alone.maps[0], together.maps[i])
        torch.testing.assert_close(alone.meta["log_scale"][0], together.meta["log_scale"][i])
    flipped = RISE(masks=20, cells=3, batch_size=20, seed=2)(gap_net, x.flip(0))
    torch.testing.assert_close(flipped.maps.flip(0), together.maps)


def test_vargrad_is_the_variance(gap_net: nn.Module) -> None:
    x = images(1)
    var = VarGrad(samples=4, noise=0.2, batch_size=4, seed=5)(gap_net, x)
    mean = SmoothGrad(samples=4, noise=0.2, batch_size=4, seed=5)(gap_net, x)
    gen = torch.Generator().manual_seed(5)
    eps = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(4)]
    span = x.max() - x.min()
    maps = torch.stack([Saliency()(gap_net, x + 0.2 * span * eps[s]).maps for s in range(4)])
    torch.testing.assert_close(mean.maps, maps.mean(0))
    torch.testing.assert_close(var.maps, maps.var(0, unbiased=False), atol=1e-6, rtol=1e-4)


def test_tta_maps_back_to_the_original_frame(gap_net: nn.Module) -> None:
    x = images(2)
    plain = GradCAM()(gap_net, x)
    none = TTA(GradCAM(), flips=False)(gap_net, x)
    torch.testing.assert_close(none.maps, plain.maps)
    both = TTA(GradCAM(), flips=True)(gap_net, x)
    flipped = GradCAM()(gap_net, x.flip(-1), target=plain.targets)
    torch.testing.assert_close(both.maps, (plain.maps + flipped.maps.flip(-1)) / 2)
    scaled = TTA(Saliency(), flips=False, scales=(1.0, 2.0))(gap_net, x)
    assert scaled.maps.shape == (2, 1, 12, 12)


def test_scorecam_dead_channels_share_one_pass(gap_net: nn.Module) -> None:
    with torch.no_grad():
        gap_net.bn.bias[:3] = -100.0  # channels 0-2 dead after the ReLU: constant zero maps
    x = images(2)
    exp = ScoreCAM(batch_size=4)(gap_net, x)
    expected = score_cam_brute_force(gap_net, x, exp.targets[:, 0])
    torch.testing.assert_close(paper_scorecam(exp), expected.float(), atol=1e-6, rtol=1e-5)
    a = gap_net.features(x).flatten(2)
    live = int(((a.amax(2) - a.amin(2)) > 0).sum())
    assert live <= 2 * 3
    assert exp.meta["forward_passes"] == 2 + live + 2  # clean, live channels, zero image
