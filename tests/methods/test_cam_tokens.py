"""The CAM family on transformer token layers: Grad-CAM against autograd by hand, every CAM
method against itself on the same layer viewed as a (B, C, h, w) map by hand, the layer and
layout recorded; timm ViT / DeiT / Swin and torchvision's VisionTransformer when installed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from convlens.errors import LayerError
from convlens.methods import GradCAM, get_method
from convlens.result import Explanation
from tests.helpers import zoo
from tests.helpers.models import ChannelsLastNet, TokenViT, images, seeded

CAM_METHODS = [
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "layercam",
    "eigencam",
    "scorecam",
    "ablationcam",
]


def _to_grid(t: torch.Tensor, kind: str, prefix: int, h: int, w: int) -> torch.Tensor:
    """A layer output as (B, C, h, w), by reshape (a different path from the library's)."""
    if kind == "nhwc":
        return t.permute(0, 3, 1, 2)
    b, _, c = t.shape
    return t[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def _output_and_grad(
    net: nn.Module, module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's output, d(top-1 logit)/d(output) by autograd, and the top-1 classes."""
    kept: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        kept["a"] = out.detach().requires_grad_(True)
        return kept["a"]

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = net(x)
            t = logits.argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), kept["a"])
    finally:
        handle.remove()
    return kept["a"].detach(), g, t


def _gradcam_by_hand(
    net: nn.Module, module: nn.Module, x: torch.Tensor, kind: str, prefix: int, grid: tuple
) -> torch.Tensor:
    """Grad-CAM: gradients of the token tensor, prefix dropped, reshaped to the grid, channel
    weights = spatial mean, weighted sum over channels, ReLU. (B, h, w)."""
    a, g, _ = _output_and_grad(net, module, x)
    a, g = _to_grid(a, kind, prefix, *grid), _to_grid(g, kind, prefix, *grid)
    alpha = g.mean(dim=(2, 3))
    return torch.relu((alpha[:, :, None, None] * a).sum(1))


def _raw(e: Explanation) -> torch.Tensor:
    return e.maps if e.raw_maps is None else e.raw_maps


@pytest.mark.parametrize(
    ("prefix", "pool", "layer"),
    [
        (1, "cls", None),
        (3, "cls", None),
        (1, "mean", None),
        (2, "cls", "blocks.0.norm2"),
        (1, "cls", "blocks.1.attn.qkv"),
    ],
)
def test_gradcam_on_tokens_equals_autograd_by_hand(
    prefix: int, pool: str, layer: str | None
) -> None:
    net = seeded(TokenViT(prefix=prefix, pool=pool))
    x = images(3, 16)
    e = GradCAM()(net, x, layer=layer)
    expected_layer = layer or ("blocks.1.norm1" if pool == "cls" else "norm")
    assert e.layer == expected_layer
    assert e.meta["layout"] == {"kind": "tokens", "grid": [4, 4], "prefix": prefix}
    want = _gradcam_by_hand(net, net.get_submodule(expected_layer), x, "tokens", prefix, (4, 4))
    assert want.abs().sum() > 0
    torch.testing.assert_close(_raw(e)[:, 0], want.float(), rtol=1e-5, atol=1e-6)


def test_gradcam_on_channels_last_equals_autograd_by_hand() -> None:
    net = seeded(ChannelsLastNet())
    x = images(2, 16)
    e = GradCAM()(net, x)
    assert e.layer == "norm" and e.meta["layout"] == {"kind": "nhwc", "grid": [4, 4], "prefix": 0}
    want = _gradcam_by_hand(net, net.norm, x, "nhwc", 0, (4, 4))
    torch.testing.assert_close(_raw(e)[:, 0], want.float(), rtol=1e-5, atol=1e-6)


class _GridView(nn.Module):
    """``net`` with one token layer's patch tokens passed, by hand, through a (B, C, h, w)
    ``grid`` module and back: every CAM method on ``grid`` (the convolutional path) must equal
    the same method on the token layer of ``net``."""

    def __init__(self, net: nn.Module, layer: str, kind: str, prefix: int, hw: tuple) -> None:
        super().__init__()
        self.net, self.layer, self.kind, self.prefix, self.hw = net, layer, kind, prefix, hw
        self.grid = nn.Identity()

    def _view(self, _m: nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        h, w = self.hw
        maps = self.grid(_to_grid(out, self.kind, self.prefix, h, w))
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1)
        b, c = maps.shape[:2]
        tokens = maps.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return torch.cat([out[:, : self.prefix].expand(b, -1, -1), tokens], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handle = self.net.get_submodule(self.layer).register_forward_hook(self._view)
        try:
            return self.net(x)
        finally:
            handle.remove()


_CASES: dict[str, Callable[[], tuple[nn.Module, str, str, int]]] = {
    "vit-cls": lambda: (seeded(TokenViT(prefix=2)), "blocks.1.norm1", "tokens", 2),
    "vit-mean": lambda: (seeded(TokenViT(pool="mean")), "norm", "tokens", 1),
    "channels-last": lambda: (seeded(ChannelsLastNet()), "norm", "nhwc", 0),
}


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("method", [*CAM_METHODS, "ablationcam-rerun", "cam"])
@pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning")
def test_every_cam_method_on_tokens_equals_the_same_layer_as_a_map(case: str, method: str) -> None:
    net, layer, kind, prefix = _CASES[case]()
    x = images(2, 16)
    view = _GridView(net, layer, kind, prefix, (4, 4))
    options = {"exact": "never"} if method == "ablationcam-rerun" else {}
    make = lambda: get_method(method.removesuffix("-rerun"), **options)  # noqa: E731
    if method == "cam":
        if case == "vit-cls":
            with pytest.raises(Exception, match="global average"):
                make()(net, x)
            return
        got, want = make()(net, x), make()(view, x)
        assert want.layer == "grid"
    else:
        got, want = make()(net, x, layer=layer), make()(view, x, layer="grid")
    assert got.layer == layer
    assert got.meta["layout"]["kind"] == kind and "layout" not in want.meta
    assert got.maps.shape == want.maps.shape == (2, 1, 16, 16)
    torch.testing.assert_close(_raw(got), _raw(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-5, atol=1e-6)


def test_default_layer_is_recorded_and_cnn_results_carry_no_layout(gap_net: nn.Module) -> None:
    e = get_method("layercam")(seeded(TokenViT()), images(1, 16))
    assert e.layer == "blocks.1.norm1" and e.meta["layout"]["prefix"] == 1
    assert "layout" not in GradCAM()(gap_net, images(1)).meta


def test_non_map_layer_is_refused_in_one_line() -> None:
    net = seeded(TokenViT())
    with pytest.raises(LayerError, match="feature map") as info:
        GradCAM()(net, images(1, 16), layer="head")
    assert "\n" not in str(info.value)


# --- timm and torchvision models (benchmark environment) ------------------------------------


def _timm(name: str, **kw: object) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kw).double().eval()


_ZOO: dict[str, Callable[[], tuple[nn.Module, int, str, str, int, tuple[int, int]]]] = {
    # model, input size, expected default layer, layout kind, prefix, grid
    "timm-vit": lambda: (
        _timm("vit_tiny_patch16_224", img_size=64, depth=2),
        64,
        "blocks.1.norm1",
        "tokens",
        1,
        (4, 4),
    ),
    "timm-deit-distilled": lambda: (
        _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=2),
        64,
        "blocks.1.norm1",
        "tokens",
        2,
        (4, 4),
    ),
    "timm-swin": lambda: (
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=2,
            depths=(1, 1, 1, 1),
            embed_dim=8,
            num_heads=(1, 1, 1, 1),
        ),
        64,
        "norm",
        "nhwc",
        0,
        (2, 2),
    ),
    "torchvision-vit": lambda: _torchvision_vit(),
}


