"""The feature browser on token layers of vision transformers (tiny timm / torchvision models):
top activations ranked over the patch tokens, patches cut from the tokens' grid cells,
projections as input gradients cropped to the cells."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens import ClassList, ConvlensModel, LayerError, Preprocess
from convlens.features.browser import feature_examples, render_features, scan_features
from tests.helpers import zoo
from tests.helpers.cli import exit_code as run
from tests.helpers.models import TokenViT

SIZE = 32
PATCH = 8  # the tiny ViTs' patch size: a 4x4 grid on 32x32 inputs
IDENTITY = Preprocess(resize=None, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

# (builder, layer, raw output -> (B, tokens on the grid in row-major order, C)), the tokens taken
# from the raw output by hand: the prefix (class, distillation tokens) is what the architecture
# puts first, Swin's stage output is (B, H, W, C).
CASES: dict[str, tuple[Callable[[], nn.Module], str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "plain-torch-vit": (
        lambda: TokenViT(size=SIZE, patch=PATCH, prefix=2),
        "blocks.1.norm1",
        lambda out: out[:, 2:],
    ),
    "timm-vit": (zoo.timm_vit, "blocks.1.norm1", lambda out: out[:, 1:]),
    "timm-deit-distilled": (zoo.timm_deit_distilled, "blocks.1", lambda out: out[:, 2:]),
    "timm-swin": (zoo.timm_swin, "layers.1", lambda out: out.flatten(1, 2)),
    # torchvision's Swin permutes its final norm's tokens into a map: ranked as that norm
    "torchvision-swin-permute": (
        zoo.torchvision_swin,
        "permute",
        lambda out: out.flatten(2).transpose(1, 2),
    ),
    "torchvision-vit": (
        zoo.torchvision_vit,
        "encoder.layers.encoder_layer_1.ln_1",
        lambda out: out[:, 1:],
    ),
}


def wrap(net: nn.Module) -> ConvlensModel:
    return ConvlensModel(net=net, preprocess=IDENTITY, classes=ClassList(tuple("abcde")))


def build(case: str) -> tuple[ConvlensModel, str, Callable[[torch.Tensor], torch.Tensor]]:
    builder, layer, tokens = CASES[case]
    torch.manual_seed(0)
    return wrap(builder().eval()), layer, tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def raw_output(model: ConvlensModel, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for ``x``, from a plain forward hook on a whole forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.net.get_submodule(layer).register_forward_hook(
        lambda _m, _a, out: seen.append(out)
    )
    try:
        model.net(x)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_top_activations_match_a_brute_force_over_the_tokens(case: str, files) -> None:
    model, layer, tokens = build(case)
    scan = scan_features(model, files, [layer], "auto", top=3, batch_size=2, progress=False)
    info = scan.layers[layer]
    assert info.layout is not None and info.layout.grid == (4, 4)
    assert info.source.name == ("norm" if layer == "permute" else layer)

    with torch.no_grad():
        grid = tokens(raw_output(model, layer, model.load_images(files))).float()  # (B, 16, C)
    n, positions, channels = grid.shape
    assert positions == 16 and info.shape == (channels, 4, 4)
    for c in range(channels):
        # per image, its best token; then the images sorted by it, one entry per image
        best = [max(range(positions), key=lambda p, b=b: float(grid[b, p, c])) for b in range(n)]
        order = sorted(range(n), key=lambda b: -float(grid[b, best[b], c]))[:3]
        got = scan.top(layer, c)
        assert [a.image_id for a in got] == order
        for a, b in zip(got, order, strict=True):
            assert (a.y, a.x) == divmod(best[b], 4)
            assert a.value == pytest.approx(float(grid[b, best[b], c]), rel=1e-5, abs=1e-6)
    # "auto" picks the channels with the highest mean of their top activations
    score = info.top.values.mean(dim=1)
    assert info.channels == torch.argsort(score, descending=True, stable=True)[:16].tolist()


@pytest.mark.parametrize(
    "case", ["plain-torch-vit", "timm-vit", "timm-swin", "torchvision-swin-permute"]
)
def test_patches_are_grid_cells_and_projections_cropped_gradients(case: str, files) -> None:
    model, layer, tokens = build(case)
    scan = scan_features(model, files, [layer], [0, 5], top=2, progress=False)
    images = model.load_images(files)
    for channel in feature_examples(scan, model, layer, rule="deconvnet", crop="effective"):
        assert channel.window == (PATCH, PATCH)
        for e in channel.examples:
            a = e.activation
            top, left = a.y * PATCH, a.x * PATCH
            assert e.box == (top, left, top + PATCH, left + PATCH)
            x = images[a.image_id]
            torch.testing.assert_close(e.patch, x[:, top : top + PATCH, left : left + PATCH])
            # the gradient of the token's unit with respect to the input, by plain autograd
            xs = x[None].clone().requires_grad_(True)
            unit = tokens(raw_output(model, layer, xs))[0, a.y * 4 + a.x, channel.channel]
            (grad,) = torch.autograd.grad(unit, xs)
            cell = grad[0, :, top : top + PATCH, left : left + PATCH]
            torch.testing.assert_close(e.projection, cell, rtol=1e-4, atol=1e-6)
            share = float(cell.abs().sum() / grad.abs().sum())
            assert e.inside == pytest.approx(share, rel=1e-4)
            assert 0.0 < share < 1.0  # attention reaches beyond the cell


def test_render_says_what_token_patches_and_projections_are(files, tmp_path: Path) -> None:
    model, layer, _ = build("plain-torch-vit")
    scan = scan_features(model, files, [layer], [1, 2], top=2, progress=False)
    written = render_features(scan, model, tmp_path / "out", rule="guided")
    assert [p.name for p in written] == ["features_blocks.1.norm1.png", "index.html"]
    text = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "token cells 8x8 px" in text and "2 prefix token(s) dropped" in text
    assert "plain gradient" in text and "receptive field" in text


def test_cnn_layers_keep_no_layout(files) -> None:
    torch.manual_seed(0)
    model = wrap(zoo.timm_convnext().eval())
    scan = scan_features(model, files, ["stages.2"], [0], top=2, progress=False)
    assert scan.layers["stages.2"].layout is None
    (channel,) = feature_examples(scan, model, "stages.2", crop="field")
    assert all(e.inside is None for e in channel.examples)
    assert channel.window[0] > 8  # a measured receptive field, not a grid cell


@pytest.mark.parametrize(
    ("case", "layer"),
    [("timm-swin", "layers.0.blocks.0.attn"), ("timm-vit", "head")],
)
def test_layers_off_the_grid_are_refused_in_one_line(case: str, layer: str, files) -> None:
    model, _, _ = build(case)
    with pytest.raises(LayerError, match=re.escape("feature browser needs")) as info:
        scan_features(model, files, [layer], progress=False)
    assert "\n" not in str(info.value)


NET = textwrap.dedent(
    """
    import timm
    import torch

    def build():
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
        )
    """
)


def test_cli_browses_a_token_layer_by_default(files, tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    (tmp_path / "vit.py").write_text(NET)
    out = tmp_path / "out"
    model = ["--model", f"{tmp_path / 'vit.py'}:build", "--size", str(SIZE)]
    args = ["features", str(files[0].parent), *model, "--top", "2", "--num-channels", "2"]
    assert run([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    chosen = re.search(r"layer (\S+) \(the default", err)
    assert chosen is not None and chosen.group(1).startswith("blocks.1.")
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "is a token layer" in text and "token cells 8x8 px" in text

    assert run([*args, "--layer", "head", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "feature browser needs" in err
