"""Image synthesis: class and channel visualisation, DeepDream, their options and the CLI.

Tiny conv nets at 32x32 only, a few steps each, so the whole file runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from convlens.errors import InferenceModeError, InputError, LayerError, TargetError
from convlens.models import ClassList, Preprocess, wrap_model
from convlens.synthesis import (
    PRESETS,
    FourierImage,
    PixelImage,
    RandomTransform,
    SynthesisSettings,
    channel_visualization,
    class_visualization,
    color_matrix,
    decorrelate_colors,
    deep_dream,
    fourier_scale,
    gaussian_blur,
    image_grid,
    octave_sizes,
    recorrelate_colors,
    resolve_settings,
)
from convlens.synthesis.objectives import LayerReader
from tests.helpers.models import tiny_net_source

SMALL = {"pad": 2, "jitter": 2, "final_jitter": 1}  # transforms in proportion to 32-px images
FAST = {"steps": 10, "progress": False, **SMALL}


class TinyNet(nn.Module):
    """conv -> ReLU -> conv(stride 2) -> BN -> ReLU(inplace) -> conv -> GAP -> dropout -> fc."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)
        self.calls = {"conv3": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv2(self.act(self.conv1(x)))))
        self.calls["conv3"] += 1
        x = self.conv3(x)
        return self.fc(self.drop(self.pool(x).flatten(1)))


class SharedNet(nn.Module):
    """One ReLU module used twice (name@call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b(self.act(self.a(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.3)
            nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up and spinning cost more than they save on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    pre = Preprocess(resize=None, crop=32, mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))
    classes = ClassList(("cat", "dog", "coffee mug", "tabby, tabby cat"))
    return wrap_model(tiny(), classes=classes, preprocess=pre, name="tiny")


def high_freq(images: torch.Tensor) -> float:
    """Mean squared difference between neighbouring pixels."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return float(dx.pow(2).mean() + dy.pow(2).mean())


# ----------------------------------------------------------------------------- building blocks


