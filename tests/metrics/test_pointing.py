"""Localisation scores (convlens.metrics.pointing) on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from convlens.metrics import boxes_to_masks, energy_share, pointing_game


def _mask(rows: slice, cols: slice, size: int = 6) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[rows, cols] = True
    return m


def test_pointing_game_strict_and_tolerant() -> None:
    mask = _mask(slice(1, 3), slice(1, 3))  # pixels (1..2, 1..2)
    maps = torch.zeros(4, 6, 6)
    maps[0, 2, 2] = 1.0  # on the object
    maps[1, 2, 4] = 1.0  # two columns right of (2, 2): distance 2
    maps[2, 5, 5] = 1.0  # distance sqrt(9 + 9) ~ 4.24 from (2, 2)
    maps[3, 4, 4] = 1.0  # distance sqrt(4 + 4) ~ 2.83
    masks = mask.expand(4, 6, 6)
    assert pointing_game(maps, masks, tolerance=0).tolist() == [True, False, False, False]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [True, True, False, False]
    assert pointing_game(maps, masks, tolerance=3).tolist() == [True, True, False, True]
    assert pointing_game(maps, masks, tolerance=5).tolist() == [True, True, True, True]


def test_pointing_game_first_maximum_in_raster_order() -> None:
    maps = torch.ones(1, 6, 6)  # every pixel a maximum: (0, 0) is taken
    assert pointing_game(maps, _mask(slice(0, 1), slice(0, 1))[None], tolerance=0).tolist() == [
        True
    ]
    assert pointing_game(maps, _mask(slice(5, 6), slice(5, 6))[None], tolerance=0).tolist() == [
        False
    ]


def test_energy_share_hand_computed() -> None:
    mask = _mask(slice(0, 2), slice(0, 2))
    maps = torch.zeros(3, 6, 6)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 5, 5] = 3.0, 1.0, 4.0  # (3 + 1) / 8 = 0.5
    maps[1, 0, 0], maps[1, 4, 4], maps[1, 5, 5] = 2.0, -5.0, 6.0  # negatives ignored: 2 / 8
    maps[2] = -1.0  # no positive mass: 0
    share = energy_share(maps, mask.expand(3, 6, 6))
    assert share.tolist() == pytest.approx([0.5, 0.25, 0.0])


def test_energy_share_of_constant_map_is_area_share() -> None:
    masks = boxes_to_masks(torch.tensor([[0, 0, 3, 2], [1, 1, 6, 6]]), (6, 6))
    share = energy_share(torch.full((2, 6, 6), 0.7), masks)
    assert share.tolist() == pytest.approx([6 / 36, 25 / 36])


def test_energy_share_scale_invariant_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 8, 8, generator=g)
    masks = torch.rand(5, 8, 8, generator=g) > 0.6
    share = energy_share(maps, masks)
    assert torch.allclose(share, energy_share(maps * 37.0, masks))
    assert bool(((share >= 0) & (share <= 1)).all())
    pos = maps.clamp(min=0)
    expected = (pos * masks).sum((1, 2)) / pos.sum((1, 2))
    assert torch.allclose(share, expected)


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ"):
        energy_share(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
