"""Faithfulness metrics and sanity checks on tiny models with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import GapNet, images, seeded
from convlens.metrics import (
    average_drop,
    baseline_map,
    boxes_to_masks,
    cascading_randomization,
    deletion_insertion,
    evaluate_methods,
    map_similarity,
    parameter_layers,
    pointing_game,
    ranking,
)


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


def test_curves_equal_a_brute_force_loop(gap_net: nn.Module) -> None:
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
