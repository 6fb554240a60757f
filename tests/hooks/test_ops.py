"""Tests of convlens.hooks.ops: the one table of ReLU-like functions that the torch-function
modes (backward rules, lean input gradients, straight-through receptive fields) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from convlens.accel.lean_graph import input_gradient_mode
from convlens.features.receptive_field import _ELEMENTWISE
from convlens.hooks import backprop_rule, ops

X = torch.tensor([-2.0, -0.5, 0.5, 1.5, 3.0], dtype=torch.float64)
R = torch.tensor([1.0, -1.0, -2.0, 3.0, 1.0], dtype=torch.float64)  # incoming signal
FORMS: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
    ("F.relu", F.relu),
    ("F.relu inplace", lambda t: F.relu(t, inplace=True)),
    ("torch.relu", torch.relu),
    ("torch.relu_", torch.relu_),
    ("Tensor.relu_", torch.Tensor.relu_),
    ("torch.clamp", lambda t: torch.clamp(t, 0)),
    ("torch.clip", lambda t: torch.clip(t, min=0)),
    ("torch.clip_", lambda t: torch.clip_(t, 0)),
    ("Tensor.clip_", lambda t: t.clip_(0)),
    ("torch.clamp_min_", lambda t: torch.clamp_min_(t, 0)),
    ("F.hardtanh", lambda t: F.hardtanh(t, 0.0, 2.0)),
    ("F.relu6", F.relu6),
]


@pytest.mark.parametrize(("name", "unit"), FORMS, ids=[n for n, _ in FORMS])
def test_every_form_gets_the_rule(name: str, unit: Callable[[torch.Tensor], Any]) -> None:
    """Guided backpropagation, ``ReLU(R) * [0 < x < upper]``, whichever way the unit is written
    (torch.clip_ was missing from the rule's own table)."""
    upper = 2.0 if "hardtanh" in name else 6.0 if "relu6" in name else float("inf")
    x = X.clone().requires_grad_(True)
    with backprop_rule("guided") as mode:
        out = unit(x * 1.0)
    (got,) = torch.autograd.grad(out, x, R)
    expected = R.clamp(min=0) * ((X > 0) & (upper > X))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert mode.count == 1


@pytest.mark.parametrize(("name", "unit"), FORMS, ids=[n for n, _ in FORMS])
def test_lean_graph_equals_autograd_on_every_form(
    name: str, unit: Callable[[torch.Tensor], Any]
) -> None:
    x = X.clone().requires_grad_(True)
    with input_gradient_mode() as mode:
        out = unit(x * 1.0)
    (got,) = torch.autograd.grad(out, x, R)
    x2 = X.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(unit(x2 * 1.0), x2, R)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert mode.count == 1


def test_tables_are_consistent() -> None:
    inplace = ops.RELU_INPLACE | ops.CLAMP_INPLACE | ops.CLAMP_MIN_INPLACE | ops.CLAMP_MAX_INPLACE
    assert set(ops.OUT_OF_PLACE) == inplace
    out_of_place = ops.RELU | ops.CLAMP | ops.CLAMP_MIN | ops.CLAMP_MAX
    assert set(ops.OUT_OF_PLACE.values()) <= out_of_place
    for func, plain in ops.OUT_OF_PLACE.items():
        assert func.__name__ == plain.__name__ + "_"
    # The straight-through mode of receptive fields reads the same table.
    assert set(_ELEMENTWISE) == inplace | out_of_place
    assert {f: p for f, p in _ELEMENTWISE.items() if p is not None} == ops.OUT_OF_PLACE
