"""The Zeiler & Fergus feature browser: running top-k, dataset scan, crops, grid, HTML, CLI."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens import ClassList, ConvlensModel, InputError, LayerError, Preprocess
from convlens.features.browser import (
    feature_examples,
    parse_channels,
    render_features,
    scan_features,
)
from convlens.features.topk import RunningTopK
from convlens.render.feature_grid import ChannelTiles, feature_grid
from tests.helpers.cli import exit_code as run
from tests.helpers.models import tiny_net_source
from tests.helpers.oracles import topk_brute_force

SIZE = 32
IDENTITY = Preprocess(resize=None, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# RunningTopK


def test_running_topk_matches_a_brute_force_sort() -> None:
    g = torch.Generator().manual_seed(0)
    top = RunningTopK(channels=5, k=4)
    batches = []
    next_id = 100
    for b in (3, 1, 6, 2, 5):
        acts = torch.randn(b, 5, 6, 7, generator=g)
        ids = torch.arange(next_id, next_id + b)
        next_id += b
        top.update(acts, ids)
        batches.append((acts, ids))
    assert top.seen == 17
    assert bool(top.valid().all())
    for ch, (values, ids, ys, xs) in enumerate(topk_brute_force(batches, 4)):
        torch.testing.assert_close(top.values[ch], values)
        assert top.image_ids[ch].tolist() == ids.tolist()
        assert top.ys[ch].tolist() == ys.tolist()
        assert top.xs[ch].tolist() == xs.tolist()


def test_running_topk_keeps_one_entry_per_image_and_marks_empty_slots() -> None:
    top = RunningTopK(channels=2, k=3)
    acts = torch.zeros(2, 2, 4, 4)
    acts[0, 0, 1, 2] = 5.0  # image 7's best for channel 0 ...
    acts[0, 0, 3, 3] = 4.0  # ... and its second-best, which must not take a second slot
    acts[1, 0, 0, 0] = 1.0
    acts[1, 1] = float("nan")  # ignored
    top.update(acts, torch.tensor([7, 8]))
    assert top.valid()[0].tolist() == [True, True, False]
    assert top.image_ids[0, :2].tolist() == [7, 8]
    assert (top.ys[0, 0].item(), top.xs[0, 0].item()) == (1, 2)
    assert top.valid()[1].tolist() == [True, False, False]  # image 8's map is all NaN
    assert top.score()[0].item() == pytest.approx(3.0)


def test_running_topk_rejects_wrong_shapes() -> None:
    top = RunningTopK(channels=3, k=2)
    with pytest.raises(InputError, match="3"):
        top.update(torch.zeros(1, 4, 2, 2), torch.tensor([0]))
    with pytest.raises(InputError, match="ids"):
        top.update(torch.zeros(2, 3, 2, 2), torch.tensor([0]))


# --------------------------------------------------------------------------------------------
# Tiny models and images


RING = 1e-4


class BrightSpot(nn.Module):
    """conv 8x8, stride 4, padding 2 -> ReLU -> GAP -> linear.

    Channel 0 is (about) the mean of the inner 4x4 of its window minus 0.8: it fires only on a
    bright 4x4 square at rows/columns 4y..4y+3, 4x..4x+3. Channel 1 fires on dark windows. The
    outer ring of each filter has tiny weights, so the receptive field is the whole 8x8 window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 8, stride=4, padding=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(RING)
            self.conv.weight[0, :, 2:6, 2:6] = 1.0 / 48
            self.conv.weight[1, :, 2:6, 2:6] = -1.0 / 48
            self.conv.bias.copy_(torch.tensor([-0.8, 0.5]))
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


