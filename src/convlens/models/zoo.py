"""Models from the zoos: timm, torchvision and Hugging Face image classifiers, offline.

Specifications understood by :func:`load_zoo` (and so by ``load_model`` and ``--model``):

* ``"timm:NAME"`` -- a timm architecture, optionally with its pretrained tag
  (``timm:resnet50``, ``timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k``);
* ``"torchvision:NAME"`` -- a torchvision classification model, optionally with the name of
  one of its weights (``torchvision:resnet50``, ``torchvision:resnet50.IMAGENET1K_V2``);
* ``"hf:PATH"`` -- a local Hugging Face image-classification folder (``config.json``, the
  weights and ``preprocessor_config.json``, as ``save_pretrained`` writes them), or a model id
  (``hf:google/vit-base-patch16-224``) already in the local Hugging Face cache.

Preprocessing (input size, resize, crop, interpolation, mean and std) and class names come from
the library's own configuration: timm's pretrained config (``timm.data.resolve_data_config``),
torchvision's weights metadata (``weights.transforms()``, ``meta["categories"]``), the folder's
``preprocessor_config.json`` and ``config.json`` ``id2label``.

Weights are never downloaded. They come from a file given as ``weights`` (a state dict or a
``.safetensors`` file, loaded strictly), or from the library's local cache: the Hugging Face hub
cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and torch's
hub checkpoints (``$TORCH_HOME/hub/checkpoints``, else ``~/.cache/torch/hub/checkpoints``).
With neither, loading fails with one line that says where the file would be; random weights
are used only when asked for (``random_weights=True``), with a :class:`RandomWeightsWarning`.

The libraries are optional (``pip install convlens[zoo]``) and imported here, lazily.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from convlens.errors import ModelLoadError, RandomWeightsWarning, close_matches
from convlens.models.classes import ClassList, imagenet_classes
from convlens.models.preprocess import INTERPOLATIONS, Preprocess

__all__ = [
    "ZOOS",
    "HFClassifier",
    "hub_cache_dir",
    "is_zoo_spec",
    "load_hf",
    "load_timm",
    "load_torchvision",
    "load_zoo",
    "torch_cache_dir",
]

log = logging.getLogger(__name__)

ZOOS = ("timm", "torchvision", "hf")
"""The prefixes of zoo specifications (``"timm:resnet50"``)."""

_INSTALL = "pip install convlens[zoo]"

Loaded = tuple[nn.Module, Preprocess, ClassList, str]
"""What each loader returns: the network (eval mode, CPU), its preprocessing, its classes and
its name for reports."""


def is_zoo_spec(spec: object) -> bool:
    """Whether ``spec`` is a zoo specification (``timm:...``, ``torchvision:...``, ``hf:...``)."""
    return isinstance(spec, str) and spec.split(":", 1)[0].strip().lower() in ZOOS and ":" in spec


def load_zoo(
    spec: str,
    *,
    weights: str | Path | None = None,
    classes: ClassList | None = None,
    random_weights: bool = False,
) -> Loaded:
    """Load a zoo model from its specification (see the module's docstring).

    Args:
        spec: ``"timm:NAME"``, ``"torchvision:NAME"`` or ``"hf:PATH"``.
        weights: a state-dict (``.pt``/``.pth``) or ``.safetensors`` file for the network;
            without it, the library's locally cached pretrained weights.
        classes: the model's classes when they are not the library's (a model fine-tuned to
            other classes): timm and torchvision models are built with ``len(classes)``
            outputs, and need ``weights`` or ``random_weights``.
        random_weights: build the network with random weights (only to try the plumbing: its
            maps mean nothing); warns with :class:`RandomWeightsWarning`.

    Returns:
        ``(network, preprocessing, classes, name)``; the network in eval mode on the CPU.

    Raises:
        ModelLoadError: the library is not installed, the name is unknown (the message lists
            close matches), no weights are available (the message says how to supply them),
            or the weights do not fit.
    """
    zoo, _, name = spec.partition(":")
    zoo, name = zoo.strip().lower(), name.strip()
    if not name:
        raise ModelLoadError(f"model {spec!r}: give a name after '{zoo}:'")
    if weights is not None and random_weights:
        raise ModelLoadError("give either --weights or --random-weights, not both")
    path = None if weights is None else Path(weights).expanduser()
    loader = {"timm": load_timm, "torchvision": load_torchvision, "hf": load_hf}[zoo]
    net, pre, names, label = loader(
        name, weights=path, classes=classes, random_weights=random_weights
    )
    if random_weights:
        warnings.warn(
            f"{label} has random weights (--random-weights): its predictions and maps mean "
            "nothing; use it only to try the plumbing",
            RandomWeightsWarning,
            stacklevel=3,
        )
    return net.eval(), pre, names, label


# ---------------------------------------------------------------------------------- the caches


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder (read from the environment at each call):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def torch_cache_dir() -> Path:
    """The folder of torch hub checkpoints, where torchvision and timm keep downloaded weights:
    ``$TORCH_HOME/hub/checkpoints``, else ``~/.cache/torch/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hub_repo_dir(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _hub_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s cached snapshot: the one ``refs/main`` names, else the newest."""
    repo = _hub_repo_dir(repo_id)
    snapshots = repo / "snapshots"
    with suppress(OSError):
        ref = (repo / "refs" / "main").read_text().strip()
        if ref and (snapshots / ref).is_dir():
            return snapshots / ref
    with suppress(OSError):
        found = [p for p in snapshots.iterdir() if p.is_dir()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def _hub_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` in ``repo_id``'s cached snapshot, if any."""
    snapshot = _hub_snapshot(repo_id)
    if snapshot is None:
        return None
    for name in filenames:
        if (snapshot / name).is_file():
            return snapshot / name
    return None


def _no_weights(label: str, where: list[str]) -> ModelLoadError:
    places = " or ".join(where)
    return ModelLoadError(
        f"no weights for {label}: convlens never downloads; give --weights FILE (a state dict "
        f"or .safetensors file), put the library's file at {places}, or pass --random-weights "
        "to try the plumbing (the maps then mean nothing)"
    )


def _require(module: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {label} needs the {module} package, which is not installed: {_INSTALL}"
        ) from exc


def _load_file(net: nn.Module, path: Path, label: str) -> None:
    """Load a weights file strictly, with a hint when the classifier's size differs."""
    from convlens.models.user import load_weights

    try:
        load_weights(net, path, label)
    except ModelLoadError as exc:
        if "shape mismatch" not in str(exc):
            raise
        raise ModelLoadError(
            f"{exc}; for a model fine-tuned to other classes, give --classes with one name per "
            "class"
        ) from exc


def _interpolation(name: object) -> str:
    text = str(name).strip().lower()
    if text in INTERPOLATIONS:
        return text
    log.info("interpolation %r not known; resizing bilinearly", name)
    return "bilinear"


def _square(height: int, width: int, label: str) -> int:
    if height != width:
        raise ModelLoadError(
            f"{label} takes {height}x{width} inputs; convlens preprocesses to square inputs "
            "(give --size)"
        )
    return int(height)


# ----------------------------------------------------------------------------------------- timm


def load_timm(
    name: str,
    *,
    weights: Path | None = None,
    classes: ClassList | None = None,
    random_weights: bool = False,
) -> Loaded:
    """A timm model: ``timm.create_model(name, pretrained=False)``, then its weights.

    Preprocessing is ``timm.data.resolve_data_config`` of the model: the input size, the crop
    (shorter side resized to ``floor(size / crop_pct)``), the interpolation, mean and std.
    Classes are those of the ImageNet subset timm infers for the model (``ImageNetInfo``), with
    their synsets. Cached weights are the pretrained config's file in the Hugging Face hub
    cache (``hf_hub_id``) or in torch's hub checkpoints (``url``), loaded by timm itself from
    that local file (``pretrained_cfg_overlay={"file": ...}``, so its checkpoint filters apply).

    Raises:
        ModelLoadError: timm is missing, the name or tag is unknown, or no weights.
    """
    label = f"timm:{name}"
    timm = _require("timm", label)
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ModelLoadError(
            f"unknown timm model {arch!r}.{close_matches(arch, timm.list_models())}"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown tag
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        hint = close_matches(tag, tags) or (f" Its tags: {', '.join(tags[:8])}." if tags else "")
        raise ModelLoadError(f"timm model {arch!r} has no pretrained tag {tag!r}.{hint}") from exc
    cfg_classes = int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0
    kwargs: dict[str, Any] = {}
    if classes is not None and len(classes) != cfg_classes:
        kwargs["num_classes"] = len(classes)
    if weights is None and not random_weights:
        file = _timm_cached(cfg)
        if file is None:
            raise _no_weights(label, _timm_places(cfg))
        if "num_classes" in kwargs:
            raise ModelLoadError(
                f"the cached weights of {label} score {cfg_classes} classes, the class list "
                f"has {kwargs['num_classes']}; give --weights for a model "
                "fine-tuned to other classes"
            )
        net = _timm_create(timm, name, pretrained=True, file=file)
    else:
        net = _timm_create(timm, name, pretrained=False, **kwargs)
        if weights is not None:
            _load_file(net, weights, label)
    data = timm.data.resolve_data_config(model=net)
    pre = _timm_preprocess(data, label)
    return net, pre, _timm_classes(timm, net), label


def _timm_create(timm: ModuleType, name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    file = kwargs.pop("file", None)
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        where = f" from '{file}'" if file is not None else ""
        raise ModelLoadError(f"timm cannot build {name}{where} ({reason})") from exc


_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm_cached(cfg: Any) -> Path | None:
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        repo, _, _ = hub_id.partition("@")
        named = getattr(cfg, "hf_hub_filename", None)
        found = _hub_file(repo, (named, *_HUB_FILES) if named else _HUB_FILES)
        if found is not None:
            return found
    url = getattr(cfg, "url", None)
    if url:
        path = torch_cache_dir() / os.path.basename(url.split("?", 1)[0])
        if path.is_file():
            return path
    return None


def _timm_places(cfg: Any) -> list[str]:
    places = []
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        repo = cfg.hf_hub_id.partition("@")[0]
        places.append(f"{_hub_repo_dir(repo)}/snapshots/<revision>/model.safetensors")
    if cfg is not None and getattr(cfg, "url", None):
        places.append(str(torch_cache_dir() / os.path.basename(cfg.url.split("?", 1)[0])))
    return places or ["(timm lists no pretrained file for this model)"]


def _timm_preprocess(data: dict[str, Any], label: str) -> Preprocess:
    """timm's data config as a :class:`Preprocess`.

    ``crop_mode`` ``"center"`` is timm's eval transform exactly (PIL resize of the shorter side
    to ``floor(size / crop_pct)``, centre crop); ``"squash"`` and ``"border"`` are approximated
    by it (logged), except that ``crop_pct`` 1 with ``"squash"`` resizes straight to the size.
    """
    _, height, width = data["input_size"]
    crop = _square(height, width, label)
    crop_pct = float(data.get("crop_pct") or 1.0)
    mode = data.get("crop_mode") or "center"
    resize: int | None = math.floor(crop / crop_pct)
    if mode == "squash" and crop_pct == 1.0:
        resize = None
    elif mode != "center":
        log.info("%s: timm crop_mode %r approximated by a centre crop", label, mode)
    return Preprocess(
        resize=resize,
        crop=crop,
        mean=tuple(data["mean"]),  # type: ignore[arg-type]
        std=tuple(data["std"]),  # type: ignore[arg-type]
        interpolation=_interpolation(data.get("interpolation", "bilinear")),
    )


def _timm_classes(timm: ModuleType, net: nn.Module) -> ClassList:
    outputs = int(getattr(net, "num_classes", 0) or 0)
    with suppress(Exception):  # no ImageNet subset known for the model: generic names
        subset = timm.data.infer_imagenet_subset(net)
        if subset:
            info = timm.data.ImageNetInfo(subset)
            if info.num_classes() == outputs:
                return ClassList(
                    tuple(info.label_descriptions()),
                    tuple(info.label_names()),
                    source=f"timm {subset}",
                )
    return ClassList.generic(outputs) if outputs else imagenet_classes()


# ---------------------------------------------------------------------------------- torchvision


def load_torchvision(
    name: str,
    *,
    weights: Path | None = None,
    classes: ClassList | None = None,
    random_weights: bool = False,
) -> Loaded:
    """A torchvision classification model: ``torchvision.models.get_model``.

    ``name`` is the builder's name, optionally with the name of one of its weights
    (``resnet50.IMAGENET1K_V2``; default: the ``DEFAULT`` weights). Preprocessing is those
    weights' ``transforms()`` (resize, crop, interpolation, mean, std) and classes their
    ``meta["categories"]`` (with ImageNet synsets for ImageNet-1k weights); both are local
    metadata. Cached weights are the weights' file in torch's hub checkpoints; torchvision
    loads it from there (it downloads only when the file is absent, which is checked first).

    Raises:
        ModelLoadError: torchvision is missing, the name or weights name is unknown, or no
            weights.
    """
    label = f"torchvision:{name}"
    _require("torchvision", label)
    from torchvision import models

    arch, _, tag = name.partition(".")
    names = models.list_models(module=models)
    if arch not in names:
        raise ModelLoadError(f"unknown torchvision model {arch!r}.{close_matches(arch, names)}")
    enum = models.get_model_weights(arch)
    if tag:
        choice = getattr(enum, tag, None)
        if choice is None:
            tags = [w.name for w in enum]
            raise ModelLoadError(
                f"torchvision model {arch!r} has no weights {tag!r}; its weights: {', '.join(tags)}"
            )
    else:
        choice = enum.DEFAULT
    meta = choice.meta
    categories = tuple(meta["categories"])
    if weights is None and not random_weights:
        file = torch_cache_dir() / os.path.basename(choice.url)
        if not file.is_file():
            raise _no_weights(label, [str(file)])
        if classes is not None and len(classes) != len(categories):
            raise ModelLoadError(
                f"the cached weights of {label} score {len(categories)} classes, the class list "
                f"has {len(classes)}; give --weights for a model fine-tuned to other classes"
            )
        net = models.get_model(arch, weights=choice)
    else:
        outputs = len(classes) if classes is not None else len(categories)
        extra: dict[str, Any] = {}
        if arch.startswith("vit_"):  # the position embedding's size is the weights' input size
            extra["image_size"] = int(meta["min_size"][0])
        net = models.get_model(arch, weights=None, num_classes=outputs, **extra)
        if weights is not None:
            _load_file(net, weights, label)
    return net, _torchvision_preprocess(choice.transforms(), label), _tv_classes(choice), label


def _torchvision_preprocess(transform: Any, label: str) -> Preprocess:
    crop_size = list(transform.crop_size)
    crop = _square(crop_size[0], crop_size[-1], label)
    resize = next(iter(transform.resize_size))
    return Preprocess(
        resize=int(resize),
        crop=crop,
        mean=tuple(transform.mean),  # type: ignore[arg-type]
        std=tuple(transform.std),  # type: ignore[arg-type]
        interpolation=_interpolation(getattr(transform.interpolation, "value", "bilinear")),
    )


def _tv_classes(choice: Any) -> ClassList:
    categories = tuple(str(c) for c in choice.meta["categories"])
    synsets = None
    if len(categories) == 1000 and "IMAGENET1K" in choice.name:
        synsets = imagenet_classes().synsets
    return ClassList(categories, synsets, source=f"torchvision {choice}")


# --------------------------------------------------------------------------------- Hugging Face


class HFClassifier(nn.Module):
    """A Hugging Face image classifier as a network of logits: ``forward(x)`` returns
    ``model(pixel_values=x).logits``. The Hugging Face model is the submodule ``model``, so
    layer names read ``model.vit.layers.0...``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_hf(
    name: str,
    *,
    weights: Path | None = None,
    classes: ClassList | None = None,
    random_weights: bool = False,
) -> Loaded:
    """A Hugging Face image classifier from a local folder (or a model id in the local cache).

    The folder holds ``config.json`` (architecture and ``id2label``), the weights
    (``model.safetensors`` or ``pytorch_model.bin``, loaded with ``from_pretrained(folder,
    local_files_only=True)``) and ``preprocessor_config.json`` (read as JSON: ``size``,
    ``crop_size``/``crop_pct``, ``resample``, ``rescale_factor``, ``image_mean``,
    ``image_std``). A ``weights`` file is read by transformers too (linked into a temporary
    folder), so that checkpoints saved in an older layout are renamed as usual. Every weight of
    the model must come from the file: a missing or resized one is an error, not a random
    start. The network is wrapped in :class:`HFClassifier`.

    Raises:
        ModelLoadError: transformers is missing, the folder or its config is missing or not an
            image classifier, or no weights.
    """
    folder = _hf_folder(name)
    label = f"hf:{name}"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{label}: '{folder}' has no config.json; give a folder written by save_pretrained"
        )
    pre = _hf_preprocess(_read_json(folder / "preprocessor_config.json", label), label)
    transformers = _require("transformers", label)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{label}: cannot read config.json ({_one_line(exc)})") from exc
    auto = transformers.AutoModelForImageClassification
    own = weights is not None or random_weights
    if own and classes is not None and len(classes) != config.num_labels:
        config.num_labels = len(classes)  # a model fine-tuned to other classes
    try:
        if random_weights:
            model = auto.from_config(config)
        elif weights is not None:
            model = _hf_weights_file(transformers, auto, config, weights, label)
        elif any((folder / f).is_file() for f in _HF_WEIGHTS):
            model = _from_pretrained(transformers, auto, folder, config, label, str(folder))
        else:
            raise _no_weights(label, [f"'{folder / 'model.safetensors'}'"])
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{label}: cannot build the model ({_one_line(exc)})") from exc
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model = model.float()
    return HFClassifier(model.eval()), pre, _hf_classes(model.config, folder), label


def _hf_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") == 1 and not path.exists():
        snapshot = _hub_snapshot(name)
        if snapshot is not None:
            return snapshot
    raise ModelLoadError(
        f"hf:{name}: no such folder (nor model id in the cache {hub_cache_dir()}); give a local "
        "folder with config.json, the weights and preprocessor_config.json; convlens never "
        "downloads (e.g. hf download ID --local-dir DIR)"
    )


def _read_json(path: Path, label: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(
            f"{label}: no {path.name} in '{path.parent}'; save the image processor there "
            "(processor.save_pretrained(folder))"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{label}: cannot read '{path}' ({_one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{label}: '{path}' is not a JSON object")
    return data


_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_preprocess(cfg: dict[str, Any], label: str) -> Preprocess:
    """An image processor's configuration as a :class:`Preprocess`.

    Sizes: ``{"height", "width"}`` resizes straight to that (square) size; ``{"shortest_edge"}``
    with ``crop_pct`` (ConvNeXt) resizes the shorter side to ``shortest_edge / crop_pct`` and
    crops ``shortest_edge`` (straight resize from 384 up, as ConvNeXt does); with
    ``do_center_crop`` it crops ``crop_size``. Pixels are ``pixel * rescale_factor``, then
    normalised: with ``x = (u * 255 * r - mean) / std`` for ``u`` in [0, 1], convlens's mean
    and std are ``mean / (255 r)`` and ``std / (255 r)``.
    """
    size = cfg.get("size", 224)
    crop_size = cfg.get("crop_size")
    center = bool(cfg.get("do_center_crop", False)) and crop_size is not None
    resize: int | None
    if isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if cfg.get("crop_pct") is not None:
            resize, crop = (
                (int(edge / float(cfg["crop_pct"])), edge) if edge < 384 else (None, edge)
            )
        elif center:
            resize, crop = edge, _side(crop_size, label)
        else:
            resize, crop = edge, edge
            log.info("%s: no crop after the shorter-side resize; centre-cropped to a square", label)
    else:
        side = _side(size, label)
        resize, crop = None, side
        if center:
            crop = _side(crop_size, label)
            resize = side if crop != side else None
    scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    if cfg.get("do_normalize", True):
        mean = _triple(cfg.get("image_mean", (0.5, 0.5, 0.5)))
        std = _triple(cfg.get("image_std", (0.5, 0.5, 0.5)))
    unit = 255.0 * scale
    return Preprocess(
        resize=resize,
        crop=crop,
        mean=tuple(m / unit for m in mean),  # type: ignore[arg-type]
        std=tuple(s / unit for s in std),  # type: ignore[arg-type]
        interpolation=_PIL_FILTERS.get(int(cfg.get("resample", 2)), "bilinear"),
    )


def _side(size: Any, label: str) -> int:
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return _square(int(size["height"]), int(size["width"]), label)
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        raise ModelLoadError(f"{label}: image size {size!r} not understood")
    if isinstance(size, (list, tuple)):
        return _square(int(size[0]), int(size[-1]), label)
    return int(size)


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if len(values) == 1:
        values *= 3
    return (values[0], values[1], values[2])


def _hf_classes(config: Any, folder: Path) -> ClassList:
    id2label = getattr(config, "id2label", None) or {}
    count = int(getattr(config, "num_labels", len(id2label)))
    labels = {int(k): str(v) for k, v in id2label.items()}
    if sorted(labels) != list(range(count)):
        return ClassList.generic(count)
    return ClassList(tuple(labels[i] for i in range(count)), source=str(folder / "config.json"))


def _hf_weights_file(
    transformers: ModuleType, auto: Any, config: Any, weights: Path, label: str
) -> nn.Module:
    """The model with the weights of one file, read by transformers (which renames the keys of
    checkpoints saved in an older layout): the file is linked into a temporary folder as
    ``model.safetensors`` (a ``.safetensors`` file) or ``pytorch_model.bin`` (a state dict)."""
    from convlens.userfiles import require_file

    require_file(weights, "weights file", error=ModelLoadError)
    name = "model.safetensors" if weights.suffix.lower() == ".safetensors" else "pytorch_model.bin"
    with tempfile.TemporaryDirectory(prefix="convlens-hf-") as tmp:
        link = Path(tmp) / name
        try:
            link.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, link)
        return _from_pretrained(transformers, auto, Path(tmp), config, label, str(weights))


def _from_pretrained(
    transformers: ModuleType, auto: Any, folder: Path, config: Any, label: str, source: str
) -> nn.Module:
    """``from_pretrained`` of a local folder, strictly: every weight of the model from the file
    (transformers would start missing or resized ones at random); without transformers'
    progress bar and load report (the error says what is wrong in one line)."""
    hf_logging = transformers.utils.logging
    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if shown:
            hf_logging.enable_progress_bar()
    problems = []
    for kind, keys in (
        ("missing key", info.get("missing_keys")),
        ("shape mismatch", info.get("mismatched_keys")),
    ):
        names = sorted(k if isinstance(k, str) else str(k[0]) for k in keys or ())
        if names:
            problems.append(f"{len(names)} {kind}(s) ({', '.join(names[:3])})")
    if problems:
        hint = (
            "; for a model fine-tuned to other classes, give --classes with one name per class"
            if info.get("mismatched_keys")
            else ""
        )
        raise ModelLoadError(f"weights '{source}' do not fit {label}: {'; '.join(problems)}{hint}")
    return model


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
