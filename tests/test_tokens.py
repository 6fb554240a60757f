"""Token layouts (convlens.tokens): token sequences and channels-last outputs placed on the
patch grid, found by observation; the default CAM layer of a transformer; `convlens layers`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.architecture import default_layer, find_gap_head
from convlens.errors import LayerError
from convlens.layers import format_layer_table, layer_table
from convlens.tokens import (
    TokenLayout,
    channel_count,
    detect_layout,
    layer_layout,
    maps_of,
    patch_grid,
)
from tests.helpers.models import ChannelsLastNet, GapNet, TokenViT, images, seeded


def _by_hand(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, h, w), token ``prefix + i w + j`` at row i, column j, one by one."""
    b, _, c = tokens.shape
    out = torch.empty(b, c, h, w, dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j, :]
    return out


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_tokens_to_maps_places_each_patch_and_back(prefix: int) -> None:
    tokens = torch.randn(2, prefix + 12, 7)
    layout = TokenLayout("tokens", (3, 4), prefix)
    maps = layout.to_maps(tokens)
    assert torch.equal(maps, _by_hand(tokens, prefix, 3, 4))
    assert torch.equal(layout.from_maps(maps, tokens), tokens)
    # Extra leading dimensions (per-target gradients) are kept.
    stacked = torch.stack([tokens, 2 * tokens], dim=1)
    assert torch.equal(layout.to_maps(stacked)[:, 1], 2 * maps)


def test_channels_last_to_maps_and_back() -> None:
    x = torch.randn(2, 3, 5, 4)
    layout = TokenLayout("nhwc", (3, 5))
    assert torch.equal(layout.to_maps(x), x.permute(0, 3, 1, 2))
    assert torch.equal(layout.from_maps(layout.to_maps(x), x), x)
    nchw = TokenLayout("nchw", (5, 4))
    assert nchw.to_maps(x) is x


@pytest.mark.parametrize(
    ("n", "grid", "prefix"),
    [(196, (14, 14), 0), (197, (14, 14), 1), (198, (14, 14), 2), (201, (14, 14), 5)],
)
def test_prefix_tokens_found_from_the_patch_grid(
    n: int, grid: tuple[int, int], prefix: int
) -> None:
    layout = detect_layout((1, n, 192), (224, 224), base_grid=(14, 14))
    assert layout == TokenLayout("tokens", grid, prefix)
    assert layout.describe((1, n, 192)).startswith(f"tokens {n}x192 -> 14x14 grid")


def test_merged_grids_and_grids_without_a_patch_convolution() -> None:
    # Swin-style stages: the patch grid halved by patch merging.
    assert detect_layout((1, 49, 768), (224, 224), base_grid=(56, 56)).grid == (7, 7)
    assert detect_layout((1, 784, 192), (224, 224), base_grid=(56, 56)).grid == (28, 28)
    # No grid observed: strides dividing the input.
    assert detect_layout((1, 197, 8), (224, 224)) == TokenLayout("tokens", (14, 14), 1)
    assert detect_layout((1, 17, 8), (16, 16)) == TokenLayout("tokens", (4, 4), 1)


def test_unplaceable_and_ambiguous_token_counts_are_refused_in_one_line() -> None:
    with pytest.raises(LayerError, match="do not lie on a grid") as info:
        detect_layout((1, 150, 8), (224, 224), base_grid=(14, 14), name="blocks.3")
    assert "\n" not in str(info.value) and "blocks.3" in str(info.value)
    # Prefix tokens are fewer than the grid's: 5 tokens on halvings of 4x4 are 2x2 + 1 only.
    assert detect_layout((1, 5, 8), (16, 16), base_grid=(4, 4)).grid == (2, 2)
    # 17 tokens on halvings of 7x7: 4x4 + 1 or 3x3 + 8.
    with pytest.raises(LayerError, match="several grids") as info:
        detect_layout((1, 17, 8), (28, 28), base_grid=(7, 7))
    assert "\n" not in str(info.value) and "4x4 + 1 prefix" in str(info.value)
    # The prefix count the model states decides between grids that fit.
    assert detect_layout((1, 17, 8), (28, 28), base_grid=(7, 7), prefix=1).grid == (4, 4)
    with pytest.raises(LayerError, match="feature map"):
        detect_layout((1, 10), (16, 16))


