"""Faithfulness metrics and sanity checks on tiny models with known answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from convlens.accel import Acceleration
from convlens.accel import compiled as compiled_mod
from convlens.accel import folded as folded_mod
from convlens.accel.folded import fold_batchnorm, inference_copy
from convlens.accel.lean_graph import InputGradientMode
from convlens.methods import perturbation
from convlens.metrics import (
    average_drop,
    baseline_map,
    boxes_to_masks,
    cascading_randomization,
    deletion_insertion,
    deletion_insertion_many,
    evaluate_methods,
    map_similarity,
    parameter_layers,
    pointing_game,
    ranking,
    relative_range,
)
from convlens.models import wrap_model
from tests.helpers.models import GapNet, images, seeded


class RegionNet(nn.Module):
    """logit_0 = 4 * (mean of channel 0 over a fixed region) - 1, logit_1 = 0: the model uses
    exactly the pixels of the region, and positive values there support class 0."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.conv = nn.Conv2d(1, 1, 1)  # unused parameters, for sanity checks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.region).sum(dim=(1, 2)) / self.region.sum()
        return torch.stack([4 * s - 1, torch.zeros_like(s)], dim=1)


def region_setup() -> tuple[RegionNet, torch.Tensor, torch.Tensor]:
    region = torch.zeros(8, 8)
    region[2:4, 3:7] = 1  # 8 of 64 pixels
    net = RegionNet(region)
    x = torch.ones(1, 3, 8, 8)
    return net, x, region


def test_ranking_is_a_permutation_by_importance() -> None:
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.9]]])
    assert ranking(maps).tolist() == [[[3, 0], [2, 1]]]


def test_ideal_map_gives_the_ideal_curve_and_reversed_the_worst() -> None:
    net, x, region = region_setup()
    t = torch.tensor([0])
    ideal = deletion_insertion(net, x, region[None], t, steps=8, insertion_baseline="zero")
    worst = deletion_insertion(net, x, -region[None], t, steps=8, insertion_baseline="zero")
    p_full = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0]
    p_none = torch.softmax(torch.tensor([-1.0, 0.0]), 0)[0]
    # Ideal deletion: the 8 region pixels go in the first step (1/8 of 64), the score drops to
    # its floor at once and stays there; ideal insertion rises to the top at once.
    torch.testing.assert_close(ideal.deletion[0, 0], p_full)
    torch.testing.assert_close(ideal.deletion[0, 1:], p_none.expand(8))
    torch.testing.assert_close(ideal.insertion[0, 1:], p_full.expand(8))
    # The reversed map removes the region last.
    torch.testing.assert_close(worst.deletion[0, :-1], p_full.expand(8))
    assert ideal.deletion_auc < worst.deletion_auc
    assert ideal.insertion_auc > worst.insertion_auc
    expected_auc = (p_full + p_none) / 2 * (1 / 8) + p_none * (7 / 8)
    torch.testing.assert_close(ideal.deletion_auc[0], expected_auc)


@pytest.mark.parametrize("accel", [Acceleration(), Acceleration.plain()], ids=["fast", "plain"])
def test_curves_equal_a_brute_force_loop(gap_net: nn.Module, accel: Acceleration) -> None:
    x = images(2)
    maps = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1, 3])
    got = deletion_insertion(
        gap_net,
        x,
        maps,
        t,
        steps=6,
        batch_size=5,
        deletion_baseline="mean",
        insertion_baseline="zero",
        accel=accel,
    )
    for i in range(2):
        order = torch.argsort(-maps[i].flatten(), stable=True)
        for k in range(7):
            n = round(k * 144 / 6)
            chosen = torch.zeros(144, dtype=torch.bool)
            chosen[order[:n]] = True
            chosen = chosen.view(12, 12)
            mean = x[i].mean(dim=(1, 2), keepdim=True).expand(3, 12, 12)
            dele = torch.where(chosen, mean, x[i])
            ins = torch.where(chosen, x[i], torch.zeros_like(x[i]))
            with torch.no_grad():
                pd = torch.softmax(gap_net(dele[None]), 1)[0, t[i]]
                pi = torch.softmax(gap_net(ins[None]), 1)[0, t[i]]
            assert got.deletion[i, k].item() == pytest.approx(pd.item(), abs=1e-6)
            assert got.insertion[i, k].item() == pytest.approx(pi.item(), abs=1e-6)


