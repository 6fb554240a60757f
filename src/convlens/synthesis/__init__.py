"""Image synthesis: class model visualisation, channel/neuron visualisation and DeepDream; and
images whose cause is known (``known_cause``) with the tiny networks trained on them
(``tiny_models``), for scoring maps against the truth; and the same images with a planted
spurious cue (``planted_cause``), for scoring failure-mode analysis.

Public API::

    from convlens.synthesis import class_visualization, channel_visualization, deep_dream

    res = class_visualization(model, ["tabby cat", 281])        # SynthesisResult
    res = channel_visualization(model, "_blocks.8", range(16))  # SynthesisResult
    dream = deep_dream(model, photo, "_blocks.8")               # DreamResult

Papers: Simonyan et al. 2013 (class models), Yosinski et al. 2015 (regularised pixel
optimisation), Mordvintsev et al. 2015 (DeepDream), Olah et al. 2017 (Fourier and decorrelated
parameterisation, transformation robustness). See ``docs/synthesis.md``.
"""

from __future__ import annotations

from convlens.synthesis.classviz import class_visualization
from convlens.synthesis.dream import deep_dream, octave_sizes
from convlens.synthesis.featviz import channel_visualization
from convlens.synthesis.known_cause import SHAPES, KnownCauseBatch, known_cause_batch
from convlens.synthesis.objectives import (
    ChannelMean,
    ClassScore,
    DreamL2,
    LayerReader,
    Neuron,
    Objective,
)
from convlens.synthesis.optimize import (
    PRESETS,
    SynthesisSettings,
    gaussian_blur,
    optimize_images,
    resolve_settings,
)
from convlens.synthesis.parameterization import (
    COLOR_CORRELATION_SVD_SQRT,
    FourierImage,
    ImageParam,
    PixelImage,
    color_matrix,
    decorrelate_colors,
    fourier_scale,
    recorrelate_colors,
)
from convlens.synthesis.planted_cause import (
    PlantedCauseBatch,
    planted_cause_batch,
    train_planted_cause,
)
from convlens.synthesis.result import DreamResult, SynthesisResult, image_grid, to_pil
from convlens.synthesis.tiny_models import TinyCNN, TinyViT, tiny_model, train_known_cause
from convlens.synthesis.transforms import (
    Compose,
    RandomTransform,
    Transform,
    random_roll,
    standard_transforms,
)

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "PRESETS",
    "SHAPES",
    "ChannelMean",
    "ClassScore",
    "Compose",
    "DreamL2",
    "DreamResult",
    "FourierImage",
    "ImageParam",
    "KnownCauseBatch",
    "LayerReader",
    "Neuron",
    "Objective",
    "PixelImage",
    "PlantedCauseBatch",
    "RandomTransform",
    "SynthesisResult",
    "SynthesisSettings",
    "TinyCNN",
    "TinyViT",
    "Transform",
    "channel_visualization",
    "class_visualization",
    "color_matrix",
    "decorrelate_colors",
    "deep_dream",
    "fourier_scale",
    "gaussian_blur",
    "image_grid",
    "known_cause_batch",
    "octave_sizes",
    "optimize_images",
    "planted_cause_batch",
    "random_roll",
    "recorrelate_colors",
    "resolve_settings",
    "standard_transforms",
    "tiny_model",
    "to_pil",
    "train_known_cause",
    "train_planted_cause",
]
