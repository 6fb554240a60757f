"""Explanation methods, grouped by how they work; importing this package registers them all."""

from __future__ import annotations

from convlens.methods.base import Context, Method, RawResult
from convlens.methods.cam import (
    CAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from convlens.methods.cam_forward import AblationCAM, ScoreCAM
from convlens.methods.gradient import GradientXInput, IntegratedGradients, Saliency
from convlens.methods.perturbation import RISE, Occlusion
from convlens.methods.registry import METHODS, get_method, list_methods, register
from convlens.methods.rules import Deconvnet, GuidedBackprop, GuidedGradCAM, project_units
from convlens.methods.wrappers import TTA, SmoothGrad, VarGrad

# isort: off
# Imported last: the registry lists methods in import order, the transformer-only ones at the end.
from convlens.methods.attention import AttentionRelevance, AttentionRollout
# isort: on

__all__ = [
    "CAM",
    "METHODS",
    "RISE",
    "TTA",
    "AblationCAM",
    "AttentionRelevance",
    "AttentionRollout",
    "Context",
    "Deconvnet",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "LayerCAM",
    "Method",
    "Occlusion",
    "RawResult",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "VarGrad",
    "XGradCAM",
    "get_method",
    "list_methods",
    "project_units",
    "register",
]
