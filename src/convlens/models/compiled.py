"""Moved to :mod:`convlens.accel.compiled`; this name stays only for
``methods/incremental*.py`` (being split elsewhere) until they import from there."""

from __future__ import annotations

from convlens.accel.compiled import FixedBatchForward, compiled_forward

__all__ = ["FixedBatchForward", "compiled_forward"]
