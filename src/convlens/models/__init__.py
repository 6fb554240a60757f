"""Models: built-in pretrained classifiers, user models, preprocessing and class lists."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from convlens.errors import ModelLoadError
from convlens.models.base import ConvlensModel, check_class_count, count_outputs, unwrap
from convlens.models.builtin import BUILTIN_MODELS, load_builtin
from convlens.models.classes import ClassList, imagenet_classes
from convlens.models.preprocess import Preprocess
from convlens.models.zoo import is_zoo_spec

__all__ = [
    "BUILTIN_MODELS",
    "ClassList",
    "ConvlensModel",
    "Preprocess",
    "imagenet_classes",
    "load_model",
    "unwrap",
    "wrap_model",
]


def wrap_model(
    net: nn.Module,
    *,
    classes: ClassList | str | Path | None = None,
    preprocess: Preprocess | None = None,
    name: str = "model",
) -> ConvlensModel:
    """Wrap a user's ``nn.Module`` with preprocessing and class names.

    Args:
        net: the classifier, mapping (B, 3, H, W) to (B, num_classes) logits.
        classes: a :class:`ClassList`, a path to a class-list file, or ``None`` for
            ImageNet names when the model has 1000 outputs (``class i`` names otherwise, decided
            on first use).
        preprocess: defaults to resize 256, crop 224, ImageNet mean/std
            (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
        name: shown in reports.

    The network is run once on a black image of the preprocessing's crop size to count its
    outputs (in eval mode, without gradients; its training flags are restored).

    Raises:
        ModelLoadError: the class list does not have one name per output, or the network fails
            on an input of the preprocessing's crop size.
        TargetError: the class-list file cannot be read.
    """
    if classes is not None and not isinstance(classes, ClassList):
        classes = ClassList.from_file(classes)
    if preprocess is None:
        preprocess = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    outputs = count_outputs(net, preprocess.crop)
    if classes is None:
        classes = _guess_classes(outputs)
    elif outputs is not None:
        check_class_count(classes, outputs)
    return ConvlensModel(net=net, preprocess=preprocess, classes=classes, name=name)


def _guess_classes(outputs: int | None) -> ClassList:
    if outputs is None:
        raise ModelLoadError(
            "the model's output is not a (batch, classes) tensor of logits; convlens explains "
            "image classifiers"
        )
    return imagenet_classes() if outputs == 1000 else ClassList.generic(outputs)


def load_model(
    spec: str | nn.Module = "lite0",
    *,
    weights: str | Path | None = None,
    classes: ClassList | str | Path | None = None,
    preprocess: Preprocess | None = None,
    device: torch.device | str = "cpu",
    random_weights: bool = False,
) -> ConvlensModel:
    """Load a model by name or specification.

    Args:
        spec: ``"lite0"`` (default), ``"lite1"``, ``"lite2"``; a zoo model ``"timm:NAME"``,
            ``"torchvision:NAME"`` or ``"hf:PATH"`` (a local Hugging Face folder; see
            :mod:`convlens.models.zoo`, needs ``pip install convlens[zoo]``); a factory
            ``"path/to/net.py:build"`` or ``"package.module:build"``; a TorchScript file
            (``.pt``/``.pth`` saved with ``torch.jit.save``); or an ``nn.Module``.
        weights: optional state-dict file (``.pt``/``.pth``, or ``.safetensors``) loaded into
            a factory-built or zoo model; a zoo model without it takes the library's locally
            cached weights (never downloaded).
        classes: class list (object or file) for user models; ImageNet for built-ins; the
            library's classes for zoo models unless given (a zoo model is then built with one
            output per class, for its ``weights``).
        preprocess: preprocessing for user models (built-ins and zoo models know their own).
        device: where to put the network.
        random_weights: build a zoo model with random weights, when no weights are at hand,
            to try the plumbing (warns with :class:`~convlens.errors.RandomWeightsWarning`).

    Returns:
        The wrapped model, in eval mode for built-ins and factory models; a given ``nn.Module``
        is left in the mode it is in (methods switch to eval for their call only).

    Raises:
        ModelLoadError: the specification cannot be resolved or loaded, a zoo model has no
            weights (the message says how to supply them) or its library is not installed,
            or the class list does not have one name per output of the model.
        InputError: ``device`` is not a device this machine has (see
            :func:`convlens.validate.parse_device`).
    """
    from convlens.validate import parse_device

    device = parse_device(device)
    if random_weights and not is_zoo_spec(spec):
        raise ModelLoadError(
            "--random-weights is for zoo models (timm:NAME, torchvision:NAME, hf:PATH); "
            f"model {spec if isinstance(spec, str) else type(spec).__name__!r} has its own weights"
        )
    if isinstance(spec, nn.Module):
        return wrap_model(spec, classes=classes, preprocess=preprocess).to(device)
    if is_zoo_spec(spec):
        from convlens.models.zoo import load_zoo

        given = (
            classes
            if classes is None or isinstance(classes, ClassList)
            else ClassList.from_file(classes)
        )
        net, own_pre, own_classes, name = load_zoo(
            spec, weights=weights, classes=given, random_weights=random_weights
        )
        return wrap_model(
            net, classes=given or own_classes, preprocess=preprocess or own_pre, name=name
        ).to(device)
    if spec in BUILTIN_MODELS:
        if weights is not None:
            raise ModelLoadError(f"built-in model {spec!r} takes no --weights")
        model = load_builtin(spec, device=device)
        if classes is not None:
            given = classes if isinstance(classes, ClassList) else ClassList.from_file(classes)
            check_class_count(given, len(model.classes))  # the built-ins' ImageNet outputs
            model.classes = given
        if preprocess is not None:
            model.preprocess = preprocess
        return model
    from convlens.models.user import load_user_network

    net, name = load_user_network(spec, weights=weights)
    return wrap_model(net, classes=classes, preprocess=preprocess, name=name).to(device)
