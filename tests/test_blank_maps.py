"""Non-finite numbers and blank maps: inputs with NaN/Inf are refused up front, a model whose
outputs are NaN is named as the cause, every all-zero or non-finite map is flagged in ``meta``
and warned about, and Score-CAM stays non-blank on a network whose softmax saturates."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from convlens.cli import main
from convlens.errors import (
    BlankMapWarning,
    InputError,
    NonFiniteError,
    NonFiniteMapWarning,
)
from convlens.methods import (
    METHODS,
    RISE,
    TTA,
    IntegratedGradients,
    Occlusion,
    ScoreCAM,
    SmoothGrad,
    get_method,
)
from convlens.methods.base import Context, Method, RawResult
from convlens.models import ConvlensModel, Preprocess
from convlens.models.classes import ClassList
from tests.helpers.models import GapNet, images, seeded

# ----------------------------------------------------------------- Score-CAM on a confident net


class ConfidentNet(nn.Module):
    """1x1 conv -> ReLU -> global average pool -> linear with large weights: the clean images
    are class 0 by a margin of ~150 logits, and every masked copy (darker: the masks are in
    [0, 1]) is class 1 by ~200, so its probability of class 0 is about exp(-200), an exact 0
    in float32 (below exp(-104)) but not in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            w = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
            self.conv.weight.copy_(w.view(4, 3, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[250.0] * 4, [0.0] * 4, [-250.0] * 4]))
            self.fc.bias.copy_(torch.tensor([-600.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def score_cam_float64(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score-CAM by the paper's formula, M = ReLU(sum_c softmax(f(x * H_c))_t A_c), in float64
    (the activations are at input resolution, so H_c is A_c min-max rescaled)."""
    net64 = copy.deepcopy(net).double()
    x64 = x.double()
    with torch.no_grad():
        a = net64.relu(net64.conv(x64))
        out = torch.zeros(x.shape[0], *a.shape[-2:], dtype=torch.float64)
        for i in range(x.shape[0]):
            w = torch.zeros(a.shape[1], dtype=torch.float64)
            for c in range(a.shape[1]):
                m = a[i, c]
                m = (m - m.min()) / (m.max() - m.min() + 1e-8)
                w[c] = torch.softmax(net64(x64[i : i + 1] * m)[0], 0)[t[i]]
            out[i] = torch.relu((w[:, None, None] * a[i]).sum(0))
    return out


def masked_probs_float32(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's weights computed in float32: softmax probabilities of the masked copies."""
    with torch.no_grad():
        a = net.relu(net.conv(x))
        flat = a.flatten(2)
        lo, hi = flat.amin(2)[..., None, None], flat.amax(2)[..., None, None]
        masks = (a - lo) / (hi - lo + 1e-8)  # (B, C, H, W)
        probs = torch.stack(
            [torch.softmax(net(x * masks[:, c : c + 1]), 1) for c in range(a.shape[1])], dim=1
        )
    return probs[torch.arange(x.shape[0]), :, t]  # (B, C)


def test_scorecam_on_a_saturated_softmax_matches_the_float64_formula_up_to_scale() -> None:
    torch.manual_seed(0)
    net = ConfidentNet()
    x = 0.5 + 0.5 * torch.rand(4, 3, 16, 16)
    t = net(x).argmax(1)
    assert t.tolist() == [0, 0, 0, 0]
    # the case of the issue: in float32 every weight is exactly zero, so the paper's map is blank
    assert (masked_probs_float32(net, x, t) == 0).all()
    reference = score_cam_float64(net, x, t)
    assert (reference.flatten(1).amax(1) > 0).all()  # ... although the formula's is not

    exp = ScoreCAM()(net, x, layer="relu")  # no BlankMapWarning (warnings are errors here)
    maps = exp.maps[:, 0].double()  # the layer has the input's resolution: no upsampling
    assert not exp.meta["blank"].any()
    # equal to the formula up to a positive factor per image ...
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    ref_peak = reference.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(maps / peak, reference / ref_peak, rtol=1e-4, atol=1e-6)
    # ... and that factor is exp(meta["log_scale"])
    log_scale = exp.meta["log_scale"][:, 0].double()
    assert (log_scale < -104).all()  # below float32's smallest probability
    torch.testing.assert_close(maps * log_scale.exp().view(-1, 1, 1), reference, rtol=1e-3, atol=0)


def test_rise_on_a_saturated_softmax_matches_the_float64_formula_up_to_scale() -> None:
    torch.manual_seed(0)
    net = ConfidentNet()
    x = 0.5 + 0.5 * torch.rand(2, 3, 16, 16)
    method = RISE(masks=20, cells=3, p=0.2, batch_size=6, seed=0)  # masks keep ~20%
    exp = method(net, x)  # no BlankMapWarning
    assert exp.targets[:, 0].tolist() == [0, 0]
    masks = method.masks(
        *method.draw((16, 16), torch.Generator().manual_seed(0), x.device), (16, 16)
    )
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        masked = x.unsqueeze(1) * masks.unsqueeze(0)  # (B, N, 3, H, W)
        assert (torch.softmax(net(masked.flatten(0, 1)), 1)[:, 0] == 0).all()  # float32: blank
        p64 = torch.softmax(net64(masked.flatten(0, 1).double()), 1)[:, 0].view(2, -1)
    reference = torch.einsum("bn,nhw->bhw", p64, masks[:, 0].double()) / (20 * 0.2)
    assert (reference.flatten(1).amax(1) > 0).all()
    scale = exp.meta["log_scale"][:, 0].double().exp().view(2, 1, 1)
    torch.testing.assert_close(exp.maps[:, 0].double() * scale, reference, rtol=1e-3, atol=0)


def test_wrapped_scorecam_is_the_average_of_the_paper_s_maps() -> None:
    """SmoothGrad and TTA average inner maps that each carry their own factor exp(-L_i): the
    wrapper must bring them to one scale before adding them (``meta["log_scale"]`` then names
    the common factor), or the average is not proportional to the average of the formula's."""
    torch.manual_seed(0)
    net = ConfidentNet()
    x = 0.5 + 0.5 * torch.rand(2, 3, 16, 16)
    t = torch.zeros(2, dtype=torch.long)
    # SmoothGrad: the noisy copies of the documented recipe (sigma = noise * value range)
    smooth = SmoothGrad(ScoreCAM(), samples=3, noise=0.2, batch_size=6, seed=1)
    exp = smooth(net, x, layer="relu")
    # the noise is drawn per image: every image's i-th copy takes the i-th draw of its own
    # generator seeded with the seed, as it would alone
    eps = torch.stack(
        [torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(1))] * 2, dim=1
    )
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(1, 2, 1, 1, 1)
    noisy = x.unsqueeze(0) + eps * 0.2 * span
    reference = torch.stack([score_cam_float64(net, n, t) for n in noisy]).mean(0)
    assert exp.meta["log_scale"].shape == (2, 1)
    scale = exp.meta["log_scale"][:, 0].double().exp().view(2, 1, 1)
    torch.testing.assert_close(exp.maps[:, 0].double() * scale, reference, rtol=1e-3, atol=0)
    # TTA over two scales: the inner maps are resized back, then averaged
    exp = TTA(ScoreCAM(), flips=False, scales=(1.0, 0.5))(net, x, layer="relu")
    small = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    back = F.interpolate(
        score_cam_float64(net, small, t).unsqueeze(1), size=(16, 16), mode="bilinear"
    )[:, 0]
    reference = (score_cam_float64(net, x, t) + back) / 2
    scale = exp.meta["log_scale"][:, 0].double().exp().view(2, 1, 1)
    torch.testing.assert_close(exp.maps[:, 0].double() * scale, reference, rtol=1e-3, atol=0)


def test_scorecam_with_logit_scores_keeps_the_paper_scale(gap_net: nn.Module) -> None:
    x = images(2)
    exp = ScoreCAM(score="logit")(gap_net, x)
    assert "log_scale" not in exp.meta


class SureNet(nn.Module):
    """1x1 conv -> ReLU -> global average pool -> linear: class 0 by a logit margin of about
    30, so its probability rounds to exactly 1 in float32 (1 - p ~ 1e-13), with or without a
    zeroed window, although the margin, and 1 - p, changes with every window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[13.0, 13.0, 13.0], [0, 0, 0], [1.0, 0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_occlusion_keeps_the_drops_of_a_probability_that_rounds_to_one() -> None:
    torch.manual_seed(1)
    net = SureNet()
    x = 0.5 + 0.5 * torch.rand(2, 3, 16, 16)
    occluded = []
    for y0 in range(0, 16, 4):
        for x0 in range(0, 16, 4):
            o = x.clone()
            o[..., y0 : y0 + 4, x0 : x0 + 4] = 0
            occluded.append((y0, x0, o))
    with torch.no_grad():
        # the case: in float32 the probability of class 0 is exactly 1 everywhere, p - p' = 0
        assert (torch.softmax(net(x), 1)[:, 0] == 1).all()
        assert all((torch.softmax(net(o), 1)[:, 0] == 1).all() for _, _, o in occluded)
        # the formula in float64, one window at a time (the windows do not overlap)
        net64 = copy.deepcopy(net).double()
        p = torch.softmax(net64(x.double()), 1)[:, 0]
        reference = torch.zeros(2, 16, 16, dtype=torch.float64)
        for y0, x0, o in occluded:
            drop = p - torch.softmax(net64(o.double()), 1)[:, 0]
            reference[:, y0 : y0 + 4, x0 : x0 + 4] = drop.view(2, 1, 1)
    assert (reference > 0).all()
    for mode in ("exact", "naive"):
        exp = Occlusion(patch=4, stride=4, fill="zero", mode=mode)(net, x)  # type: ignore[arg-type]
        assert not exp.meta["blank"].any()
        torch.testing.assert_close(exp.maps[:, 0].double(), reference, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------ flags and warnings


def test_blank_maps_are_flagged_and_named(gap_net: nn.Module) -> None:
    x = images(2)
    baseline = x.clone()
    baseline[0] = 0  # image 1 equals its baseline: integrated gradients are exactly 0
    with pytest.warns(BlankMapWarning, match=r"intgrad .* image 1 \(class \d+\)") as record:
        exp = IntegratedGradients(steps=4, baseline=baseline)(gap_net, x)
    assert len(record) == 1 and "image 0" not in str(record[0].message)
    assert exp.meta["blank"].tolist() == [[False], [True]]
    assert exp.meta["nonfinite"].tolist() == [[False], [False]]
    assert exp.select(1).meta["blank"].tolist() == [[True]]
    assert exp.select(0).meta["blank"].tolist() == [[False]]


def test_maps_without_problems_carry_false_flags(gap_net: nn.Module) -> None:
    exp = get_method("saliency")(gap_net, images(3), top_k=2)
    assert exp.meta["blank"].shape == (3, 2) and not exp.meta["blank"].any()
    assert exp.meta["nonfinite"].shape == (3, 2) and not exp.meta["nonfinite"].any()


class _HalfBroken(Method):
    """A method whose map of image 1 holds a NaN: the shared result path must notice."""

    uses_gradients = False

    def compute(self, ctx: Context) -> RawResult:
        with torch.no_grad():
            logits = ctx.net(ctx.x)
        targets = ctx.targets(logits)
        maps = torch.ones(ctx.x.shape[0], targets.shape[1], 4, 4)
        maps[1, 0, 2, 2] = float("nan")
        return RawResult(maps, logits, targets)


def test_non_finite_maps_are_flagged_and_named(gap_net: nn.Module) -> None:
    with pytest.warns(NonFiniteMapWarning, match=r"_HalfBroken .* NaN .* image 1 \(class"):
        exp = _HalfBroken()(gap_net, images(2))
    assert exp.meta["nonfinite"].tolist() == [[False], [True]]
    assert exp.meta["blank"].tolist() == [[False], [False]]


# ------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_method_refuses_non_finite_inputs(gap_net: nn.Module, name: str, bad: float) -> None:
    x = images(3)
    x[2, 1, 3, 4] = bad
    with pytest.raises(InputError, match=r"input image\(s\) 2 of the batch hold NaN or infinite"):
        get_method(name)(gap_net, x)


def test_std_zero_is_refused_before_it_makes_nan_inputs() -> None:
    with pytest.raises(InputError, match="std must be positive finite numbers"):
        Preprocess(std=(0.0, 0.2, 0.2))


# ------------------------------------------------------------------------ non-finite outputs


class NaNForMarkedImages(GapNet):
    """GapNet whose logits are NaN for images whose first pixel is above 2 (finite inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        marked = (x[:, 0, 0, 0] > 2).view(-1, 1)
        return torch.where(marked, torch.full_like(out, float("nan")), out)


@pytest.fixture
def nan_net() -> nn.Module:
    return seeded(NaNForMarkedImages())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_names_images_with_non_finite_outputs(nan_net: nn.Module, name: str) -> None:
    x = images(2)
    x[1, 0, 0, 0] = 3.0
    kwargs = {"masks": 50} if name == "rise" else {}
    with pytest.raises(NonFiniteError, match=r"image\(s\) 1 of the batch \(of 2\)") as info:
        get_method(name, **kwargs)(nan_net, x)
    assert info.value.rows == [1]


def test_predict_refuses_bad_k_non_finite_inputs_and_names_non_finite_outputs(
    nan_net: nn.Module,
) -> None:
    model = ConvlensModel(nan_net, Preprocess(resize=None, crop=12), ClassList.generic(5))
    x = images(3)
    idx, probs = model.predict(x, k=2)
    assert idx.shape == probs.shape == (3, 2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="k must be a positive integer"):
            model.predict(x, k=k)  # type: ignore[arg-type]
    bad = x.clone()
    bad[1, 0, 5, 5] = float("nan")
    with pytest.raises(InputError, match=r"input image\(s\) 1 of the batch"):
        model.predict(bad)
    x[0, 0, 0, 0] = x[2, 0, 0, 0] = 3.0
    with pytest.raises(NonFiniteError, match=r"image\(s\) 0, 2 of the batch") as info:
        model.predict(x)
    assert info.value.rows == [0, 2]


def test_a_failure_caused_by_non_finite_outputs_is_reported_as_such(nan_net: nn.Module) -> None:
    class Fragile(Method):
        """Trips over the NaN logits in a check of its own, as a tolerance check would."""

        uses_gradients = False

        def compute(self, ctx: Context) -> RawResult:
            with torch.no_grad():
                logits = ctx.net(ctx.x)
            if not torch.allclose(logits, logits):
                raise RuntimeError("tolerance check failed")
            raise AssertionError("not reached")

    x = images(2)
    x[0, 0, 0, 0] = 3.0
    with pytest.raises(NonFiniteError, match=r"image\(s\) 0 of the batch") as info:
        Fragile()(nan_net, x)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_errors_of_other_causes_are_left_alone(gap_net: nn.Module) -> None:
    class Failing(Method):
        uses_gradients = False

        def compute(self, ctx: Context) -> RawResult:
            raise ValueError("a bug of its own")

    with pytest.raises(ValueError, match="a bug of its own"):
        Failing()(gap_net, images(2))
    # an input the model cannot take is still named as such
    with pytest.raises(InputError, match="the model fails on inputs of shape"):
        get_method("saliency")(nn.Sequential(nn.Flatten(), nn.Linear(5, 2)), images(1))


def test_upsampling_does_not_hide_a_blank_raw_map(gap_net: nn.Module) -> None:
    # Grad-CAM of a class with no positive evidence: zero at layer resolution and after
    # upsampling; the flag is the same either way
    x = torch.zeros(1, 3, 12, 12)
    with torch.no_grad():
        gap_net.fc.weight.fill_(-1.0)  # every channel lowers every class
        gap_net.bn.bias.fill_(1.0)  # and every channel is alive
    with pytest.warns(BlankMapWarning, match="gradcam"):
        exp = get_method("gradcam")(gap_net, x)
    assert exp.raw_maps is not None and exp.raw_maps.abs().max() == 0
    assert F.interpolate(exp.raw_maps, size=(12, 12)).abs().max() == 0
    assert exp.meta["blank"].tolist() == [[True]]


# --------------------------------------------------------------------------- the command line

BLANK_NET = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[4].weight[2] = -1.0  # every channel speaks against class 2
    return net
"""


@pytest.mark.filterwarnings("default::convlens.errors.BlankMapWarning")
def test_the_command_line_shows_a_blank_map_warning_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "net.py").write_text(BLANK_NET)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    args = ["explain", str(tmp_path / "p.png"), "--methods", "gradcam", "--target", "2"]
    args += ["--model", f"{tmp_path / 'net.py'}:build", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code in (0, None)
    lines = [x for x in capsys.readouterr().err.splitlines() if "warning" in x.lower()]
    assert lines == [
        "warning: gradcam returned all-zero maps (nothing to show) for image 0 (class 2) of the "
        "batch; flagged in meta['blank']"
    ]
