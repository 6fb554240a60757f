"""Tests of convlens.render: colour maps, overlays, multi-class composite, figure panels."""

from __future__ import annotations

import colorsys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib._pylab_helpers import Gcf
from matplotlib.figure import Figure
from PIL import Image

from convlens.errors import InputError
from convlens.render import (
    class_colors,
    colorize,
    dominant_class,
    explanation_figure,
    multiclass_composite,
    multiclass_figure,
    overlay_map,
    save_figure,
    short_name,
    side_by_side_figure,
    to_pil,
)
from convlens.render.overlay import _backdrop
from convlens.result import Explanation

H = W = 32


def blob(cy: float, cx: float, sigma: float = 5.0, h: int = H, w: int = W) -> torch.Tensor:
    """A Gaussian bump with peak 1 at (cy, cx)."""
    y = torch.arange(h, dtype=torch.float32).view(-1, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, -1)
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def make_exp(batch: int = 2, k: int = 3, *, images: bool = True, method: str = "gradcam"):
    """An Explanation built by hand: blobs at different places per target, random images."""
    gen = torch.Generator().manual_seed(0)
    centres = [(8, 8), (24, 24), (8, 24), (24, 8)]
    maps = torch.stack(
        [torch.stack([blob(*centres[j % 4]) * 3.0 + 0.5 for j in range(k)]) for _ in range(batch)]
    )
    names = ["tabby, tabby cat", "Egyptian cat", "a very long class name that goes on, and on"]
    top = ["tabby, tabby cat", "Egyptian cat", "tiger cat", "lynx, catamount", "Persian cat"]
    probs = torch.tensor([0.62, 0.21, 0.08, 0.05, 0.02])
    return Explanation(
        method=method,
        maps=maps,
        targets=torch.tensor([[281, 285, 282][:k]] * batch),
        scores=torch.zeros(batch, k),
        probs=probs[:k].repeat(batch, 1),
        top_indices=torch.tensor([[281, 285, 282, 287, 283]] * batch),
        top_probs=probs.repeat(batch, 1),
        layer="features.7",
        class_names=[[names[j % 3] for j in range(k)] for _ in range(batch)],
        top_names=[list(top) for _ in range(batch)],
        images=torch.rand(batch, 3, H, W, generator=gen) if images else None,
    )


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """Rendering must never register figures with pyplot."""
    yield
    assert Gcf.get_num_fig_managers() == 0


# --- colorize / to_pil ----------------------------------------------------------------------


def test_colorize_shape_dtype_and_end_colours():
    cmap = matplotlib.colormaps["jet"]
    out = colorize(blob(16, 16))
    assert out.shape == (H, W, 3)
    assert out.dtype == np.uint8
    zero = colorize(torch.zeros(4, 5))
    one = colorize(torch.ones(4, 5))
    assert zero.shape == (4, 5, 3)
    assert (zero == np.array(cmap(0.0, bytes=True)[:3])).all()
    assert (one == np.array(cmap(1.0, bytes=True)[:3])).all()


def test_colorize_other_cmap_clamps_and_handles_nan():
    cmap = matplotlib.colormaps["viridis"]
    m = torch.tensor([[-1.0, 2.0, float("nan")]])
    out = colorize(m, "viridis")
    assert (out[0, 0] == cmap(0.0, bytes=True)[:3]).all()
    assert (out[0, 1] == cmap(1.0, bytes=True)[:3]).all()
    assert (out[0, 2] == cmap(0.0, bytes=True)[:3]).all()


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="colour map"):
        colorize(torch.zeros(4, 4), "no-such-cmap")


def test_to_pil_values():
    img = torch.rand(3, 6, 7)
    pil = to_pil(img)
    assert pil.mode == "RGB"
    assert pil.size == (7, 6)
    expected = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (np.asarray(pil) == expected).all()


# --- overlay_map ----------------------------------------------------------------------------


def test_overlay_alpha_zero_is_image_and_one_is_heatmap():
    img = torch.rand(3, H, W)
    m = blob(10, 20)
    under = overlay_map(m, img, alpha=0.0)
    assert under.mode == "RGB" and under.size == (W, H)
    assert (np.asarray(under) == np.asarray(to_pil(img))).all()
    over = overlay_map(m, img, alpha=1.0)
    assert (np.asarray(over) == colorize(m)).all()


def test_overlay_half_is_the_blend():
    img = torch.rand(3, H, W)
    m = blob(10, 20)
    out = np.asarray(overlay_map(m, img, cmap="viridis", alpha=0.5)).astype(np.float64)
    expected = 0.5 * img.permute(1, 2, 0).numpy() * 255 + 0.5 * colorize(m, "viridis")
    assert np.abs(out - expected).max() <= 1.0


