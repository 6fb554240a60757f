"""Stub of ``torchvision`` for the peer benchmark only (``benchmarks/bench_peers.py``).

pytorch-grad-cam imports torchvision at module level in image/preprocessing helpers
(``utils/image.py``: ``Compose``, ``Normalize``, ``ToTensor``; ``sess.py``: ``resize``;
``utils/model_targets.py``: ``torchvision.ops`` for detection targets). None of them is used
by GradCAM, GradCAMPlusPlus, ScoreCAM or AblationCAM on a classifier, and PyPI's torchvision
does not import beside torch 2.13.0 here. This stub lets the package import; every
placeholder raises if it is ever called. It is put on ``sys.path`` only inside the benchmark
script, and only when the real torchvision is missing.
"""

from __future__ import annotations

from typing import Any, NoReturn

__version__ = "0.0.0+stub"
STUB = True


def _unavailable(name: str) -> NoReturn:
    raise RuntimeError(f"torchvision stub: {name} is not available in the peer benchmark")


class _Ops:
    """Placeholder for ``torchvision.ops``."""

    def __getattr__(self, name: str) -> Any:
        _unavailable(f"torchvision.ops.{name}")


ops = _Ops()
