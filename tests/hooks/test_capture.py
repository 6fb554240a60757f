"""Tests of convlens.hooks.capture: finding a layer by name, capturing one call of it, and
ending the forward pass there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens import get_method
from convlens.errors import LayerError
from convlens.hooks import StopForward, capture_call, named_module, stoppable
from convlens.hooks.capture import layer_capture
from convlens.layers import resolve_layer
from tests.helpers.models import GapNet, SharedActNet, images, seeded


class Swallowing(nn.Module):
    """Catches ``Exception`` around its first layer (as some model code does), and records
    whether the layers after it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)
        self.after = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            x = self.conv(x)
        except Exception:
            x = torch.zeros(x.shape[0], 4, *x.shape[2:], dtype=x.dtype)
        self.after += 1
        return self.head(self.relu(x))


def test_named_module_is_the_one_name_resolver() -> None:
    net = SharedActNet()
    assert named_module(net, " head ") is net.head
    assert resolve_layer(net, "head") is named_module(net, "head")
    for bad, match in [
        ("haed", r"Did you mean: 'head'"),
        ("head.weight", r"'head\.weight' is a parameter or buffer of layer 'head'"),
        ("", "empty layer name"),
    ]:
        with pytest.raises(LayerError, match=match):
            named_module(net, bad)


def test_capture_call_stops_after_the_call_even_if_the_model_catches_exceptions() -> None:
    net = seeded(Swallowing())
    x = images(2, size=6).double()
    with capture_call(net.conv, "conv", 0) as capture:
        out = net(x)
        raise AssertionError(f"the forward pass went on and returned {tuple(out.shape)}")
    assert net.after == 0
    torch.testing.assert_close(capture.output(), net.conv(x), rtol=0, atol=0)
    assert capture.calls == 1
    assert not net.conv._forward_hooks


def test_capture_call_without_stop_keeps_the_output_from_later_in_place_ops() -> None:
    net = seeded(SharedActNet())
    x = images(2, size=6).double()
    with capture_call(net.stem, "stem", 0, stop=False) as capture:
        logits = net(x)
    torch.testing.assert_close(logits, net(x), rtol=0, atol=0)
    expected = net.stem(x)
    assert (expected < 0).any()  # the in-place ReLU after the layer would have changed it
    torch.testing.assert_close(capture.output(), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("call", "match"), [(3, "called 3 time.* no call 3 .*'act@2'")])
def test_capture_call_reports_a_call_never_reached(call: int, match: str) -> None:
    net = seeded(SharedActNet())
    with capture_call(net.act, "act", call) as capture:
        net(images(1, size=6).double())
    assert capture.calls == 3
    with pytest.raises(LayerError, match=match):
        capture.output()
    with pytest.raises(LayerError, match="counted from 0"), capture_call(net.act, "act", -1):
        pass


def test_stoppable_ends_only_the_block() -> None:
    ran = []
    with stoppable():
        ran.append(1)
        raise StopForward
    ran.append(2)
    assert ran == [1, 2]
    assert not issubclass(StopForward, Exception)  # model code catching Exception lets it pass


def test_grad_capture_restores_the_grad_mode() -> None:
    """``layer_capture(grad=True)`` records gradients from the layer on and restores the mode
    of the block's start: after a normal pass, a pass that raises, and one that never reaches
    the layer; and Grad-CAM leaves the caller's mode as it was."""
    net, x = seeded(GapNet()).eval(), images(2)

    class Boom(nn.Module):
        def forward(self, _x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    for grad_before in (False, True):
        with torch.set_grad_enabled(grad_before):
            with torch.no_grad(), layer_capture(net, "conv2", grad=True) as cap:
                out = net(x)
                assert torch.is_grad_enabled()  # from the layer on
                assert out.requires_grad and cap.output().requires_grad
            assert torch.is_grad_enabled() is grad_before
            bad = nn.Sequential(net.conv1, Boom())
            try:
                with torch.no_grad(), layer_capture(bad, "0", grad=True):
                    bad(x)
            except RuntimeError:
                pass
            assert torch.is_grad_enabled() is grad_before
            with torch.no_grad(), layer_capture(net, "fc", grad=True):
                net.features(x)  # the layer is never reached
            assert torch.is_grad_enabled() is grad_before
            get_method("gradcam")(net, x)
            assert torch.is_grad_enabled() is grad_before