def test_overlay_without_image_is_the_heatmap():
    m = blob(10, 20)
    out = overlay_map(m, None, alpha=0.3)
    assert out.mode == "RGB" and out.size == (W, H)
    assert (np.asarray(out) == colorize(m)).all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_overlay_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        overlay_map(blob(5, 5), torch.rand(3, H, W), alpha=alpha)


def test_overlay_resizes_map_to_image():
    img = torch.rand(3, 40, 48)
    out = overlay_map(torch.rand(7, 7), img)
    assert out.size == (48, 40)


def test_overlay_does_not_touch_inputs_and_takes_float64_grad_tensors():
    img = torch.rand(3, H, W, dtype=torch.float64)
    m = blob(10, 10).double().requires_grad_(True)
    img_before, m_before = img.clone(), m.detach().clone()
    overlay_map(m, img, alpha=0.4)
    multiclass_composite(m.unsqueeze(0), img)
    assert torch.equal(img, img_before)
    assert torch.equal(m.detach(), m_before)


def test_overlay_rejects_bad_image_shape():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        overlay_map(blob(5, 5), torch.rand(4, H, W))


# --- class colours and the multi-class composite -------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 10, 15, 25])
def test_class_colors_distinct(k):
    colors = class_colors(k)
    assert len(colors) == k
    assert len(set(colors)) == k
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)


def _quadrant_maps() -> torch.Tensor:
    """Three maps, each 1 in its own quadrant; the fourth quadrant (bottom right) is 0 for all."""
    maps = torch.zeros(3, H, W)
    maps[0, :16, :16] = 1.0
    maps[1, :16, 16:] = 1.0
    maps[2, 16:, :16] = 1.0
    maps[0, 16:, :16] = 0.4  # below class 2 there: class 2 still dominates
    return maps


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(float(v) / 255 for v in rgb))[0]


def test_multiclass_composite_exact_colours_without_image():
    colors = class_colors(3)
    out = np.asarray(multiclass_composite(_quadrant_maps(), None, alpha=1.0))
    assert out.shape == (H, W, 3)
    assert tuple(out[4, 4]) == colors[0]
    assert tuple(out[4, 28]) == colors[1]
    assert tuple(out[28, 4]) == colors[2]
    assert tuple(out[28, 28]) == (0, 0, 0)