def test_average_drop_by_hand() -> None:
    net, x, region = region_setup()
    t = torch.tensor([0])
    # A map that keeps the region (1) and zeroes the rest: the score is unchanged.
    drop, inc = average_drop(net, x, region[None], t)
    assert drop.item() == pytest.approx(0.0) and inc.item() == 0.0
    # A map that zeroes the region: the logit falls from 3 to -1.
    drop, _ = average_drop(net, x, 1 - region[None], t)
    p_full = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0]
    p_none = torch.softmax(torch.tensor([-1.0, 0.0]), 0)[0]
    assert drop.item() == pytest.approx(((p_full - p_none) / p_full).item(), rel=1e-5)


def test_pointing_game() -> None:
    maps = torch.zeros(3, 20, 20)
    maps[0, 5, 5] = 1  # inside the box
    maps[1, 5, 16] = 1  # 3 px to the right of the box edge: a hit only with tolerance
    maps[2, 18, 18] = 1  # far away
    masks = boxes_to_masks(torch.tensor([[2, 2, 13, 10]] * 3), (20, 20))
    assert masks[0, 2, 2] and masks[0, 9, 12] and not masks[0, 10, 12] and not masks[0, 2, 13]
    assert pointing_game(maps, masks, tolerance=0).tolist() == [True, False, False]
    assert pointing_game(maps, masks, tolerance=4).tolist() == [True, True, False]


def test_map_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, 32, generator=g)
    same = map_similarity(a, a * 3 + 1)
    assert same["spearman_abs"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)
    assert same["hog"] == pytest.approx(1.0)
    other = map_similarity(a, torch.rand(32, 32, generator=g))
    assert abs(other["spearman_abs"]) < 0.2 and other["ssim"] < 0.5


