"""What failure modes add to an ``analyze`` run that already explains its mistakes (issue 18:
"< 10%"), counted as images through the network rather than timed (timings live in
``benchmarks/RESULTS_FAILURE_MODES.md``): the features come from the prediction pass itself,
the clustering and the decomposition use no network, and the pages make one bounded pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from convlens.accel import Acceleration
from convlens.analysis import analyze
from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from tests.helpers.models import tiny_net_source
from tests.helpers.runs import CLASSES, write_class_images


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(tiny_net_source(seed=1))
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    write_class_images(tmp_path / "data", per_class=8, shape=(36, 36), step=20)
    return tmp_path


def plain_model(d: Path) -> ConvlensModel:
    """The tiny model on the plain path: every pass of every stage goes through ``model.net``
    itself (no folded or compiled copy the count below would miss)."""
    model = load_model(
        f"{d / 'net.py'}:build", classes=d / "labels.txt", preprocess=Preprocess(resize=36, crop=32)
    )
    model.accel = Acceleration.plain()
    return model


@contextmanager
def counting(net: nn.Module) -> Iterator[list[int]]:
    """Images through ``net`` while inside (a forward pre-hook, removed on exit)."""
    seen = [0]

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen[0] += int(args[0].shape[0])

    handle = net.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def images_through_the_network(d: Path, out: str, failure_modes: bool) -> tuple[int, Any]:
    model = plain_model(d)
    with counting(model.net) as seen:
        result = analyze(
            model,
            d / "data",
            d / out,
            methods="gradcam",
            batch_size=6,
            top_errors=4,
            faithfulness=True,
            failure_modes=failure_modes,
            progress=False,
        )
    return seen[0], result


def test_failure_modes_add_under_a_tenth_of_the_network_work(data: Path) -> None:
    base, without = images_through_the_network(data, "without", failure_modes=False)
    total, result = images_through_the_network(data, "with", failure_modes=True)
    assert result.failure_modes, "the tiny model should make mistakes to cluster"
    assert result.metrics["failure_modes"]["features_recomputed"] == 0
    assert without.explanations, "the run explains its mistakes"
    extra = total - base
    # the pages' one pass: at most the images they show (top images of the channels shown and
    # the representatives), never the data set again
    assert 0 < extra < len(result.predictions)
    assert extra < 0.1 * base, (extra, base)
