"""convlens: see what a convolutional image classifier looks at, and why it gets images wrong.

Example:
    >>> import convlens
    >>> model = convlens.load_model()                      # EfficientNet-Lite0, ImageNet
    >>> x = model.load_images(["cat.jpg", "cup.jpg"])      # (2, 3, 224, 224)
    >>> maps = convlens.explain(model, x, ["saliency", "occlusion", "cam", "gradcam"])
    >>> maps["gradcam"].maps.shape                         # (B, K, H, W)
    torch.Size([2, 1, 224, 224])
"""

from __future__ import annotations

from convlens.accel import Acceleration
from convlens.api import explain
from convlens.errors import (
    BlankMapWarning,
    ConvlensError,
    ImageError,
    InferenceModeError,
    InputError,
    LayerError,
    ModelLoadError,
    NonFiniteError,
    NonFiniteMapWarning,
    RandomWeightsWarning,
    TargetError,
    UnsupportedModelError,
)
from convlens.methods import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    GradientXInput,
    Method,
    Occlusion,
    Saliency,
    SmoothGrad,
    get_method,
    list_methods,
)
from convlens.models import ClassList, ConvlensModel, Preprocess, load_model, wrap_model
from convlens.result import Explanation

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "Acceleration",
    "BlankMapWarning",
    "ClassList",
    "ConvlensError",
    "ConvlensModel",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientXInput",
    "ImageError",
    "InferenceModeError",
    "InputError",
    "LayerError",
    "Method",
    "ModelLoadError",
    "NonFiniteError",
    "NonFiniteMapWarning",
    "Occlusion",
    "Preprocess",
    "RandomWeightsWarning",
    "Saliency",
    "SmoothGrad",
    "TargetError",
    "UnsupportedModelError",
    "explain",
    "get_method",
    "list_methods",
    "load_model",
    "wrap_model",
]
