"""Tiny configurations of the model-zoo libraries' own classes (timm, torchvision), for tests
that need real zoo architectures fast; each skips the test when its library is missing."""

from __future__ import annotations

import pytest
from torch import nn

__all__ = [
    "timm_convnext",
    "timm_deit_distilled",
    "timm_swin",
    "timm_vit",
    "torchvision_swin",
    "torchvision_vit",
]


def timm_vit() -> nn.Module:
    """timm ``VisionTransformer``: 32x32 input, 8x8 patches (4x4 grid), 2 blocks, 5 classes."""
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    )


def timm_deit_distilled() -> nn.Module:
    """timm's distilled DeiT (class and distillation tokens), sized like :func:`timm_vit`."""
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    )


def timm_swin() -> nn.Module:
    """timm ``SwinTransformer``: 32x32 input, 4x4 patches, 4x4 windows, two stages."""
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=5,
    )


def timm_convnext() -> nn.Module:
    """timm ``ConvNeXt`` with one block per stage."""
    pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5)


def torchvision_vit() -> nn.Module:
    """torchvision ``VisionTransformer``: 32x32 input, 8x8 patches, 2 layers (its head starts
    at zero, as torchvision initialises it)."""
    tv = pytest.importorskip("torchvision")
    return tv.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )


def torchvision_swin() -> nn.Module:
    """torchvision ``SwinTransformer``: 32x32 input, 4x4 patches, 4x4 windows, two stages (its
    final norm's channels-last tokens are permuted to (B, C, H, W) by its ``permute`` module)."""
    tv = pytest.importorskip("torchvision")
    return tv.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[4, 4],
        num_classes=5,
    )
