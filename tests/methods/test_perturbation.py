"""Occlusion against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from convlens import Occlusion
from convlens.methods.perturbation import blur, window_starts
from tests.helpers.models import images
from tests.helpers.oracles import occlusion_brute_force as brute_force


@pytest.mark.parametrize(("patch", "stride"), [(4, 2), (5, 3), (3, 3), (12, 1)])
def test_occlusion_equals_brute_force(gap_net: torch.nn.Module, patch: int, stride: int) -> None:
    x = images(2)
    exp = Occlusion(patch=patch, stride=stride, fill="zero", batch_size=7)(gap_net, x)
    fill = torch.zeros_like(x)
    expected = brute_force(gap_net, x, exp.targets[:, 0], patch, stride, fill)
    torch.testing.assert_close(exp.maps[:, 0], expected.float(), atol=1e-6, rtol=1e-5)


def test_occlusion_fills_and_logit_score(gap_net: torch.nn.Module) -> None:
    x = images(2)
    t = torch.tensor([1, 3])
    mean = Occlusion(patch=4, stride=4, fill="mean")(gap_net, x, target=t)
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(mean.maps[:, 0], brute_force(gap_net, x, t, 4, 4, fill).float())
    logit = Occlusion(patch=4, stride=4, fill=0.7, score="logit")(gap_net, x, target=t)
    fill = torch.full_like(x, 0.7)
    expected = brute_force(gap_net, x, t, 4, 4, fill, logit=True)
    torch.testing.assert_close(logit.maps[:, 0], expected.float(), atol=1e-5, rtol=1e-5)
    blurred = Occlusion(patch=4, stride=4, fill="blur", blur_sigma=2.0)(gap_net, x, target=t)
    expected = brute_force(gap_net, x, t, 4, 4, blur(x, 2.0))
    torch.testing.assert_close(blurred.maps[:, 0], expected.float())


def test_occlusion_batch_size_does_not_change_the_map(gap_net: torch.nn.Module) -> None:
    x = images(3)
    a = Occlusion(patch=4, stride=2, batch_size=1)(gap_net, x, top_k=2)
    b = Occlusion(patch=4, stride=2, batch_size=1000)(gap_net, x, top_k=2)
    c = Occlusion(patch=4, stride=2, memory_mb=0.01)(gap_net, x, top_k=2)
    torch.testing.assert_close(a.maps, b.maps)
    torch.testing.assert_close(a.maps, c.maps)
    assert c.meta["perturbations_per_batch"] < b.meta["perturbations_per_batch"]


def test_window_starts_cover_every_pixel() -> None:
    assert window_starts(224, 16, 8)[-1] == 208
    assert len(window_starts(224, 16, 8)) == 27
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(5, 8, 2) == [0]


def test_blur_keeps_constants_and_smooths() -> None:
    c = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(blur(c, 2.0), c)
    spike = torch.zeros(1, 1, 9, 9)
    spike[..., 4, 4] = 1
    out = blur(spike, 1.0)
    assert out[..., 4, 4] < 1 and out.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        Occlusion(patch=0)
    with pytest.raises(ValueError):
        Occlusion(fill="purple")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Occlusion(score="loss")  # type: ignore[arg-type]