def test_multiclass_composite_dominant_hue_and_untouched_backdrop():
    colors = class_colors(3)
    image = torch.full((3, H, W), 0.6)  # neutral grey: blending keeps each class's hue
    out = np.asarray(multiclass_composite(_quadrant_maps(), image))
    for (y, x), j in [((4, 4), 0), ((4, 28), 1), ((28, 4), 2)]:
        assert abs(_hue(out[y, x]) - _hue(colors[j])) < 0.02, (y, x, j)
    backdrop = (_backdrop(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (out[16:, 16:] == backdrop[16:, 16:]).all()

    rgb = torch.rand(3, H, W)
    out = np.asarray(multiclass_composite(_quadrant_maps(), rgb))
    backdrop = (_backdrop(rgb) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (out[16:, 16:] == backdrop[16:, 16:]).all()
    # the backdrop is dimmed and less saturated than the image
    assert backdrop.mean() < np.asarray(to_pil(rgb)).mean()
    assert backdrop.std(axis=2).mean() < np.asarray(to_pil(rgb)).std(axis=2).mean()


def test_multiclass_composite_threshold_and_custom_colours():
    maps = torch.zeros(2, 8, 8)
    maps[0, :, :4] = 0.1  # below the default threshold 0.2: not coloured
    maps[1, :, 4:] = 1.0
    out = np.asarray(multiclass_composite(maps, None, colors=["red", (0.0, 0.0, 1.0)], alpha=1.0))
    assert (out[:, :4] == 0).all()
    assert (out[:, 4:] == np.array([0, 0, 255])).all()
    out = np.asarray(multiclass_composite(maps, None, colors=[(255, 0, 0), "blue"], threshold=0.0))
    assert (out[:, :4, 0] > 0).all()


def test_multiclass_composite_rejects_bad_input():
    with pytest.raises(ValueError, match="K, H, W"):
        multiclass_composite(torch.zeros(8, 8), None)
    with pytest.raises(ValueError, match="colours"):
        multiclass_composite(torch.zeros(3, 8, 8), None, colors=["red"])
    with pytest.raises(ValueError, match="threshold"):
        multiclass_composite(torch.zeros(3, 8, 8), None, threshold=2.0)
    with pytest.raises(ValueError, match="alpha"):
        multiclass_composite(torch.zeros(3, 8, 8), None, alpha=-1.0)


def test_dominant_class():
    owner = dominant_class(_quadrant_maps())
    assert owner.dtype == torch.int64
    assert owner[4, 4] == 0 and owner[4, 28] == 1 and owner[28, 4] == 2 and owner[28, 28] == -1


# --- figures --------------------------------------------------------------------------------


def test_short_name():
    assert short_name("tabby, tabby cat") == "tabby"
    assert short_name("Egyptian cat") == "Egyptian cat"
    long = short_name("a very long class name that goes on, and on")
    assert len(long) <= 24 and long.endswith("…")
    assert long.startswith("a very long class name")


def _saved_size(fig: Figure, path: Path) -> tuple[int, int]:
    written = save_figure(fig, path)
    assert written == path and path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_explanation_figure(tmp_path):
    exp = make_exp()
    fig = explanation_figure(exp, 1)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 1 + exp.num_targets
    titles = [ax.get_title() for ax in images]
    assert titles[1] == "tabby (p=0.62)"
    assert titles[2] == "Egyptian cat (p=0.21)"
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in images)
    w, h = _saved_size(fig, tmp_path / "sub" / "dir" / "exp.png")
    assert 800 < w < 2000 and 250 < h < 600 and w > 2 * h


def test_explanation_figure_without_images(tmp_path):
    fig = explanation_figure(make_exp(1, 2, images=False), 0)
    assert len([ax for ax in fig.axes if ax.images]) == 2
    _saved_size(fig, tmp_path / "noimg.png")


def test_side_by_side_figure(tmp_path):
    grad = make_exp()
    sal = make_exp(k=1, method="saliency")
    fig = side_by_side_figure({"Grad-CAM": grad, "saliency": sal}, 0)
    pictures = [ax for ax in fig.axes if ax.images]
    assert len(pictures) == 3  # input + two methods
    assert [ax.get_title() for ax in pictures[1:]] == ["Grad-CAM", "saliency"]
    bars = [ax for ax in fig.axes if ax.patches]
    assert len(bars) == 1 and len(bars[0].patches) == 5
    labels = [t.get_text() for t in bars[0].get_yticklabels()]
    assert labels == ["tabby", "Egyptian cat", "tiger cat", "lynx", "Persian cat"]
    # the explained target (tabby, index 281) is highlighted
    colours = [p.get_facecolor() for p in bars[0].patches]
    assert colours[0] != colours[1] and colours[1] == colours[2]
    w, h = _saved_size(fig, tmp_path / "side.png")
    assert 900 < w < 2500 and 250 < h < 700


def test_side_by_side_rejects_empty_and_bad_index():
    with pytest.raises(ValueError, match="at least one"):
        side_by_side_figure({})
    with pytest.raises(ValueError, match="out of range"):
        side_by_side_figure({"gradcam": make_exp()}, 5)


def test_multiclass_figure(tmp_path):
    exp = make_exp(k=3)
    fig = multiclass_figure(exp, 0)
    pictures = [ax for ax in fig.axes if ax.images]
    assert len(pictures) == 2
    # the class outlines do not crop the composite
    assert pictures[1].get_xlim() == (-0.5, W - 0.5)
    assert pictures[1].get_ylim() == (H - 0.5, -0.5)
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "tabby (p=0.62)" and len(texts) == 3
    w, h = _saved_size(fig, tmp_path / "multi.png")
    assert 500 < w < 1500 and 250 < h < 600
    _saved_size(multiclass_figure(make_exp(k=2, images=False)), tmp_path / "multi_noimg.png")


def test_save_figure_paths(tmp_path):
    fig = explanation_figure(make_exp(1, 1))
    assert save_figure(fig, tmp_path / "noext") == tmp_path / "noext.png"
    assert (tmp_path / "noext.png").is_file()
    with pytest.raises(ValueError, match="png"):
        save_figure(fig, tmp_path / "out.jpg")


# --- the Explanation methods that call the renderers ----------------------------------------


def test_explanation_overlay_save_plot(tmp_path):
    exp = make_exp(batch=2, k=3)
    pil = exp.overlay(1, 2, alpha=1.0)
    assert pil.size == (W, H)
    assert (np.asarray(pil) == colorize(exp.normalized()[1, 2])).all()

    single = exp.select(0)
    single = Explanation(
        **{
            **single.__dict__,
            "maps": single.maps[:, :1],
            "targets": single.targets[:, :1],
            "probs": single.probs[:, :1],
            "scores": single.scores[:, :1],
            "class_names": [single.class_names[0][:1]],
        }
    )
    written = single.save(tmp_path / "one.png")
    assert written == [tmp_path / "one.png"]
    with Image.open(written[0]) as im:
        assert im.size == (W, H) and im.mode == "RGB"

    written = exp.save(tmp_path / "folder")
    assert len(written) == 6
    assert {p.name for p in written} == {
        f"{i:03d}_gradcam_{k}.png" for i in range(2) for k in range(3)
    }
    assert all(p.parent == tmp_path / "folder" and p.is_file() for p in written)

    fig = exp.plot(0)
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.images]) == 4
    _saved_size(fig, tmp_path / "plot.png")


