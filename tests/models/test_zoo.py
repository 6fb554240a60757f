"""Tests of convlens.models.zoo: timm, torchvision and Hugging Face models, offline.

Each library is optional: its tests skip without it (``pytest.importorskip``). The models are
tiny or small (timm ``resnet10t``, torchvision ``mobilenet_v3_small``, a one-layer ViT folder
written at test time); no test reaches the network (``no_network`` makes any connection fail).
"""

from __future__ import annotations

import json
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens import ClassList, ModelLoadError, RandomWeightsWarning, load_model
from convlens.models.zoo import is_zoo_spec
from tests.helpers.cli import exit_code

LABELS = ("cat", "dog", "bird")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zoo model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty library caches: ``HF_HOME`` and ``TORCH_HOME`` under ``tmp_path``."""
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return {
        "hub": tmp_path / "hf" / "hub",
        "checkpoints": tmp_path / "torch" / "hub" / "checkpoints",
    }


def photo(width: int = 400, height: int = 300) -> Image.Image:
    """A random RGB image whose sides scale to whole numbers for the sizes used here."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def logits(net: torch.nn.Module, size: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = net.eval()(x)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------- without any library


def test_zoo_specs_are_recognised() -> None:
    assert is_zoo_spec("timm:resnet50") and is_zoo_spec("torchvision:resnet50")
    assert is_zoo_spec("hf:models/vit") and is_zoo_spec("TIMM:resnet50")
    assert not is_zoo_spec("net.py:build") and not is_zoo_spec("timm") and not is_zoo_spec(3)


@pytest.mark.parametrize(
    ("spec", "module"),
    [("timm:resnet10t", "timm"), ("torchvision:resnet18", "torchvision"), ("hf:x", "transformers")],
)
def test_missing_library_says_how_to_install(
    spec: str, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    if spec.startswith("hf:"):  # the folder is read before the library is needed
        folder = tmp_path / "x"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "preprocessor_config.json").write_text("{}")
        spec = f"hf:{folder}"
    with pytest.raises(ModelLoadError, match=r"pip install convlens\[zoo\]") as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_random_weights_only_for_zoo_models_and_not_with_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="for zoo models"):
        load_model("lite0", random_weights=True)
    with pytest.raises(ModelLoadError, match="not both"):
        load_model("timm:resnet10t", weights=tmp_path / "w.pt", random_weights=True)
    with pytest.raises(ModelLoadError, match="give a name"):
        load_model("timm:")


# ----------------------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_net() -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=len(LABELS)).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_file_round_trip(
    timm_net: torch.nn.Module, tmp_path: Path, suffix: str, no_network: None
) -> None:
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(timm_net.state_dict(), str(path))
    else:
        torch.save(timm_net.state_dict(), path)
    model = load_model("timm:resnet10t", weights=path, classes=ClassList(LABELS))
    assert model.name == "timm:resnet10t" and model.classes.names == LABELS
    assert not model.net.training
    torch.testing.assert_close(logits(model.net, 64), logits(timm_net, 64), rtol=0, atol=0)