class Saturating(nn.Module):
    """conv -> BN -> ReLU6 (called once) -> GAP -> linear, scaled so that many units saturate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.mul_(40.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean(dim=(2, 3)))


def wrap(net: nn.Module) -> ConvlensModel:
    return ConvlensModel(net=net, preprocess=IDENTITY, classes=ClassList(("a", "b")), name="tiny")


def dark_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"dark{i}.png"
        Image.fromarray(rng.integers(0, 70, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    dark_images(data, 3)
    dark_images(data / "sub", 2, seed=1)
    bright = np.random.default_rng(2).integers(0, 70, (SIZE, SIZE, 3), dtype=np.uint8)
    bright[12:16, 20:24] = 255
    Image.fromarray(bright).save(data / "sub" / "bright.png")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return data


# --------------------------------------------------------------------------------------------
# Scanning


def test_scan_finds_the_painted_square_and_skips_the_corrupt_file(folder: Path) -> None:
    from convlens.images import list_images

    net = BrightSpot()
    net.train()
    model = wrap(net)
    files = list_images(folder)
    scan = scan_features(model, files, ["relu"], [0, 1], top=3, batch_size=2, progress=False)

    assert [p.name for p, _ in scan.skipped] == ["corrupt.png"]
    assert "corrupt.png" in scan.skipped[0][1]
    assert scan.scanned == len(files) - 1
    layer = scan.layers["relu"]
    assert layer.shape == (2, 8, 8) and layer.channels == [0, 1]

    best = scan.top("relu", 0)[0]
    assert best.path.name == "bright.png"
    assert (best.y, best.x) == (3, 5)  # rows 12..15 = 4*3.., columns 20..23 = 4*5..
    assert best.value == pytest.approx(1.0 - 0.8, abs=48 * RING)
    assert all(a.value == 0.0 for a in scan.top("relu", 0)[1:])  # dark images do not fire

    (channel,) = feature_examples(scan, model, "relu", channels=[0], crop="field")
    example = channel.examples[0]
    assert example.box == (10, 18, 18, 26)  # the 8x8 receptive field around the square
    top, left = 12 - example.box[0], 20 - example.box[1]
    assert torch.all(example.patch[:, top : top + 4, left : left + 4] == 1.0)
    assert float(example.patch.mean()) < 0.5  # the rest of the patch is dark
    # The deconvnet projection of this unit is its filter: strong exactly on the square.
    strong = example.projection.abs().sum(dim=0) > 100 * RING
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[top : top + 4, left : left + 4] = True
    assert torch.equal(strong, expected)
    # The effective crop keeps the whole (small) receptive field.
    (effective,) = feature_examples(scan, model, "relu", channels=[0])
    assert effective.examples[0].box == example.box

    # The model is left as found: training mode, no hooks.
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())


def test_scan_keeps_what_a_plain_forward_pass_gives(folder: Path) -> None:
    from convlens.images import list_images

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),  # changes the conv's output in place after the hook
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )
    model = wrap(net)
    files = [p for p in list_images(folder) if p.name != "corrupt.png"]
    scan = scan_features(model, files, ["0", "3"], top=2, num_channels=3, progress=True)

    x = model.load_images(files)
    with torch.no_grad():
        first = net[0](x)
        second = net[3](net[2](net[1](first.clone())))
    for name, acts in (("0", first), ("3", second)):
        best = acts.flatten(2).amax(dim=2)  # (N, C)
        expected = best.topk(2, dim=0).values.T
        torch.testing.assert_close(scan.layers[name].top.values, expected)
        assert len(scan.layers[name].channels) == 3  # auto: the 3 most active
        score = expected.mean(dim=1)
        assert scan.layers[name].channels == torch.argsort(score, descending=True)[:3].tolist()


def test_saturating_activation_is_ranked_before_the_clip(folder: Path) -> None:
    from convlens.images import list_images

    files = [p for p in list_images(folder) if p.name != "corrupt.png"]
    model = wrap(Saturating().eval())
    scan = scan_features(model, files, ["act"], [0, 1, 2], top=3, progress=False)
    layer = scan.layers["act"]
    assert layer.source.name == "bn" and layer.clip == 6.0
    assert float(layer.top.values.max()) > 6.0  # values before ReLU6, not tied at 6


def test_probe_layers_is_public_and_reads_a_saturating_layer_before_its_clip() -> None:
    """The public probe (used by the failure-mode pages) gives the shape of the layer's map,
    computed here by a plain forward pass, and the module read before a ReLU6."""
    from convlens.architecture import parse_layer
    from convlens.features.scan import probe_layers

    net = Saturating().eval()
    with torch.no_grad():
        expected = net.act(net.bn(net.conv(torch.zeros(1, 3, 20, 24)))).shape
    probed = probe_layers(net, {"act": parse_layer("act"), "conv": parse_layer("conv")}, (20, 24))
    assert probed["act"].shape == tuple(expected) and probed["conv"].shape == tuple(expected)
    assert probed["act"].source.name == "bn" and probed["act"].clip == 6.0
    assert probed["conv"].source.name == "conv" and probed["conv"].clip is None
    assert probed["act"].layout is None


@pytest.mark.parametrize(
    ("layers", "channels", "error", "message"),
    [
        (["rleu"], "auto", LayerError, "relu"),
        (["fc"], "auto", LayerError, "(B, C, H, W)"),
        (["relu@3"], "auto", LayerError, "called 1 time"),
        (["relu"], [0, 2], InputError, "channel 2 is out of range"),
        ([], "auto", InputError, "at least one layer"),
        (["relu"], {"conv": [0]}, InputError, "'conv', which is not among the layers"),
    ],
)
def test_scan_fails_fast_with_clear_errors(folder: Path, layers, channels, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        scan_features(wrap(BrightSpot()), [folder / "nope.png"], layers, channels, progress=False)


def test_parse_channels() -> None:
    assert parse_channels("auto") == "auto"
    assert parse_channels("0-3") == [0, 1, 2, 3]
    assert parse_channels("5, 1,5,2-3") == [5, 1, 2, 3]
    for bad in ("", "a", "3-1", "1,,2", "-2"):
        with pytest.raises(InputError):
            parse_channels(bad)


# --------------------------------------------------------------------------------------------
# Rendering


def test_feature_grid_lays_out_blocks_with_empty_slots() -> None:
    red, blue = Image.new("RGB", (10, 5), "red"), Image.new("RGB", (7, 7), "blue")
    tiles = [
        ChannelTiles("channel 0", [red, red, red], [blue, blue, blue], "max 1"),
        ChannelTiles("channel 1", [red], [blue]),  # fewer examples than k
        ChannelTiles("channel 2", [red] * 4, [blue] * 4),
    ]
    fig = feature_grid(tiles, k=4, cell=20, columns=2, title="layer x", subtitle="a · b")
    assert fig.mode == "RGB"
    assert fig.width > 2 * 2 * (2 * 20) and fig.height > 2 * (2 * 20)
    with pytest.raises(InputError):
        ChannelTiles("bad", [red], [])
    with pytest.raises(InputError):
        feature_grid([])


NET = tiny_net_source()


def check_offline_html(index: Path) -> None:
    """No network references, and every referenced file exists next to the page."""
    text = index.read_text(encoding="utf-8")
    assert not re.search(r"https?://|//cdn|@import", text)
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    files = [r for r in refs if not r.startswith("#")]
    assert files, "the page shows no images"
    for ref in files:
        assert (index.parent / ref).is_file(), ref


def test_cli_writes_grids_and_an_offline_index(folder: Path, capsys) -> None:
    (folder.parent / "net.py").write_text(NET)
    out = folder.parent / "out"
    model = ["--model", f"{folder.parent / 'net.py'}:build", "--size", str(SIZE)]
    args = ["features", str(folder), *model, "--layer", "1", "--layer", "3"]
    args += ["--channels", "0-2", "--top", "4", "--batch-size", "3", "--out", str(out)]
    assert run(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "features_1.png",
        "features_3.png",
        "index.html",
    ]
    with Image.open(out / "features_3.png") as im:
        assert im.width > 3 * 2 * 2 * 64  # three channel blocks of two 2x2 grids
    check_offline_html(out / "index.html")
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "sub/bright.png" in text and "corrupt.png" in text  # sources and the skipped file
    assert "index.html" in capsys.readouterr().err

    guided = folder.parent / "guided"
    args = ["features", str(folder), *model, "--layer", "3", "--rule", "guided", "--limit", "3"]
    assert run([*args, "--crop", "field", "--out", str(guided)]) == 0
    check_offline_html(guided / "index.html")
    assert "2 images scanned" in (guided / "index.html").read_text(encoding="utf-8")  # 1 corrupt


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "33"], "Did you mean: '3'"),
        (["--layer", "1", "--channels", "2-9"], "channel 4 is out of range"),
        (["--layer", "1", "--channels", "1-x"], "cannot read channel selection"),
        (["--layer", "1", "--rule", "lrp"], "--rule"),
    ],
)
def test_cli_errors_are_one_line_before_scanning(folder: Path, capsys, extra, message) -> None:
    (folder.parent / "net.py").write_text(NET)
    out = folder.parent / "out"
    model = ["--model", f"{folder.parent / 'net.py'}:build", "--size", str(SIZE)]
    assert run(["features", str(folder), *model, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "scanning" not in err
    assert err.strip().splitlines()[-1].startswith("error:") and message in err
    assert not out.exists()


def test_render_notes_an_image_independent_deconvnet(folder: Path, tmp_path: Path) -> None:
    from convlens.images import list_images

    files = [p for p in list_images(folder) if p.name != "corrupt.png"]
    model = wrap(BrightSpot())
    scan = scan_features(model, files, ["relu"], [1], top=3, progress=False)
    written = render_features(scan, model, tmp_path / "r", cell=16)
    assert [p.name for p in written] == ["features_relu.png", "index.html"]
    assert "does not depend on the image" in written[-1].read_text(encoding="utf-8")


def test_render_splits_many_channels_over_several_images(folder: Path, tmp_path: Path) -> None:
    from convlens.images import list_images

    files = [p for p in list_images(folder) if p.name != "corrupt.png"]
    model = wrap(BrightSpot())
    scan = scan_features(model, files, ["relu"], [1, 0], top=2, progress=False)
    written = render_features(scan, model, tmp_path / "r", cell=16, per_image=1, rule="guided")
    names = [p.name for p in written]
    assert names == ["features_relu_1.png", "features_relu_2.png", "index.html"]
    check_offline_html(written[-1])
    text = written[-1].read_text(encoding="utf-8")
    assert "features_relu_1.png" in text and "features_relu_2.png" in text


class _Page(HTMLParser):
    """The elements of a page and the text of its ``span.f`` (source file) elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.files: list[str] = []
        self.text: list[str] = []
        self._in_file = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._in_file = tag == "span" and dict(attrs).get("class") == "f"

    def handle_endtag(self, tag: str) -> None:
        self._in_file = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_file:
            self.files.append(data)