def test_four_dimensional_outputs() -> None:
    # The channel count seen at the layer decides.
    assert detect_layout((1, 7, 7, 768), (224, 224), channels=768).kind == "nhwc"
    assert detect_layout((1, 768, 7, 7), (224, 224), channels=768).kind == "nchw"
    assert detect_layout((1, 7, 7, 7), (224, 224), channels=7).kind == "nchw"
    # Without one: channels-last only when dims 1-2 form a grid and dims 2-3 do not.
    assert detect_layout((1, 7, 7, 768), (224, 224)) == TokenLayout("nhwc", (7, 7))
    assert detect_layout((1, 64, 56, 56), (224, 224)) == TokenLayout("nchw", (56, 56))
    assert detect_layout((1, 3, 197, 64), (224, 224)).kind == "nchw"  # attention heads
    assert detect_layout((1, 64, 147, 147), (299, 299)).kind == "nchw"  # odd sizes stay


def test_channel_count_from_parameters() -> None:
    assert channel_count(nn.Conv2d(3, 5, 1)) == 5
    assert channel_count(nn.Linear(3, 6)) == 6
    assert channel_count(nn.LayerNorm(4)) == 4
    assert channel_count(nn.Sequential(nn.Linear(3, 9), nn.GELU())) == 9
    assert channel_count(nn.GELU()) is None


def test_patch_grid_observed_from_the_patch_embedding() -> None:
    net = seeded(TokenViT(size=16, patch=4))
    assert patch_grid(net, images(1, 16)) == (4, 4)
    assert patch_grid(seeded(GapNet()), images(1)) is None  # a CNN has no token sequence


