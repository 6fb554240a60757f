"""Feature-level tools: where a layer's units look in the input image."""

from __future__ import annotations

from convlens.features.receptive_field import ReceptiveField, receptive_field

__all__ = ["ReceptiveField", "receptive_field"]
