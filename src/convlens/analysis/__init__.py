"""Error analysis over a labelled image set: streaming predictions, metrics, explained mistakes.

Example:
    >>> from convlens import load_model
    >>> from convlens.analysis import analyze
    >>> result = analyze(load_model("lite0"), "val/", "run/", methods=("gradcam", "occlusion"))
    >>> result.metrics["top1"], result.report
"""

from __future__ import annotations

from convlens.analysis.run import AnalysisResult, analyze
from convlens.analysis.stats import compute_metrics, expected_calibration_error
from convlens.analysis.store import Prediction, PredictionStore

__all__ = [
    "AnalysisResult",
    "Prediction",
    "PredictionStore",
    "analyze",
    "compute_metrics",
    "expected_calibration_error",
]
