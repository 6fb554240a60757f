"""Tiny deterministic models shared by the tests, and paths to the optional shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

# One torch thread for the whole suite. The tests run thousands of tiny operations; with two
# OpenMP threads on a 2-core machine that other processes also use, each parallel region waits
# for a descheduled spinning thread: measured 418 s for the suite (one receptive-field test 88 s
# alone) against 67 s with one thread under the same load; on a quiet machine 54 s vs 67 s.
torch.set_num_threads(1)

# ../shared/data beside the repository; CONVLENS_SHARED_DATA points elsewhere (e.g. on a GPU box).
SHARED = Path(
    os.environ.get("CONVLENS_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
DEV_IMAGES = SHARED / "imagenet-sample-dev"


class GapNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> BN -> ReLU -> global average pool -> dropout -> linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn(self.conv2(self.relu1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


class SharedActNet(nn.Module):
    """One ReLU module called three times with different shapes (as EfficientNet does), and a
    functional mean instead of a pooling module."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.block = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 7, 1)
        self.fc = nn.Linear(7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = x + self.act(self.block(x))
        x = self.act(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class NoGapNet(nn.Module):
    """conv -> ReLU -> flatten -> linear: no global average pooling, so no CAM."""

    def __init__(self, size: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


class LinearNet(nn.Module):
    """logits = W vec(x) + b: every gradient is a row of W, worked out by hand."""

    def __init__(self, size: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Identity()
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def seeded(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


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


def images(b: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
