"""Moved to :mod:`convlens.accel.folded`; this name stays only for
``methods/incremental*.py`` (being split elsewhere) until they import from there."""

from __future__ import annotations

from convlens.accel.folded import batchnorm_affine, inference_copy

__all__ = ["batchnorm_affine", "inference_copy"]
