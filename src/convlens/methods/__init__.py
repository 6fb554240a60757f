"""Explanation methods, grouped by how they work; importing this package registers them all."""

from __future__ import annotations

from convlens.methods.base import Context, Method, RawResult
from convlens.methods.cam import CAM, GradCAM, GradCAMPlusPlus
from convlens.methods.gradient import GradientXInput, Saliency
from convlens.methods.perturbation import Occlusion
from convlens.methods.registry import METHODS, get_method, list_methods, register
from convlens.methods.rules import Deconvnet, GuidedBackprop, GuidedGradCAM, project_units
from convlens.methods.wrappers import SmoothGrad

__all__ = [
    "CAM",
    "METHODS",
    "Context",
    "Deconvnet",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "Method",
    "Occlusion",
    "RawResult",
    "Saliency",
    "SmoothGrad",
    "get_method",
    "list_methods",
    "project_units",
    "register",
]
