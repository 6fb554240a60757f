"""The Zeiler & Fergus feature browser: what each channel of a layer responds to in a dataset.

Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional Networks", §2 and Fig. 2)
show, for a feature map, its 9 strongest activations over a dataset, each projected back into
pixel space with the deconvnet, next to the image patches under those activations. Two steps:

1. :func:`scan_features` streams once over an image folder (a ``DataLoader``, batched, with
   memory independent of the folder's size) and keeps, for every channel of every requested
   layer, the ``k`` images where it fires most (:class:`~convlens.features.topk.RunningTopK`).
   All layers are captured by forward hooks in one forward pass per batch.
2. :func:`feature_examples` / :func:`render_features` project each of those activations into
   pixel space alone (:func:`convlens.methods.rules.project_units`, deconvnet rule by default),
   crop projection and image around the unit, within its receptive field
   (:func:`~convlens.features.receptive_field.receptive_field`), and write one grid PNG per layer
   and an ``index.html`` that works offline.

The steps live in :mod:`convlens.features.scan`, :mod:`convlens.features.project` and
:mod:`convlens.features.render` (page: :mod:`convlens.features.html`), the result types in
:mod:`convlens.features.results`; this module gathers their public names.

Models without max pooling (EfficientNet, MobileNet) make the deconvnet ignore the image: its
only image-dependent step is unpooling with the max-pool switches. The page says so when it
happens; ``rule="guided"`` (Springenberg et al. 2015) then shows image-specific projections.

Example:
    >>> import convlens
    >>> from convlens.features import scan_features, render_features
    >>> from convlens.images import list_images
    >>> model = convlens.load_model("lite0")
    >>> files = list_images("photos/")                                     # doctest: +SKIP
    >>> scan = scan_features(model, files, ["_blocks.1", "_swish"])         # doctest: +SKIP
    >>> render_features(scan, model, "features-out")                       # doctest: +SKIP
"""

from __future__ import annotations

from convlens.features.project import Crop, feature_examples
from convlens.features.render import render_features
from convlens.features.results import (
    ChannelExamples,
    ChannelSpec,
    FeatureExample,
    FeatureScan,
    LayerScan,
    Progress,
    TopActivation,
)
from convlens.features.scan import parse_channels, scan_features

__all__ = [
    "ChannelExamples",
    "ChannelSpec",
    "Crop",
    "FeatureExample",
    "FeatureScan",
    "LayerScan",
    "Progress",
    "TopActivation",
    "feature_examples",
    "parse_channels",
    "render_features",
    "scan_features",
]