class _LinearPatches(nn.Module):
    """Patches cut with unfold and embedded by a Linear layer: no convolution to observe."""

    def __init__(self, patch_size: int | tuple[int, int] = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed = nn.Linear(3 * 16, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = nn.functional.unfold(x, 4, stride=4).transpose(1, 2)
        return self.head(self.norm(self.embed(t)).mean(1))


def test_patch_grid_falls_back_to_the_stated_patch_size() -> None:
    net = seeded(_LinearPatches())
    assert patch_grid(net, images(1, 16)) == (4, 4)
    net = seeded(_LinearPatches())
    net.norm.patch_size = 2  # type: ignore[assignment]
    with pytest.raises(LayerError, match="several patch sizes"):
        patch_grid(net, images(1, 16))


def test_layer_layout_of_a_captured_output() -> None:
    net = seeded(TokenViT(prefix=2))
    x = images(2, 16)
    out = net.blocks[1].norm1(torch.randn(2, 18, 8, dtype=torch.float64))
    assert layer_layout(net, net.blocks[1].norm1, out, x) == TokenLayout("tokens", (4, 4), 2)
    maps, layout = maps_of(net, net.blocks[1].norm1, out, x)
    assert layout.prefix == 2 and torch.equal(maps, _by_hand(out, 2, 4, 4))
    with pytest.raises(LayerError, match="first dimension is not"):
        layer_layout(net, net.blocks[1].norm1, out[:1].expand(3, -1, -1), x, "blocks.1.norm1")


@pytest.mark.parametrize(("prefix", "pool"), [(1, "cls"), (3, "cls"), (1, "mean")])
def test_default_layer_of_a_vit_by_observation(prefix: int, pool: str) -> None:
    net = seeded(TokenViT(prefix=prefix, pool=pool))
    layer = default_layer(net, images(1, 16))
    if pool == "cls":
        # Only the last attention mixes patch tokens into the class token: the norm before it.
        assert str(layer) == "blocks.1.norm1"
    else:
        # Mean over the patch tokens feeds the head: the final norm, a GAP head over tokens.
        assert str(layer) == "norm"
        head = find_gap_head(net, images(1, 16))
        assert head.layout == TokenLayout("tokens", (4, 4), prefix)


class _PooledNormViT(TokenViT):
    """Mean of the patch tokens kept as one token (B, 1, C) and normalised before the head."""

    def __init__(self) -> None:
        super().__init__(pool="mean")
        self.pool_norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix_tokens.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(self.pool_norm(t[:, 1:].mean(1, keepdim=True))[:, 0])


def test_default_layer_skips_pooled_single_tokens() -> None:
    net = seeded(_PooledNormViT())
    assert str(default_layer(net, images(1, 16))) == "norm"


def test_default_layer_of_a_channels_last_model() -> None:
    net = seeded(ChannelsLastNet())
    assert str(default_layer(net, images(1, 16))) == "norm"
    assert find_gap_head(net, images(1, 16)).layout == TokenLayout("nhwc", (4, 4))


def test_default_layer_of_cnns_is_unchanged(gap_net: nn.Module) -> None:
    assert str(default_layer(gap_net, images(1))) == "relu2"


def test_layer_table_shows_token_grids() -> None:
    text = format_layer_table(layer_table(seeded(TokenViT(prefix=2)), images(1, 16)))
    norm1 = next(line for line in text.splitlines() if line.strip().startswith("blocks.1.norm1"))
    assert "1x18x8 [tokens 18x8 -> 4x4 grid + 2 prefix]" in norm1
    embed = next(line for line in text.splitlines() if line.startswith("patch_embed"))
    assert "[" not in embed  # a convolutional map is shown as before
    text = format_layer_table(layer_table(seeded(ChannelsLastNet()), images(1, 16)))
    assert "[channels-last 4x4x6 -> 4x4 grid]" in text


class _ConvTokens(nn.Module):
    """Patch-embedding convolution -> tokens -> LayerNorm -> mean -> head (any grid)."""

    def __init__(self, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 6, patch, stride=patch)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_patch_grid_cache_follows_the_network_and_the_input() -> None:
    from convlens.tokens import clear_cache

    net = seeded(_ConvTokens())
    runs = []
    net.register_forward_pre_hook(lambda _m, _a: runs.append(1))
    x = images(1, 16)
    assert patch_grid(net, x) == (4, 4) and patch_grid(net, x) == (4, 4)
    assert len(runs) == 1  # the second answer is cached
    assert patch_grid(net, images(1, 32)) == (8, 8)  # another input size: observed again
    assert len(runs) == 2

    net.patch_embed = nn.Conv2d(3, 6, 2, stride=2).double()  # a module replaced
    assert patch_grid(net, x) == (8, 8)
    net.patch_embed.stride = (4, 4)  # a setting changed in place
    assert patch_grid(net, x) == (4, 4)
    with torch.no_grad():
        net.patch_embed.weight.mul_(2.0)  # weights changed in place: observed again
    assert patch_grid(net, x) == (4, 4) and len(runs) == 5

    unit = seeded(_LinearPatches())
    assert patch_grid(unit, images(1, 16)) == (4, 4)
    unit.patch_size = 2  # a stated patch size changed
    assert patch_grid(unit, images(1, 16)) == (8, 8)

    clear_cache(net)
    assert patch_grid(net, x) == (4, 4) and len(runs) == 6
    clear_cache()
    assert patch_grid(net, x) == (4, 4) and len(runs) == 7


def test_default_layer_cache_follows_the_network() -> None:
    from convlens.architecture import clear_cache

    net = seeded(GapNet())
    runs = []
    net.register_forward_pre_hook(lambda _m, _a: runs.append(1))
    x = images(1)
    first = find_gap_head(net, x)
    assert find_gap_head(net, x) is first and len(runs) == 1  # cached
    torch.manual_seed(1)
    net.fc = nn.Linear(6, 5).double()  # a new classifier: a stale head would keep the old one
    head = find_gap_head(net, x)
    assert head is not first and torch.equal(head.weight, net.fc.weight)
    assert find_gap_head(net, x.float().double()) is head  # same shape and dtype: cached
    count = len(runs)
    clear_cache(net)
    assert default_layer(net, x) == head.layer and len(runs) == count + 1
