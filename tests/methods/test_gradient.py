"""Saliency, gradient x input and SmoothGrad against autograd and hand-worked values."""

from __future__ import annotations

import pytest
import torch

from convlens import GradCAM, GradientXInput, Saliency, SmoothGrad
from tests.helpers.models import images
from tests.helpers.oracles import input_gradient


def test_saliency_equals_autograd_per_image(gap_net: torch.nn.Module) -> None:
    x = images(3)
    exp = Saliency()(gap_net, x)
    with torch.no_grad():
        top = gap_net(x).argmax(1)
    assert exp.targets[:, 0].tolist() == top.tolist()
    for i in range(3):
        g = input_gradient(gap_net, x[i : i + 1], int(top[i]))
        torch.testing.assert_close(exp.maps[i, 0], g.abs().amax(0).float())


def test_saliency_on_linear_model_is_the_weight_row(linear_net: torch.nn.Module) -> None:
    x = images(2, size=6)
    exp = Saliency()(linear_net, x, target=[1, 2])
    w = linear_net.fc.weight.detach().view(3, 3, 6, 6)
    torch.testing.assert_close(exp.maps[0, 0], w[1].abs().amax(0).float())
    torch.testing.assert_close(exp.maps[1, 0], w[2].abs().amax(0).float())
    gxi = GradientXInput()(linear_net, x, target=1)
    torch.testing.assert_close(gxi.maps[:, 0], (w[1] * x).sum(1).float())


def test_gradient_x_input_sums_to_score_on_linear_model(linear_net: torch.nn.Module) -> None:
    x = images(2, size=6)
    exp = GradientXInput()(linear_net, x, target=0)
    bias = linear_net.fc.bias.detach()[0]
    torch.testing.assert_close(exp.maps.sum(dim=(1, 2, 3)), exp.scores[:, 0] - float(bias))


def test_top_k_gives_one_map_per_class(gap_net: torch.nn.Module) -> None:
    x = images(2)
    exp = Saliency()(gap_net, x, top_k=3)
    assert exp.maps.shape == (2, 3, 12, 12)
    order = gap_net(x).topk(3, dim=1).indices
    assert torch.equal(exp.targets, order)
    for k in range(3):
        g = input_gradient(gap_net, x[1:2], int(order[1, k]))
        torch.testing.assert_close(exp.maps[1, k], g.abs().amax(0).float())


def test_smoothgrad_without_noise_equals_inner(gap_net: torch.nn.Module) -> None:
    x = images(2)
    plain = Saliency()(gap_net, x)
    smooth = SmoothGrad(Saliency(), samples=3, noise=0.0)(gap_net, x)
    torch.testing.assert_close(smooth.maps, plain.maps)


def test_smoothgrad_is_the_mean_over_noisy_copies(gap_net: torch.nn.Module) -> None:
    x = images(2)
    smooth = SmoothGrad(samples=4, noise=0.2, batch_size=3, seed=7)(gap_net, x)
    # Independent loop: each image's noise from its own generator seeded with the seed, one
    # draw of one image's shape per noisy copy.
    t = smooth.targets[:, 0]
    total = torch.zeros(2, 12, 12, dtype=torch.float64)
    for i in range(2):
        gen = torch.Generator().manual_seed(7)
        span = x[i].max() - x[i].min()
        for _ in range(4):
            eps = torch.randn(x.shape[1:], generator=gen, dtype=x.dtype)
            noisy = (x[i] + 0.2 * span * eps).unsqueeze(0)
            total[i] += input_gradient(gap_net, noisy, int(t[i])).abs().amax(0)
    torch.testing.assert_close(smooth.maps[:, 0], (total / 4).float())


def test_smoothgrad_is_deterministic_and_seed_dependent(gap_net: torch.nn.Module) -> None:
    x = images(1)
    a = SmoothGrad(samples=3, seed=1)(gap_net, x).maps
    b = SmoothGrad(samples=3, seed=1)(gap_net, x).maps
    c = SmoothGrad(samples=3, seed=2)(gap_net, x).maps
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("aggregate", ["mean", "var"])
def test_smoothgrad_map_of_an_image_does_not_depend_on_its_batch(
    gap_net: torch.nn.Module, aggregate: str
) -> None:
    """Seeded per image: image i's map is the same alone, in a batch (any position) and with
    any batch_size (how the noisy copies are cut into passes)."""
    x = images(4, size=11)  # 363 values per image: not a multiple of torch's 16-value blocks

    def maps(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        method = SmoothGrad(
            samples=5, noise=0.2, batch_size=batch_size, seed=3, aggregate=aggregate
        )
        return method(gap_net, batch).maps

    together = maps(x, 4)
    for i in range(4):
        for batch_size in (1, 3, 8):
            torch.testing.assert_close(maps(x[i : i + 1], batch_size)[0], together[i])
    reordered = maps(x.flip(0), 6)
    torch.testing.assert_close(reordered.flip(0), together)
    # and the seed still matters
    assert not torch.equal(together, SmoothGrad(samples=5, noise=0.2, seed=4)(gap_net, x).maps)


def test_smoothgrad_wraps_gradcam(gap_net: torch.nn.Module) -> None:
    x = images(2)
    exp = SmoothGrad(GradCAM(), samples=2, noise=0.0)(gap_net, x)
    torch.testing.assert_close(exp.maps, GradCAM()(gap_net, x).maps)
    assert exp.layer == "relu2"


def test_smoothgrad_rejects_zero_samples() -> None:
    with pytest.raises(ValueError):
        SmoothGrad(samples=0)


@pytest.mark.parametrize("name", ["saliency", "gradcam", "occlusion", "intgrad"])
def test_inputs_the_model_cannot_take_give_a_clear_error(name: str) -> None:
    """A network with a fixed-size head (or kernels larger than the input) fed the wrong image
    size fails inside torch; the method says so in one line instead."""
    from convlens import get_method
    from convlens.errors import InputError

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 3),
    ).eval()
    kw = {"patch": 2, "stride": 2} if name == "occlusion" else {}
    get_method(name, **kw)(net, torch.rand(1, 3, 8, 8))  # the size it takes
    with pytest.raises(InputError, match=r"fails on inputs of shape \(1, 3, 9, 9\)"):
        get_method(name, **kw)(net, torch.rand(1, 3, 9, 9))
