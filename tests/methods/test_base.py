"""The method interface's pace hook: progress of long methods, and stopping them."""

from __future__ import annotations

import pytest
import torch

from convlens.methods import get_method
from convlens.methods.base import Cancelled, pace_listener
from tests.helpers.models import GapNet, images, seeded

# each with options giving several chunks on a 12 x 12 batch of 2
LONG = {
    "occlusion": {"patch": 4, "stride": 2, "batch_size": 5, "mode": "naive"},
    "rise": {"masks": 40, "batch_size": 8, "cells": 3},
    "scorecam": {"batch_size": 2},
    "ablationcam": {"batch_size": 2, "exact": "never"},
    "intgrad": {"steps": 12, "batch_size": 4},
    "smoothgrad": {"samples": 6, "batch_size": 2},
}


@pytest.mark.parametrize("name", sorted(LONG))
def test_progress_rises_to_the_end(name: str) -> None:
    net = seeded(GapNet())
    seen: list[float | None] = []
    with pace_listener(seen.append):
        get_method(name, **LONG[name])(net, images(2))
    fractions = [f for f in seen if f is not None]
    assert len(fractions) >= 3
    assert fractions[0] == 0.0
    assert all(0.0 <= f < 1.0 for f in fractions)
    assert fractions == sorted(fractions)


def test_listener_is_per_thread_and_removed_after() -> None:
    net = seeded(GapNet())
    seen: list[float | None] = []
    with pace_listener(seen.append):
        pass
    get_method("rise", **LONG["rise"])(net, images(2))
    assert seen == []


@pytest.mark.parametrize("name", ["occlusion", "rise", "scorecam"])
def test_cancelled_stops_and_leaves_the_model_as_found(name: str) -> None:
    net = seeded(GapNet())
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    calls = 0

    def stop_at_third(fraction: float | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Cancelled

    with pace_listener(stop_at_third), pytest.raises(Cancelled):
        get_method(name, **LONG[name])(net, images(2))
    assert calls == 3  # nothing after the stop
    assert net.training
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    out = get_method(name, **LONG[name])(net, images(2))  # works again afterwards
    assert torch.isfinite(out.maps).all()