def test_cascading_randomization_leaves_the_model_untouched() -> None:
    net = seeded(GapNet())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = images(2, size=28)
    res = cascading_randomization(net, x, ["gradcam", "saliency"], checkpoints=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert parameter_layers(net, x) == ["conv1", "conv2", "bn", "fc"]
    assert res.steps == ["fc", "conv2", "conv1"]  # cumulative, top first
    for method in ("gradcam", "saliency"):
        for metric in ("spearman_abs", "ssim", "hog"):
            assert res.scores[method][metric].shape == (3, 2)
    assert res.ranges["saliency"].shape == (3, 2)
    assert ((res.ranges["saliency"] > 0) & (res.ranges["saliency"] <= 2)).all()
    # Everything randomised: Grad-CAM's maps no longer resemble the original ones.
    assert res.mean("gradcam", "spearman_abs")[-1] < 0.9
    fig = res.figure()
    assert len(fig.axes) == 3


def test_evaluate_table_has_methods_and_baselines(gap_net: nn.Module) -> None:
    x = images(2)
    masks = boxes_to_masks(torch.tensor([[0, 0, 6, 6], [6, 6, 12, 12]]), (12, 12))
    table = evaluate_methods(gap_net, x, ["gradcam", "saliency"], masks=masks, steps=4)
    table = evaluate_methods(gap_net, x, ["gradcam", "saliency"], masks=masks, steps=4, table=table)
    means = table.means()
    assert set(means) == {"gradcam", "saliency", "(random)", "(centre)"}
    assert table.per_image["gradcam"]["deletion_auc"].shape == (4,)
    text = table.markdown()
    assert "| gradcam |" in text and "pointing" in text
    centre = baseline_map("centre", 1, (12, 12))
    assert centre[0].flatten().argmax() in (5 * 12 + 5, 5 * 12 + 6, 6 * 12 + 5, 6 * 12 + 6)


class ConvReusedNet(nn.Module):
    """A convolution whose output feeds a BatchNorm *and* a skip connection: folding the
    BatchNorm into it would change the skip branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


def test_inference_copy_folds_batchnorm_and_keeps_the_logits(gap_net: nn.Module) -> None:
    x = images(3)
    gap_net.train()  # the copy is in eval mode; the user's model keeps its mode
    before = {k: v.clone() for k, v in gap_net.state_dict().items()}
    fast = inference_copy(gap_net, x)
    assert gap_net.training and isinstance(gap_net.bn, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in gap_net.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    # Independent computation: conv2 then BatchNorm's eval formula, by hand.
    bn = gap_net.bn
    h = gap_net.conv2(gap_net.relu1(gap_net.conv1(x.clone())))
    h = (h - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    h = torch.relu(h * bn.weight[:, None, None] + bn.bias[:, None, None])
    expected = gap_net.fc(h.mean(dim=(2, 3)))
    with torch.no_grad():
        got = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)


def test_inference_copy_refuses_to_fold_a_reused_convolution() -> None:
    net = seeded(ConvReusedNet())
    x = images(2)
    assert fold_batchnorm(seeded(ConvReusedNet()), x) == 1  # traced as a pair...
    fast = inference_copy(net, x)  # ...but the check on the logits rejects the fold
    assert isinstance(fast.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_copy_refuses_a_wrong_fold_in_16_bit(dtype: torch.dtype) -> None:
    """1000 eps of bfloat16 is 8: the check runs in float32 instead."""
    net = seeded(ConvReusedNet(), dtype=dtype)
    x = images(2).to(dtype)
    fast = inference_copy(net, x)
    assert isinstance(fast.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)
    good = seeded(GapNet(), dtype=dtype)  # a right fold still happens
    fast = inference_copy(good, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        ref = good(x).float()
        got = fast(x.contiguous(memory_format=torch.channels_last)).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.slow
def test_inference_copy_of_the_default_model() -> None:
    import convlens

    model = convlens.load_model("lite0")
    x = images(2, size=224).float()
    fast = inference_copy(model, x)
    folded = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not folded  # all 49 BatchNorm layers follow a convolution
    with torch.no_grad():
        ref = model.net(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_many_maps_share_end_points_and_equal_one_by_one(gap_net: nn.Module) -> None:
    x = images(3)
    g = torch.Generator().manual_seed(1)
    maps = {name: torch.rand(3, 12, 12, generator=g, dtype=torch.float64) for name in "abc"}
    t = torch.tensor([0, 2, 4])
    many = deletion_insertion_many(gap_net, x, maps, t, steps=5, batch_size=7)
    for name, m in maps.items():
        one = deletion_insertion(gap_net, x, m, t, steps=5, accel=Acceleration.plain())
        torch.testing.assert_close(many[name].deletion, one.deletion, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(many[name].insertion, one.insertion, rtol=1e-6, atol=1e-9)
    # End points do not depend on the map: the image, and the baseline.
    with torch.no_grad():
        p = torch.softmax(gap_net(x), 1)[torch.arange(3), t].float()
        zero = torch.softmax(gap_net(torch.zeros_like(x)), 1)[torch.arange(3), t].float()
    torch.testing.assert_close(many["a"].deletion[:, 0], p)
    torch.testing.assert_close(many["b"].insertion[:, -1], p)
    torch.testing.assert_close(many["c"].deletion[:, -1], zero)


def test_curves_without_a_copyable_model() -> None:
    class Uncopyable(GapNet):
        def __deepcopy__(self, memo: dict) -> None:
            raise TypeError("cannot copy")

    net = seeded(Uncopyable())
    x = images(2)
    maps = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 2])
    net.train()
    got = deletion_insertion(net, x, maps, t, steps=4)  # falls back to the model itself
    assert net.training
    ref = deletion_insertion(seeded(GapNet()), x, maps, t, steps=4, accel=Acceleration.plain())
    torch.testing.assert_close(got.deletion, ref.deletion)


def test_evaluate_without_methods_leaves_a_training_model_alone(gap_net: nn.Module) -> None:
    x = images(4)
    gap_net.train()
    before = {k: v.clone() for k, v in gap_net.state_dict().items()}
    table = evaluate_methods(gap_net, x, [], steps=3)
    assert gap_net.training
    assert all(torch.equal(before[k], v) for k, v in gap_net.state_dict().items())
    gap_net.eval()
    with torch.no_grad():
        expected_targets = gap_net(x).argmax(1)
    ref = deletion_insertion(
        gap_net,
        x,
        baseline_map("centre", 4, (12, 12)).double(),
        expected_targets,
        steps=3,
        insertion_baseline="blur",
    )
    torch.testing.assert_close(table.per_image["(centre)"]["deletion_auc"], ref.deletion_auc)


def test_bad_maps_and_steps_are_clear_errors(gap_net: nn.Module) -> None:
    x = images(2)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="maps must be"):
        deletion_insertion(gap_net, x, torch.rand(2, 11, 12), t)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(gap_net, x, torch.rand(2, 12, 12), t, steps=0)


def test_bf16_autocast_is_applied_and_close() -> None:
    net = seeded(GapNet(), dtype=torch.float32)
    x = images(2).float()
    maps = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1])
    exact = deletion_insertion(net, x, maps, t, steps=4)
    bf16 = deletion_insertion(net, x, maps, t, steps=4, autocast=torch.bfloat16)
    assert not torch.equal(exact.deletion, bf16.deletion)  # rounded to bf16 somewhere
    torch.testing.assert_close(bf16.deletion, exact.deletion, atol=0.05, rtol=0)


def test_relative_range() -> None:
    maps = torch.zeros(3, 2, 2)
    maps[0] = torch.tensor([[5.0, 5.01], [5.0, 5.0]])  # a ripple on a constant
    maps[1] = torch.tensor([[-1.0, 0.0], [0.5, 0.0]])
    assert relative_range(maps).tolist() == pytest.approx(
        [0.01 / 5.01, 1.5, 0.0], rel=1e-4
    )  # float32 input


def _every_metric(
    model: nn.Module | Any, accel: Acceleration | None, **extra: Any
) -> dict[str, Any]:
    """Each metric that runs forward passes, once, with ``accel`` (float64 inputs)."""
    x = images(2, size=16)
    g = torch.Generator().manual_seed(3)
    maps = {n: torch.rand(2, 16, 16, generator=g, dtype=torch.float64) for n in "ab"}
    t = torch.tensor([1, 3])
    curves = deletion_insertion_many(model, x, maps, t, steps=4, batch_size=5, accel=accel, **extra)
    one = deletion_insertion(model, x, maps["a"], t, steps=3, accel=accel, **extra)
    drop = average_drop(model, x, maps["b"], t, accel=accel)
    table = evaluate_methods(
        model, x, ["gradcam", "saliency"], steps=3, accel=accel, **extra
    ).per_image
    sanity = cascading_randomization(model, x, ["saliency"], checkpoints=2, accel=accel)
    return {
        "curves": {n: (c.deletion, c.insertion) for n, c in curves.items()},
        "one": (one.deletion, one.insertion),
        "drop": drop,
        "table": table,
        "sanity": (sanity.scores, sanity.ranges),
    }


def _refuse(what: list[str]) -> Callable[..., Any]:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"an accelerator ran on the plain path of the metrics: {what}")

    return refuse


def test_the_metrics_plain_path_uses_no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """``accel=Acceleration.plain()`` (or a wrapper whose ``accel`` is plain) is the one switch
    of every metric: no folded copy, no compiled forward, no lean graph, no incremental engine,
    no thread change; the older ``compile=True`` does not turn compilation back on."""
    for name in ("_make_copy",):
        monkeypatch.setattr(folded_mod, name, _refuse([name]))
    monkeypatch.setattr(compiled_mod, "FixedBatchForward", _refuse(["compile"]))
    monkeypatch.setattr(InputGradientMode, "__enter__", _refuse(["lean graph"]))
    monkeypatch.setattr(perturbation, "IncrementalEngine", _refuse(["incremental"]))
    monkeypatch.setattr(torch, "set_num_threads", _refuse(["threads"]))
    net = seeded(GapNet())
    _every_metric(net, Acceleration.plain())
    model = wrap_model(seeded(GapNet()))
    model.accel = Acceleration.plain()
    _every_metric(model, None, compile=True)


def test_the_metrics_default_uses_the_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (no ``accel``) makes folded copies, so the equality below compares two
    different computations; a wrapper's ``accel`` is the default of a call."""
    made: list[int] = []
    original = folded_mod._make_copy

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(folded_mod, "_make_copy", counting)
    x, t = images(2), torch.tensor([0, 1])
    maps = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(4))
    deletion_insertion(seeded(GapNet()), x, maps, t, steps=2)
    assert made
    made.clear()
    model = wrap_model(seeded(GapNet()))
    model.accel = Acceleration.plain()
    deletion_insertion(model, x, maps, t, steps=2)
    average_drop(model, x, maps, t)
    assert not made
    deletion_insertion(model, x, maps, t, steps=2, accel=Acceleration())  # the call's wins
    assert made


@pytest.mark.parametrize(
    "accel",
    [
        Acceleration(),
        Acceleration.plain().but(fold_batchnorm=True),
        Acceleration.plain().but(channels_last=True),
        Acceleration().but(threads=1),
    ],
    ids=["default", "only fold", "only channels_last", "fixed threads"],
)
def test_every_metric_equals_its_plain_path(accel: Acceleration) -> None:
    """In float64 the accelerators change only the rounding: every metric equals the plain
    path to 1e-9 (compiled scoring: tests/accel/test_compiled.py)."""
    net = seeded(GapNet())
    got = _every_metric(net, accel)
    ref = _every_metric(net, Acceleration.plain())
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9, equal_nan=True)


def test_a_bad_accel_is_one_clear_error(gap_net: nn.Module) -> None:
    from convlens.errors import InputError

    x, t = images(2), torch.tensor([0, 1])
    with pytest.raises(InputError, match="Acceleration"):
        deletion_insertion(gap_net, x, torch.rand(2, 12, 12), t, accel="plain")  # type: ignore[arg-type]