def test_timm_weights_of_other_classes_need_the_class_list(
    timm_net: torch.nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "w.pt"
    torch.save(timm_net.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*--classes") as info:
        load_model("timm:resnet10t", weights=path)  # built with timm's 1000 classes
    assert "fc.weight (file 3x512, model 1000x512)" in str(info.value)


def test_timm_preprocessing_is_timms_eval_transform() -> None:
    timm = pytest.importorskip("timm")
    with pytest.warns(RandomWeightsWarning, match="mean nothing"):
        model = load_model("timm:resnet10t", random_weights=True)
    pre = model.preprocess
    config = timm.data.resolve_data_config(model=model.net)
    assert (pre.crop, pre.interpolation) == (config["input_size"][1], config["interpolation"])
    assert (pre.mean, pre.std) == (tuple(config["mean"]), tuple(config["std"]))
    # The same tensor as timm's own eval transform (an independent implementation).
    transform = timm.data.create_transform(**config, is_training=False)
    image = photo(400, 300)  # 300 -> floor(176 / 0.875) = 201: 201 x 268 exactly
    torch.testing.assert_close(pre(image), transform(image), rtol=0, atol=1e-5)
    # ImageNet-1k classes from timm's ImageNetInfo, with synsets.
    assert model.classes.names[0].startswith("tench") and model.classes.synsets is not None
    assert model.classes.index("n01443537") == 1 and len(model.classes) == 1000


def test_timm_cached_weights_are_found_never_downloaded(
    caches: dict[str, Path], no_network: None
) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    net = timm.create_model("resnet10t", pretrained=False).eval()
    with pytest.raises(ModelLoadError, match="no weights") as info:
        load_model("timm:resnet10t")
    text = str(info.value)
    assert "--weights FILE" in text and "--random-weights" in text and "\n" not in text
    url_file = caches["checkpoints"] / "resnet10t_176_c3-f3215ab1.pth"
    assert str(url_file) in text
    # torch hub checkpoints (the pretrained config's url)
    url_file.parent.mkdir(parents=True)
    torch.save(net.state_dict(), url_file)
    model = load_model("timm:resnet10t")
    torch.testing.assert_close(logits(model.net, 64), logits(net, 64), rtol=0, atol=0)
    url_file.unlink()
    # the Hugging Face hub cache (the pretrained config's hf_hub_id), the revision refs/main names
    safetensors_torch = pytest.importorskip("safetensors.torch")
    repo = caches["hub"] / "models--timm--resnet10t.c3_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    safetensors_torch.save_file(net.state_dict(), str(repo / "snapshots/abc123/model.safetensors"))
    model = load_model("timm:resnet10t.c3_in1k")
    torch.testing.assert_close(logits(model.net, 64), logits(net, 64), rtol=0, atol=0)


def test_timm_unknown_names_list_close_matches() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ModelLoadError, match=r"unknown timm model 'resnet1t'.*'resnet10t'"):
        load_model("timm:resnet1t")
    with pytest.raises(ModelLoadError, match=r"no pretrained tag 'bogus'.*c3_in1k"):
        load_model("timm:resnet10t.bogus")


# ---------------------------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def tv_net() -> torch.nn.Module:
    pytest.importorskip("torchvision")
    from torchvision import models

    torch.manual_seed(0)
    return models.get_model("mobilenet_v3_small", weights=None).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torchvision_weights_file_round_trip(
    tv_net: torch.nn.Module, tmp_path: Path, suffix: str, no_network: None
) -> None:
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        pytest.importorskip("safetensors.torch").save_file(tv_net.state_dict(), str(path))
    else:
        torch.save(tv_net.state_dict(), path)
    model = load_model("torchvision:mobilenet_v3_small", weights=path)
    torch.testing.assert_close(logits(model.net, 64), logits(tv_net, 64), rtol=0, atol=0)


def test_torchvision_preprocessing_and_classes_from_the_weights_meta(
    tv_net: torch.nn.Module, tmp_path: Path, caches: dict[str, Path], no_network: None
) -> None:
    from torchvision import models

    weights = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    with pytest.raises(ModelLoadError, match="no weights") as info:
        load_model("torchvision:mobilenet_v3_small")
    cached = caches["checkpoints"] / Path(weights.url).name
    assert str(cached) in str(info.value)
    cached.parent.mkdir(parents=True)
    torch.save(tv_net.state_dict(), cached)
    model = load_model("torchvision:mobilenet_v3_small.IMAGENET1K_V1")  # from the cache
    torch.testing.assert_close(logits(model.net, 64), logits(tv_net, 64), rtol=0, atol=0)
    pre = model.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    image = photo(400, 300)  # 300 -> 256: 256 x 341
    torch.testing.assert_close(pre(image), weights.transforms()(image), rtol=0, atol=1e-5)
    assert model.classes.names == tuple(weights.meta["categories"])
    assert model.classes.index("n01443537") == 1  # ImageNet synsets attached


def test_torchvision_vit_weights_set_the_input_size(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchvision")
    from torchvision import models

    built: dict[str, object] = {}

    def get_model(name: str, **kwargs: object) -> torch.nn.Module:  # a stand-in: ViT-B is big
        built.update(kwargs, name=name)
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(3, 1000))  # fmt: skip

    monkeypatch.setattr(models, "get_model", get_model)
    with pytest.warns(RandomWeightsWarning):
        model = load_model("torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1", random_weights=True)
    assert built == {"name": "vit_b_16", "weights": None, "num_classes": 1000, "image_size": 384}
    pre = model.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (384, 384, "bicubic")


def test_torchvision_unknown_names() -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(ModelLoadError, match=r"unknown torchvision model.*'mobilenet_v3_small'"):
        load_model("torchvision:mobilenetv3_small")
    with pytest.raises(ModelLoadError, match=r"no weights 'V9'; its weights: IMAGENET1K_V1"):
        load_model("torchvision:mobilenet_v3_small.V9")


# --------------------------------------------------------------------------------- Hugging Face

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)


@pytest.fixture
def hf_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    net = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path / "vit"
    net.save_pretrained(str(folder))
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD), resample=3
    )
    processor.save_pretrained(str(folder))
    return folder, net


