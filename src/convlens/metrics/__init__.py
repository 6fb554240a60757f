"""Trusting the maps: faithfulness metrics and sanity checks."""

from __future__ import annotations

from convlens.metrics.evaluate import EvaluationTable, baseline_map, evaluate_methods
from convlens.metrics.faithfulness import (
    DEFAULT_STEPS,
    Curves,
    average_drop,
    deletion_insertion,
    deletion_insertion_many,
    ranking,
)
from convlens.metrics.pointing import boxes_to_masks, energy_share, pointing_game
from convlens.metrics.sanity import (
    SanityResult,
    cascading_randomization,
    map_similarity,
    parameter_layers,
    relative_range,
)

__all__ = [
    "DEFAULT_STEPS",
    "Curves",
    "EvaluationTable",
    "SanityResult",
    "average_drop",
    "baseline_map",
    "boxes_to_masks",
    "cascading_randomization",
    "deletion_insertion",
    "deletion_insertion_many",
    "energy_share",
    "evaluate_methods",
    "map_similarity",
    "parameter_layers",
    "pointing_game",
    "ranking",
    "relative_range",
]
