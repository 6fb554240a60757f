"""Placeholder ``torchvision.transforms.functional`` (see the package docstring)."""

from __future__ import annotations

from typing import Any, NoReturn


def resize(*args: Any, **kwargs: Any) -> NoReturn:
    """Placeholder; raises when called."""
    raise RuntimeError("torchvision stub: transforms.functional.resize is not available")
