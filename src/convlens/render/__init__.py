"""Rendering of explanations: colour maps, overlays, multi-class composites and figure panels."""

from __future__ import annotations

from convlens.render.overlay import (
    class_colors,
    colorize,
    dominant_class,
    multiclass_composite,
    overlay_map,
    overlay_signed,
    rgb_attribution,
    to_pil,
)
from convlens.render.panels import (
    explanation_figure,
    multiclass_figure,
    save_figure,
    short_name,
    side_by_side_figure,
)

__all__ = [
    "class_colors",
    "colorize",
    "dominant_class",
    "explanation_figure",
    "multiclass_composite",
    "multiclass_figure",
    "overlay_map",
    "overlay_signed",
    "rgb_attribution",
    "save_figure",
    "short_name",
    "side_by_side_figure",
    "to_pil",
]