def test_index_escapes_file_and_model_names(tmp_path: Path) -> None:
    names = [
        "<script>window.pwned=1<\\script>.png",
        "q\"'&{{7*7}}{% raw %}.png",
        "<img src=x onerror=window.pwned=2>.png",
        os.fsdecode(b"bad\xffbyte.png"),
    ]
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(4)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / name)
    model = ConvlensModel(
        net=BrightSpot(),
        preprocess=IDENTITY,
        classes=ClassList(("a", "b")),
        name="</script><b>model</b> {{ 7*7 }}",
    )
    files = sorted(data.iterdir())
    scan = scan_features(model, files, ["relu"], [0, 1], top=4, progress=False)
    written = render_features(scan, model, tmp_path / "out", cell=16)
    page = _Page()
    page.feed(written[-1].read_text(encoding="utf-8"))
    tags = {tag for tag, _ in page.elements}
    assert not tags & {"script", "b"}
    assert all(attrs.get("class") == "grid" for tag, attrs in page.elements if tag == "img")
    assert not any("onerror" in attrs for _, attrs in page.elements)
    # shown as written; the undecodable byte as \xff (convlens.console.printable)
    shown = [*names[:3], "bad\\xffbyte.png"]
    assert sorted(set(page.files)) == sorted(shown)
    assert "Feature browser · </script><b>model</b> {{ 7*7 }}" in page.text
    check_offline_html(written[-1])


def test_effective_crops_of_a_field_larger_than_any_input_stay_in_the_image() -> None:
    from convlens.features.project import _window_box
    from convlens.features.receptive_field import ReceptiveField

    # What is measured after attention or global pooling: every unit sees a 1024 px field
    # (the largest input tried), stride 0. The crop is centred on the field's part in the image.
    whole = ReceptiveField("x", (1024, 1024), (0, 0), (0, 0), (224, 224), (7, 7), clipped=True)
    assert _window_box(whole, 6, 6, (64, 64)) == (80, 80, 144, 144)
    assert _window_box(whole, 0, 0, whole.size) == (0, 0, 224, 224)