# --- signed maps ---------------------------------------------------------------------------


def _signed_exp() -> Explanation:
    """One image, one target: +1 blob top left, -0.5 blob bottom right, zero elsewhere."""
    from dataclasses import replace

    exp = make_exp(1, 1).select(0)
    m = blob(8, 8, 3.0) - 0.5 * blob(24, 24, 3.0)
    m = torch.where(m.abs() < 1e-3, torch.zeros_like(m), m)
    return replace(exp, maps=m.view(1, 1, H, W), meta={"display": "signed"})


def test_signed_keeps_sign_and_zero_and_scales_by_the_largest_magnitude():
    exp = _signed_exp()
    assert exp.is_signed and not make_exp(1, 1).is_signed
    s = exp.signed()
    assert s.shape == exp.maps.shape
    torch.testing.assert_close(s, exp.maps / exp.maps.abs().max())
    clipped = exp.signed(percentile=90)
    assert clipped.max() == 1.0 and clipped.min() == -1.0  # both blobs clip at p90 of |m|
    assert (clipped[exp.maps == 0] == 0).all()


def test_overlay_signed_colours_for_red_against_blue_zero_transparent():
    from convlens.render.overlay import overlay_signed

    exp = _signed_exp()
    image = exp.images[0]
    pic = np.asarray(overlay_signed(exp.signed()[0, 0], image, alpha=0.5)).astype(int)
    backdrop = np.asarray(to_pil(_backdrop(image))).astype(int)
    zero = (exp.maps[0, 0] == 0).numpy()
    assert np.abs(pic[zero] - backdrop[zero]).max() <= 1  # zero: the muted image only
    r, b = pic[8, 8], pic[24, 24]
    assert r[0] > r[1] + 50 and r[0] > r[2] + 50  # strongly for: red (RdBu_r's dark end)
    assert b[2] > b[0] + 40  # against: blue
    same = np.asarray(overlay_signed(exp.signed()[0, 0], image, alpha=0.0)).astype(int)
    assert np.abs(same - backdrop).max() <= 1
    alone = np.asarray(overlay_signed(exp.signed()[0, 0], None))
    assert alone.shape == (H, W, 3)
    with pytest.raises(InputError):
        overlay_signed(exp.signed()[0], image)


def test_signed_explanations_draw_signed_overlays_and_a_for_against_bar():
    exp = _signed_exp()
    pic = np.asarray(exp.overlay(0, 0)).astype(int)
    assert pic[8, 8, 0] > pic[8, 8, 2] + 50  # red (RdBu_r), and opaque at the peak
    assert pic[8, 8, 0] > pic[8, 8, 1] + 50
    fig = explanation_figure(exp)
    labels = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()}
    assert {"against", "for"} <= labels
    side = side_by_side_figure({"intgrad": exp, "gradcam": make_exp(1, 1).select(0)})
    assert "red: for, blue: against" in {ax.get_xlabel() for ax in side.axes}


def test_gradient_x_input_and_integrated_gradients_are_signed_vargrad_is_not():
    from torch import nn

    from convlens.methods import GradientXInput, IntegratedGradients
    from convlens.methods.wrappers import SmoothGrad, VarGrad

    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    x = torch.rand(1, 3, 8, 8)
    assert GradientXInput()(net, x).is_signed
    assert IntegratedGradients(steps=2)(net, x).is_signed
    assert SmoothGrad(GradientXInput(), samples=2)(net, x).is_signed
    assert not VarGrad(GradientXInput(), samples=2)(net, x).is_signed


def test_multiclass_view_of_signed_maps_uses_the_evidence_for_each_class():
    from dataclasses import replace

    exp = make_exp(1, 2).select(0)
    m = torch.zeros(1, 2, H, W)
    m[0, 0] = blob(8, 8, 3.0) - blob(24, 24, 3.0)  # class 0: for top left, against bottom right
    m[0, 1] = blob(24, 24, 3.0)
    signed = replace(exp, maps=m, meta={"display": "signed"})
    fig = multiclass_figure(signed, alpha=1.0)
    shown = np.asarray(fig.axes[1].images[0].get_array()).astype(int)
    backdrop = np.asarray(to_pil(_backdrop(exp.images[0]))).astype(int)
    # zero evidence stays the backdrop (min-max would have put it at 0.5, over the threshold)
    assert np.abs(shown[0, 16] - backdrop[0, 16]).max() <= 1
    assert np.abs(shown[8, 8] - backdrop[8, 8]).max() > 30  # class 0's colour
    owner = dominant_class(signed.signed()[0].clamp_min(0), 0.2)
    assert owner[8, 8] == 0 and owner[24, 24] == 1 and owner[0, 16] == -1
