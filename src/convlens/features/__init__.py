"""Feature-level tools: where a layer's units look in the input image."""

from __future__ import annotations

from convlens.features.receptive_field import ReceptiveField, receptive_field

__all__ = ["ReceptiveField", "receptive_field"]

# The Zeiler & Fergus feature browser (running top-k, dataset scan, projections, rendering).
from convlens.features.browser import (
    ChannelExamples,
    FeatureExample,
    FeatureScan,
    LayerScan,
    TopActivation,
    feature_examples,
    parse_channels,
    render_features,
    scan_features,
)
from convlens.features.topk import RunningTopK

__all__ += [
    "ChannelExamples",
    "FeatureExample",
    "FeatureScan",
    "LayerScan",
    "RunningTopK",
    "TopActivation",
    "feature_examples",
    "parse_channels",
    "render_features",
    "scan_features",
]