def test_color_decorrelation_round_trip_and_normalisation() -> None:
    m = color_matrix(torch.float64)
    assert torch.allclose(m.norm(dim=0).max(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.linalg.matrix_rank(m) == 3
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    assert torch.allclose(decorrelate_colors(recorrelate_colors(x)), x, atol=1e-12)
    assert torch.allclose(recorrelate_colors(decorrelate_colors(x)), x, atol=1e-12)
    # The first component is the luminance: equal weights on R, G and B.
    assert torch.allclose(
        recorrelate_colors(torch.tensor([1.0, 0, 0]).view(3, 1, 1))[:, 0, 0], m[:, 0].float()
    )


def test_fourier_scale_is_one_over_f() -> None:
    s = fourier_scale(16, 16, decay=1.0, dtype=torch.float64)
    assert s.shape == (16, 9)
    assert torch.isclose(s[0, 1] / s[0, 2], torch.tensor(2.0, dtype=torch.float64))
    assert s[0, 0] == s[0, 1]  # the DC term is capped at the lowest frequency
    flat = fourier_scale(16, 16, decay=0.0, dtype=torch.float64)
    assert torch.allclose(flat, torch.full_like(flat, 16.0))


def test_fourier_parameterisation_is_smoother_than_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    common = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "decorrelate": False, "squash": "sigmoid"}
    with torch.no_grad():
        fourier = FourierImage(2, 32, 32, decay=1.0, init_std=1.0, generator=g, **common)()
        pixel = PixelImage(2, 32, 32, init_std=0.5, generator=g, **common)()
    for img in (fourier, pixel):
        assert img.shape == (2, 3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    # Relative to their variance, Fourier images have much less neighbour-to-neighbour energy.
    assert high_freq(fourier) / float(fourier.var()) < 0.5 * high_freq(pixel) / float(pixel.var())


def test_pixel_parameter_is_the_normalised_input_for_simonyan() -> None:
    p = PixelImage(
        1, 4, 4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), decorrelate=False, squash="none"
    )
    assert torch.allclose(p(), torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_transform_equals_pad_and_crops() -> None:
    x = torch.rand(4, 3, 20, 30)
    t = RandomTransform(pad=5, jitter=4, scale=(1, 1), rotate=0, final_jitter=2)
    y = t(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    o1 = torch.randint(0, 5, (4, 2), generator=g)
    torch.rand(4, generator=g, dtype=torch.float64)  # scale and angle draws
    torch.rand(4, generator=g, dtype=torch.float64)
    o2 = torch.randint(0, 3, (4, 2), generator=g)
    padded = F.pad(x, (5,) * 4, value=0.5)
    ref = torch.stack(
        [
            padded[i, :, o1[i, 1] : o1[i, 1] + 26, o1[i, 0] : o1[i, 0] + 36][
                :, o2[i, 1] : o2[i, 1] + 24, o2[i, 0] : o2[i, 0] + 34
            ]
            for i in range(4)
        ]
    )
    assert y.shape == (4, 3, 24, 34)
    assert torch.allclose(y, ref, atol=1e-5)
    # Resizing back to the input size, and the identity is skipped.
    sized = RandomTransform(size=(20, 30))(x, torch.Generator().manual_seed(0))
    assert sized.shape == x.shape
    ident = RandomTransform(pad=0, jitter=0, scale=(1, 1), rotate=0, final_jitter=0)
    assert ident(x, torch.Generator()) is x


def test_transform_zoom_and_rotation_are_per_image_and_differentiable() -> None:
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    t = RandomTransform(pad=0, jitter=0, scale=(0.5, 2.0), rotate=30, final_jitter=0)
    y = t(x, torch.Generator().manual_seed(0))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Same input repeated: different random transforms per image.
    same = t(x.detach()[:1].repeat(3, 1, 1, 1), torch.Generator().manual_seed(0))
    assert not torch.allclose(same[0], same[1])


def test_gaussian_blur_smooths_and_keeps_constants() -> None:
    x = torch.rand(1, 3, 16, 16)
    assert high_freq(gaussian_blur(x, 1.0)) < 0.3 * high_freq(x)
    c = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(c, 1.0), c)


def test_presets_and_overrides_are_validated() -> None:
    assert {"readable", "olah", "simonyan", "yosinski"} <= set(PRESETS)
    s = resolve_settings("simonyan", {"steps": 3})
    assert (s.param, s.optimizer, s.squash, s.init_std, s.samples) == ("pixel", "sgd", "none", 0, 1)
    assert s.steps == 3 and s.l2 > 0
    with pytest.raises(InputError, match="Did you mean"):
        resolve_settings("readable", {"stesp": 3})
    with pytest.raises(InputError, match="unknown preset"):
        resolve_settings("nope", {})
    with pytest.raises(InputError, match="param='pixel'"):
        resolve_settings("readable", {"blur_every": 2, "blur_sigma": 1.0})
    with pytest.raises(InputError, match="optimizer"):
        SynthesisSettings(optimizer="rmsprop").validate()  # type: ignore[arg-type]


# ----------------------------------------------------------------------- class visualisation


def test_class_objective_increases_and_images_in_range(model) -> None:
    res = class_visualization(model, ["cat", 2, "tabby cat"], **{**FAST, "steps": 25, "lr": 0.1})
    assert res.images.shape == (3, 3, 32, 32) and res.images.dtype == torch.float32
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert res.targets == [0, 2, 3] and res.labels == ["cat", "coffee mug", "tabby"]
    assert res.history.shape == (25, 3)
    assert (res.history[-3:].mean(0) > res.history[:3].mean(0) + 0.2).all()
    assert res.probabilities is not None and res.probabilities.shape == (3,)
    assert res.scores.shape == (3,) and res.objective == "logit"
    assert res.settings["preset"] == "readable" and res.settings["size"] == (32, 32)
    assert res.steps_per_second > 0


def test_probabilities_rise_for_the_target_class(model) -> None:
    res = class_visualization(model, [1], steps=40, progress=False, score="log_prob", lr=0.1)
    with torch.no_grad():
        start = torch.softmax(
            model.net(model.preprocess.normalize(torch.full((1, 3, 32, 32), 0.5))), 1
        )
    assert float(res.probabilities[0]) > float(start[0, 1])
    assert res.objective == "log_prob"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_and_stays_in_range(model, preset: str) -> None:
    res = class_visualization(model, [0, 1], preset=preset, **FAST)
    assert res.images.shape == (2, 3, 32, 32)
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert res.history[-1].mean() > res.history[0].mean()


def test_simonyan_starts_from_the_mean_image(model) -> None:
    res = class_visualization(model, [0], preset="simonyan", steps=0, progress=False)
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(res.images, mean)


def test_seed_determinism(model) -> None:
    a = class_visualization(model, [0, 1], seed=3, **FAST)
    b = class_visualization(model, [0, 1], seed=3, **FAST)
    c = class_visualization(model, [0, 1], seed=4, **FAST)
    assert torch.equal(a.images, b.images) and torch.equal(a.history, b.history)
    assert not torch.allclose(a.images, c.images)


def test_jitter_on_and_off_differ(model) -> None:
    on = class_visualization(model, [0], **FAST)
    off = class_visualization(
        model, [0], **{**FAST, "pad": 0, "jitter": 0, "final_jitter": 0}, scale=(1, 1), rotate=0
    )
    assert not torch.allclose(on.images, off.images, atol=1e-4)
    # Without any transform, the samples of a step are identical: same result as one sample.
    one = class_visualization(
        model,
        [0],
        **{**FAST, "pad": 0, "jitter": 0, "final_jitter": 0},
        scale=(1, 1),
        rotate=0,
        samples=1,
    )
    assert torch.allclose(one.images, off.images, atol=1e-5)


def test_blur_makes_images_smoother(model) -> None:
    common = {"preset": "yosinski", "steps": 20, "progress": False, "norm_clip_pct": 0.0}
    sharp = class_visualization(model, [0, 1], blur_every=0, **common)
    blurred = class_visualization(model, [0, 1], blur_every=1, blur_sigma=1.0, **common)
    assert high_freq(blurred.images) < 0.7 * high_freq(sharp.images)


def test_pixel_clipping_zeroes_small_pixels(model) -> None:
    common = {"preset": "yosinski", "steps": 6, "progress": False, "blur_every": 0}
    res = class_visualization(model, [0], norm_clip_pct=50.0, **common)
    mean = torch.tensor(model.preprocess.mean).view(3, 1, 1)
    at_mean = ((res.images[0] - mean).abs().sum(0) < 1e-6).float().mean()
    assert at_mean >= 0.45  # half the pixels were reset to the mean (zero) image
    res = class_visualization(model, [0], contrib_clip_pct=30.0, **common)
    at_mean = ((res.images[0] - mean).abs().sum(0) < 1e-6).float().mean()
    assert at_mean >= 0.25


def test_fourier_and_pixel_parameterisations_differ(model) -> None:
    fourier = class_visualization(model, [0], **FAST)
    pixel = class_visualization(model, [0], **FAST, param="pixel")
    assert not torch.allclose(fourier.images, pixel.images, atol=1e-3)
    nodecor = class_visualization(model, [0], **FAST, decorrelate=False)
    assert not torch.allclose(fourier.images, nodecor.images, atol=1e-3)


def test_chunked_batches_give_the_same_images(model) -> None:
    whole = class_visualization(model, [0, 1, 2], **FAST, batch_size=0)
    chunks = class_visualization(model, [0, 1, 2], **FAST, batch_size=4)  # 6 samples: 4 + 2
    assert torch.allclose(whole.images, chunks.images, atol=1e-4)
    assert torch.allclose(whole.history, chunks.history, atol=1e-4)


def test_callback_sees_every_step(model) -> None:
    seen: list[int] = []
    class_visualization(model, [0], callback=lambda i, img, s: seen.append(i), **FAST)
    assert seen == list(range(10))


def test_bare_module_and_float64(model) -> None:
    net = tiny().double()
    res = class_visualization(net, [1, 3], size=24, steps=4, progress=False)
    assert res.images.shape == (2, 3, 24, 24) and res.labels == ["class 1", "class 3"]
    with pytest.raises(TargetError, match="no class list"):
        class_visualization(net, ["cat"], **FAST)


def test_unknown_class_lists_close_matches(model) -> None:
    with pytest.raises(TargetError, match="Did you mean"):
        class_visualization(model, ["coffee mg"], **FAST)
    with pytest.raises(TargetError, match="out of range"):
        class_visualization(model, [7], **FAST)


# ---------------------------------------------------------------------- channel visualisation


def test_channel_visualisation_raises_its_channel_most(model) -> None:
    channels = [0, 3]
    res = channel_visualization(model, "conv3", channels, **{**FAST, "steps": 40, "lr": 0.1})
    assert res.images.shape == (2, 3, 32, 32) and res.layer == "conv3"
    assert res.labels == ["conv3:0", "conv3:3"] and res.probabilities is None
    assert (res.history[-1] > res.history[0]).all()
    net = model.net
    with torch.no_grad():
        grey = model.preprocess.normalize(torch.full((1, 3, 32, 32), 0.5))
        base = LayerReader(net, "conv3")(grey).mean(dim=(2, 3))
        acts = LayerReader(net, "conv3")(model.preprocess.normalize(res.images))
    gain = acts.mean(dim=(2, 3)) - base  # (image, channel), relative to a grey image
    for i, c in enumerate(channels):
        others = [k for k in range(gain.shape[1]) if k != c]
        assert gain[i, c] > gain[i, others].max()  # more than any other channel
        assert gain[i, c] > gain[1 - i, c] + 1.0  # more than the other channel's image does
        assert torch.isclose(res.scores[i], acts[i, c].mean(), atol=1e-5)


def test_neuron_objective(model) -> None:
    res = channel_visualization(model, "conv2", [1, 2], neuron="center", **FAST)
    assert res.objective == "neuron" and (res.history[-1] > res.history[0]).all()
    with pytest.raises(InputError, match="outside"):
        channel_visualization(model, "conv2", [1], neuron=(99, 0), **FAST)


def test_channel_out_of_range_and_unknown_layer(model) -> None:
    with pytest.raises(InputError, match="out of range"):
        channel_visualization(model, "conv3", [6], **FAST)
    with pytest.raises(LayerError, match="Did you mean"):
        channel_visualization(model, "conv9", [0], **FAST)
    with pytest.raises(LayerError, match="4-D"):
        channel_visualization(model, "fc", [0], **FAST)


def test_forward_stops_after_the_layer(model) -> None:
    net = model.net
    net.calls["conv3"] = 0
    channel_visualization(model, "conv2@0", [0], **FAST)
    assert net.calls["conv3"] == 0  # the network never ran past conv2
    channel_visualization(model, "conv2", [0], **FAST)
    # "Last call" needs one probe of the whole network (one in the loop, one for the scores).
    assert net.calls["conv3"] == 2
    net.calls["conv3"] = 0
    channel_visualization(model, "conv3", [0], **FAST)
    assert net.calls["conv3"] > 10


def test_layer_call_index() -> None:
    torch.manual_seed(0)
    net = SharedNet().eval()
    first = channel_visualization(net, "act@0", [3], size=16, **FAST)
    second = channel_visualization(net, "act", [3], size=16, **FAST)
    assert first.layer == "act@0" and second.layer == "act"
    with pytest.raises(InputError, match="out of range"):
        channel_visualization(net, "act@1", [4], size=16, **FAST)  # 5 channels: fine
        channel_visualization(net, "act@0", [4], size=16, **FAST)  # 4 channels: out of range
    with pytest.raises(LayerError, match="no call 2"):
        channel_visualization(net, "act@2", [0], size=16, **FAST)


# ---------------------------------------------------------------------------------- DeepDream


def photo(h: int = 40, w: int = 56) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, h // 4, w // 4, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]


def test_deep_dream_increases_the_layer_norm(model, tmp_path: Path) -> None:
    img = photo()
    res = deep_dream(
        model,
        img,
        "conv2",
        octaves=3,
        octave_scale=1.1,
        steps_per_octave=4,
        jitter=4,
        progress=False,
        gif_path=tmp_path / "d.gif",
    )
    assert res.image.shape == img.shape and res.original.shape == img.shape
    assert float(res.image.min()) >= 0.0 and float(res.image.max()) <= 1.0
    assert not torch.allclose(res.image, img)
    assert res.octave_sizes[-1] == (40, 56) and len(res.octave_sizes) == 3
    assert res.history.shape == (12,)
    net = model.net
    with torch.no_grad():

        def norm(u: torch.Tensor) -> float:
            return float(
                LayerReader(net, "conv2")(model.preprocess.normalize(u[None])).pow(2).mean()
            )

        assert norm(res.image) > 1.2 * norm(img)
    with Image.open(tmp_path / "d.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames > 10 and gif.size == (56, 40)
    assert res.gif_path == tmp_path / "d.gif" and len(res.frames) == 12


def test_deep_dream_channel_pil_input_and_determinism(model) -> None:
    pil = Image.fromarray((photo().permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    unit = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
    a = deep_dream(model, pil, "conv3", channel=2, octaves=2, steps_per_octave=3, progress=False)
    b = deep_dream(model, pil, "conv3", channel=2, octaves=2, steps_per_octave=3, progress=False)
    assert torch.equal(a.image, b.image) and a.frames == [] and a.gif_path is None
    assert torch.allclose(a.original, unit)

    def channel2(u: torch.Tensor) -> float:
        with torch.no_grad():
            out = LayerReader(model.net, "conv3")(model.preprocess.normalize(u[None]))
        return float(out[0, 2].pow(2).mean())

    assert channel2(a.image) > 1.2 * channel2(unit)


def test_deep_dream_errors(model) -> None:
    with pytest.raises(LayerError):
        deep_dream(model, photo(), "nope", progress=False)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        deep_dream(model, photo() * 4 - 2, "conv2", progress=False)
    with pytest.raises(InputError, match="out of range"):
        deep_dream(model, photo(), "conv2", channel=8, octaves=1, progress=False)


def test_octave_sizes() -> None:
    assert octave_sizes(100, 140, 3, 2.0, min_side=16) == [(25, 35), (50, 70), (100, 140)]
    assert octave_sizes(100, 140, 3, 2.0) == [(50, 70), (100, 140)]  # 25 < 32 is dropped
    assert octave_sizes(20, 40, 3, 2.0) == [(20, 40)]  # never smaller than the photo


# ------------------------------------------------------------------ model state and inference


def snapshot(net: nn.Module) -> tuple[list[bool], list[bool], list[torch.Tensor], int]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    return (
        [m.training for m in net.modules()],
        [p.requires_grad for p in net.parameters()],
        [t.detach().clone() for t in [*net.parameters(), *net.buffers()]],
        hooks,
    )


def same(a, b) -> bool:
    return (
        a[0] == b[0]
        and a[1] == b[1]
        and a[3] == b[3]
        and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    )


def test_model_left_as_found(model) -> None:
    net = model.net
    net.train()
    net.fc.weight.requires_grad_(False)
    before = snapshot(net)
    class_visualization(model, [0], **FAST)
    channel_visualization(model, "conv2", [0], **FAST)
    deep_dream(model, photo(), "conv2", octaves=1, steps_per_octave=2, progress=False)
    assert same(before, snapshot(net))
    assert all(p.grad is None for p in net.parameters())

    def boom(i: int, img: torch.Tensor, s: torch.Tensor) -> None:
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        channel_visualization(model, "conv2", [0], callback=boom, **FAST)
    assert same(before, snapshot(net))


def test_inference_mode_is_refused(model) -> None:
    with torch.inference_mode(), pytest.raises(InferenceModeError):
        class_visualization(model, [0], **FAST)
    with torch.inference_mode(), pytest.raises(InferenceModeError):
        deep_dream(model, photo(), "conv2", progress=False)


def test_result_save_and_grid(model, tmp_path: Path) -> None:
    res = class_visualization(model, [0, 3], steps=2, progress=False)
    paths = res.save(tmp_path)
    assert [p.name for p in paths] == ["00_0_cat.png", "01_3_tabby.png", "grid.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (32, 32)
    grid = image_grid(res.images, ["a", "b"], ncols=2, cell=48)
    assert grid.size[0] == 2 * 48 + 3 * 4


# ------------------------------------------------------------------------------------- CLI

NET = tiny_net_source()


@pytest.fixture
def cli(tmp_path: Path):
    from convlens.cli.synthesis import register

    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "labels.txt").write_text("cat\ndog\ncoffee mug\n")
    app = typer.Typer()
    register(app)
    args = ["--model", f"{tmp_path / 'net.py'}:build", "--classes", str(tmp_path / "labels.txt")]
    return app, [*args, "--size", "32"], tmp_path


def test_cli_classviz(cli) -> None:
    app, margs, d = cli
    out = d / "cv"
    r = CliRunner().invoke(
        app,
        ["classviz", "--class", "dog", "--class", "2", *margs, "--steps", "3", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert (out / "classviz_grid.png").exists() and (out / "classviz_00_1_dog.png").exists()
    with Image.open(out / "classviz_01_2_coffee_mug.png") as im:
        assert im.size == (32, 32)
    r = CliRunner().invoke(app, ["classviz", "--class", "dgo", *margs, "--out", str(out)])
    assert isinstance(r.exception, TargetError) and "dog" in str(r.exception)


def test_cli_featviz(cli) -> None:
    app, margs, d = cli
    out = d / "fv"
    r = CliRunner().invoke(
        app,
        [
            "featviz",
            "--layer",
            "2",
            "--channels",
            "0-2,5",
            *margs,
            "--steps",
            "3",
            "--preset",
            "simonyan",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert "featviz_2_grid.png" in files and len(files) == 5
    r = CliRunner().invoke(app, ["featviz", "--layer", "conv", *margs, "--out", str(out)])
    assert isinstance(r.exception, LayerError)
    r = CliRunner().invoke(app, ["featviz", "--layer", "2", "--channels", "a-b", *margs])
    assert isinstance(r.exception, InputError)


def test_cli_dream(cli) -> None:
    app, margs, d = cli
    Image.fromarray((photo(48, 64).permute(1, 2, 0).numpy() * 255).astype("uint8")).save(
        d / "photo.png"
    )
    out = d / "dr"
    r = CliRunner().invoke(
        app,
        [
            "dream",
            str(d / "photo.png"),
            "--layer",
            "1",
            "--octaves",
            "2",
            "--steps",
            "2",
            "--gif",
            *margs[:2],
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    with Image.open(out / "photo_dream.png") as im:
        assert im.size == (64, 48)
    with Image.open(out / "photo_dream.gif") as im:
        assert im.format == "GIF" and im.n_frames > 2