def test_hf_folder_loads_with_its_processor_and_labels(
    hf_folder: tuple[Path, torch.nn.Module], no_network: None
) -> None:
    folder, net = hf_folder
    model = load_model(f"hf:{folder}")
    assert model.classes.names == LABELS and model.name == f"hf:{folder}"
    out = model.net(torch.zeros(1, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3)  # logits, not an output object
    torch.testing.assert_close(logits(model.net, 32), logits(net, 32), rtol=0, atol=0)
    names = [n for n, _ in model.net.named_modules()]
    assert "model.vit.embeddings.patch_embeddings.projection" in names
    pre = model.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (None, 32, "bicubic")
    assert pre.mean == pytest.approx(MEAN) and pre.std == pytest.approx(STD)
    # Close to the processor's own output (its resize is torchvision's, not PIL's).
    from transformers import ViTImageProcessor

    image = photo(50, 40)
    theirs = ViTImageProcessor.from_pretrained(str(folder))(images=image, return_tensors="pt")
    assert (pre(image) - theirs["pixel_values"][0]).abs().max() < 0.05


def test_hf_rescale_and_shortest_edge_crop() -> None:
    from convlens.models.zoo import _hf_preprocess

    pre = _hf_preprocess(
        {
            "size": {"shortest_edge": 224},
            "crop_pct": 0.875,
            "do_rescale": False,  # the model sees 0..255
            "image_mean": [10.0, 20.0, 30.0],
            "image_std": [50.0, 60.0, 70.0],
            "resample": 2,
        },
        "hf:x",
    )
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    unit = torch.rand(3, 4, 4)
    expected = (unit * 255 - torch.tensor([10.0, 20, 30]).view(3, 1, 1)) / torch.tensor(
        [50.0, 60, 70]
    ).view(3, 1, 1)
    torch.testing.assert_close(pre.normalize(unit), expected)
    pre = _hf_preprocess(
        {
            "size": {"shortest_edge": 256},
            "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224},
        },
        "hf:x",
    )
    assert (pre.resize, pre.crop) == (256, 224)
    with pytest.raises(ModelLoadError, match="square"):
        _hf_preprocess({"size": {"height": 224, "width": 160}}, "hf:x")


def test_hf_weights_random_weights_and_errors(
    hf_folder: tuple[Path, torch.nn.Module], tmp_path: Path, no_network: None
) -> None:
    folder, net = hf_folder
    weights = tmp_path / "w.safetensors"
    (folder / "model.safetensors").rename(weights)
    with pytest.raises(ModelLoadError, match=r"no weights for hf:.*--random-weights"):
        load_model(f"hf:{folder}")
    model = load_model(f"hf:{folder}", weights=weights)
    torch.testing.assert_close(logits(model.net, 32), logits(net, 32), rtol=0, atol=0)
    with pytest.warns(RandomWeightsWarning):
        model = load_model(f"hf:{folder}", random_weights=True)
    assert model.classes.names == LABELS
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(f"hf:{tmp_path / 'missing'}")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no preprocessor_config\.json"):
        load_model(f"hf:{folder}", weights=weights)


def test_hf_model_id_in_the_local_cache(
    hf_folder: tuple[Path, torch.nn.Module], caches: dict[str, Path], no_network: None
) -> None:
    folder, net = hf_folder
    snapshot = caches["hub"] / "models--someone--tiny-vit" / "snapshots" / "0123"
    snapshot.parent.mkdir(parents=True)
    folder.rename(snapshot)
    model = load_model("hf:someone/tiny-vit")
    torch.testing.assert_close(logits(model.net, 32), logits(net, 32), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def cli_files(timm_net: torch.nn.Module, tmp_path: Path) -> dict[str, Path]:
    weights = tmp_path / "w.pth"
    torch.save(timm_net.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    image = tmp_path / "a.png"
    photo(80, 60).save(image)
    return {"weights": weights, "labels": labels, "image": image, "dir": tmp_path}


def test_cli_explain_with_a_timm_model(cli_files: dict[str, Path], capsys, no_network) -> None:
    f = cli_files
    out = f["dir"] / "out"
    args = ["explain", str(f["image"]), "--model", "timm:resnet10t", "--weights",
            str(f["weights"]), "--classes", str(f["labels"]), "--size", "64",
            "--methods", "saliency", "--out", str(out)]  # fmt: skip
    assert exit_code(args) == 0, capsys.readouterr().err
    assert any(out.rglob("*.png"))


def test_cli_without_weights_is_one_line_and_random_weights_warns(
    cli_files: dict[str, Path], caches: dict[str, Path], capsys, no_network
) -> None:
    f = cli_files
    assert exit_code(["predict", str(f["image"]), "--model", "timm:resnet10t"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no weights for timm:resnet10t") and err.count("\n") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)  # the CLI shows it as a line
        code = exit_code(
            ["predict", str(f["image"]), "--model", "timm:resnet10t", "--random-weights"]
        )
    assert code == 0
    assert "random weights" in capsys.readouterr().err


def test_cli_size_keeps_the_zoo_models_own_preprocessing(cli_files: dict[str, Path]) -> None:
    from convlens.cli.options import load_net

    f = cli_files
    net = load_net("timm:resnet10t", f["weights"], f["labels"], size=64, mean="0.5")
    pre = net.preprocess
    assert (pre.crop, pre.resize, pre.interpolation) == (64, 73, "bicubic")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.229, 0.224, 0.225)


def test_hf_config_file_is_json(hf_folder: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = hf_folder
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(f"hf:{folder}")
    (folder / "preprocessor_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        load_model(f"hf:{folder}")


def test_cli_layers_of_a_hugging_face_folder(
    hf_folder: tuple[Path, torch.nn.Module], capsys
) -> None:
    folder, _ = hf_folder
    assert exit_code(["layers", f"hf:{folder}"]) == 0
    table = capsys.readouterr().out
    assert "model.vit.embeddings.patch_embeddings.projection" in table and "1x32x4x4" in table
