"""Placeholder ``torchvision.transforms`` (see the package docstring): classes that raise."""

from __future__ import annotations

from typing import Any, NoReturn


def _unavailable(name: str) -> NoReturn:
    raise RuntimeError(f"torchvision stub: transforms.{name} is not available")


class Compose:
    """Placeholder; raises when constructed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _unavailable("Compose")


class Normalize:
    """Placeholder; raises when constructed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _unavailable("Normalize")


class ToTensor:
    """Placeholder; raises when constructed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _unavailable("ToTensor")
