"""Session setup of the suite and the fixtures of the shared tiny models.

The models, oracles and paths themselves live in :mod:`tests.helpers`; import them from there
(test files never import ``conftest`` or each other).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.models import GapNet, LinearNet, NoGapNet, SharedActNet, seeded

# One torch thread for the whole suite. The tests run thousands of tiny operations; with two
# OpenMP threads on a 2-core machine that other processes also use, each parallel region waits
# for a descheduled spinning thread: measured 418 s for the suite (one receptive-field test 88 s
# alone) against 67 s with one thread under the same load; on a quiet machine 54 s vs 67 s.
torch.set_num_threads(1)


@pytest.fixture
def gap_net() -> GapNet:
    return seeded(GapNet())  # type: ignore[return-value]


@pytest.fixture
def shared_net() -> SharedActNet:
    return seeded(SharedActNet(), seed=1)  # type: ignore[return-value]


@pytest.fixture
def nogap_net() -> NoGapNet:
    return seeded(NoGapNet(), seed=2)  # type: ignore[return-value]


@pytest.fixture
def linear_net() -> LinearNet:
    return seeded(LinearNet(), seed=3)  # type: ignore[return-value]


# Tests that start a Ray cluster run one after another in one pytest-xdist worker: two clusters
# at once would each take the machine's cores for their nodes and actors.
_ONE_WORKER = {"test_engine_ray.py": "ray"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = _ONE_WORKER.get(item.path.name)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
