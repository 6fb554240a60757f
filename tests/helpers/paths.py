"""Where the tests find the repository and the optional shared data.

The shared data (ImageNet sample photos, the default model's weights cache) lives in
``../shared/data`` beside the repository, or wherever ``CONVLENS_SHARED_DATA`` points (e.g. on a
GPU box); tests that need it skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEV_IMAGES", "REPO", "SHARED"]

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the folder holding ``src/`` and ``tests/``)."""

SHARED = Path(os.environ.get("CONVLENS_SHARED_DATA") or REPO.parent / "shared" / "data")
"""The shared data folder: ``$CONVLENS_SHARED_DATA``, else ``../shared/data``."""

DEV_IMAGES = SHARED / "imagenet-sample-dev"
"""ImageNet sample photos with their labels (the real-photo tests skip without them)."""