def _torchvision_vit() -> tuple[nn.Module, int, str, str, int, tuple[int, int]]:
    torch.manual_seed(0)
    net = zoo.torchvision_vit()
    nn.init.normal_(net.heads.head.weight)  # torchvision initialises the head to zero
    return net.double().eval(), 32, "encoder.layers.encoder_layer_1.ln_1", "tokens", 1, (4, 4)


@pytest.mark.parametrize("zoo", list(_ZOO))
def test_zoo_gradcam_default_layer_equals_autograd_by_hand(zoo: str) -> None:
    net, size, layer, kind, prefix, grid = _ZOO[zoo]()
    x = images(2, size)
    e = GradCAM()(net, x)
    assert e.layer == layer
    assert e.meta["layout"] == {"kind": kind, "grid": list(grid), "prefix": prefix}
    want = _gradcam_by_hand(net, net.get_submodule(layer), x, kind, prefix, grid)
    assert want.abs().sum() > 0
    torch.testing.assert_close(_raw(e)[:, 0], want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zoo", list(_ZOO))
@pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning")
def test_zoo_every_cam_method_runs_on_the_token_layer(zoo: str) -> None:
    net, size, layer, kind, prefix, grid = _ZOO[zoo]()
    x = images(1, size)
    for method in CAM_METHODS:
        options = {"top_channels": 8} if method == "scorecam" else {}
        e = get_method(method, **options)(net, x)
        assert e.layer == layer, method
        assert e.meta["layout"] == {"kind": kind, "grid": list(grid), "prefix": prefix}
        assert _raw(e).shape == (1, 1, *grid), method
        assert torch.isfinite(e.maps).all(), method
    if kind == "nhwc":  # Swin pools over all tokens: CAM applies
        assert get_method("cam")(net, x).layer == layer


@pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning")
def test_model_left_as_found_after_cam_on_tokens() -> None:
    net = seeded(TokenViT(prefix=2)).train()
    flags = [m.training for m in net.modules()]
    hooks_before = sum(len(m._forward_hooks) for m in net.modules())
    for method in CAM_METHODS:
        get_method(method)(net, images(1, 16))
    assert [m.training for m in net.modules()] == flags
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert sum(len(m._forward_hooks) for m in net.modules()) == hooks_before
