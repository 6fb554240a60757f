"""Tests of convlens.models.preprocess: the resampling filter of the resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.errors import InputError
from convlens.models.preprocess import INTERPOLATIONS, Preprocess


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))


def _by_hand(image: Image.Image, resample: Image.Resampling) -> torch.Tensor:
    """Shorter side 30 -> 20 (40 -> 27), centre crop 16, scaled to [0, 1], PIL doing the resize."""
    small = image.resize((27, 20), resample).crop((5, 2, 21, 18))
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_default_is_bilinear_and_each_filter_is_pils() -> None:
    image = _photo()
    assert Preprocess().interpolation == "bilinear"
    identity = {"mean": (0.0,) * 3, "std": (1.0,) * 3}
    default = Preprocess(resize=20, crop=16, **identity)
    torch.testing.assert_close(default(image), _by_hand(image, Image.Resampling.BILINEAR))
    outputs = []
    for name, resample in INTERPOLATIONS.items():
        pre = Preprocess(resize=20, crop=16, interpolation=name, **identity)
        torch.testing.assert_close(pre(image), _by_hand(image, resample))
        torch.testing.assert_close(pre.to_unit(image), _by_hand(image, resample))
        outputs.append(pre(image))
    assert not torch.equal(outputs[1], outputs[2])  # bilinear and bicubic differ
    squash = Preprocess(resize=None, crop=16, interpolation="BICUBIC", **identity)
    assert squash.interpolation == "bicubic"
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32)
    torch.testing.assert_close(squash(image), torch.from_numpy(expected / 255).permute(2, 0, 1))


def test_unknown_filter_is_one_line() -> None:
    with pytest.raises(InputError, match="interpolation must be one of nearest, bilinear"):
        Preprocess(interpolation="trilinear")
