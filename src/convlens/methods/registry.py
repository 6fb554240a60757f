"""The one registry of explanation methods: name -> class. The CLI, docs and tests read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from convlens.errors import ConvlensError, close_matches

if TYPE_CHECKING:
    from convlens.methods.base import Method

__all__ = ["METHODS", "get_method", "list_methods", "register"]

METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator adding a method under ``name``.

    Raises:
        ValueError: the name is already taken.
    """

    def add(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"method name {name!r} is already registered by {METHODS[name]}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(METHODS)


def get_method(name: str, **options: Any) -> Method:
    """An instance of the method called ``name``, configured with ``options``.

    Raises:
        ConvlensError: unknown name (close matches listed).
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConvlensError(
            f"unknown method {name!r}.{close_matches(name, METHODS)} "
            f"Available: {', '.join(METHODS)}"
        ) from None
    return cls(**options)
