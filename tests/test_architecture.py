"""Tests of convlens.architecture's layer references: ``name@call`` parsed and resolved in one
place."""

from __future__ import annotations

import pytest
import torch

from convlens.architecture import LayerRef, absolute_call, parse_layer, resolve_call
from convlens.errors import LayerError
from tests.helpers.models import SharedActNet, images, seeded


def test_parse_layer() -> None:
    assert parse_layer("act@-2") == LayerRef("act", -2)
    assert parse_layer("act@1") == LayerRef("act", 1)
    assert parse_layer("blocks.0") == LayerRef("blocks.0", -1)
    assert parse_layer("odd@name") == LayerRef("odd@name", -1)
    ref = LayerRef("x", 2)
    assert parse_layer(ref) is ref and str(ref) == "x@2"


@pytest.mark.parametrize(("spec", "call"), [("act", 2), ("act@-3", 0), ("act@1", 1), ("stem", 0)])
def test_resolve_call_counts_from_the_end_with_one_pass(spec: str, call: int) -> None:
    net = seeded(SharedActNet())
    found = resolve_call(net, spec, images(2, size=6).double())
    assert found.module is getattr(net, parse_layer(spec).name)
    assert found.call == call and found.ref == parse_layer(spec)


def test_resolve_call_from_the_start_runs_nothing() -> None:
    def forward(_x: torch.Tensor) -> None:
        raise AssertionError("no forward pass is needed")

    net = SharedActNet()
    assert resolve_call(net, "act@7", images(1), forward=forward).call == 7


def test_resolve_call_errors() -> None:
    net = seeded(SharedActNet())
    x = images(1, size=6).double()
    with pytest.raises(LayerError, match="Did you mean: 'act'"):
        resolve_call(net, "akt", x)
    with pytest.raises(
        LayerError, match=r"called 3 time\(s\) .* no call -4 \(use 'act@0' .. 'act@2'"
    ):
        resolve_call(net, "act@-4", x)
    with pytest.raises(LayerError, match="not used in the model's forward pass"):
        absolute_call(LayerRef("unused", -1), 0)
    assert absolute_call(LayerRef("act", -1), 3) == 2


def test_captured_call_equals_the_layer_output() -> None:
    net = seeded(SharedActNet())
    x = images(2, size=6).double()
    found = resolve_call(net, "act@-2", x)
    with found.capture() as capture:
        net(x)
    h = torch.relu(net.stem(x))
    torch.testing.assert_close(capture.output(), torch.relu(net.block(h)), rtol=0, atol=0)
