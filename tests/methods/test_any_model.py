"""Every registered method works or refuses in one line on the architectures people train:
a vision transformer, a Swin transformer, a ConvNeXt (timm) and a torchvision ViT, besides the
CNNs the rest of the suite covers (issue 16). Generated over the registry: a method added later
is covered without a new test.

Tiny configurations of the libraries' own classes keep this fast; they need the ``zoo`` extra
and skip without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from convlens import get_method, list_methods
from convlens.errors import ConvlensError, ConvlensWarning
from tests.helpers import zoo

#: per method, options that keep the call small on a 32x32 input (the defaults are sized for
#: 224x224 photos)
SMALL = {
    "occlusion": {"patch": 8, "stride": 8},
    "rise": {"masks": 16, "cells": 4, "batch_size": 16},
    "smoothgrad": {"samples": 2},
    "vargrad": {"samples": 2},
    "intgrad": {"steps": 4},
    "scorecam": {"batch_size": 64},
}


MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": zoo.timm_vit,
    "timm-deit-distilled": zoo.timm_deit_distilled,
    "timm-swin": zoo.timm_swin,
    "timm-convnext": zoo.timm_convnext,
    "torchvision-vit": zoo.torchvision_vit,
}


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    return {}


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_method_works_or_refuses_in_one_line(
    arch: str, method: str, built: dict[str, nn.Module]
) -> None:
    if arch not in built:
        torch.manual_seed(0)
        built[arch] = MODELS[arch]().eval()
    net = built[arch]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvlensWarning)  # blank maps of random weights
            result = get_method(method, **SMALL.get(method, {}))(net, x)
    except ConvlensError as exc:
        message = str(exc)
        assert message.strip(), "an empty refusal"
        assert "\n" not in message.strip(), f"not one line: {message!r}"
        assert "Traceback" not in message
    else:
        assert result.maps.shape[0] == 2 and result.maps.shape[-2:] == (32, 32)
        assert torch.isfinite(result.maps).all()
    # the model is left as found
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in net.named_parameters()} == flags
