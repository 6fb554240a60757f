"""Tiny classifiers for the known-cause images (:mod:`convlens.synthesis.known_cause`).

- :class:`TinyCNN`: five 3 x 3 convolutions with BatchNorm and ReLU (two of stride 2, so a
  16 x 16 map on 64 x 64 images), global average pooling and one linear layer: the structure
  CAM needs (Zhou et al. 2016).
- :class:`TinyViT`: a vision transformer laid out as timm's ``VisionTransformer`` (Dosovitskiy
  et al. 2021), module names included: ``patch_embed.proj`` (a strided convolution),
  ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.{qkv, attn_drop, proj}, norm2,
  mlp.{fc1, act, fc2}}``, ``norm``, ``head``; the class token's final state is classified. The
  attention computes its weights explicitly (``softmax(q kᵀ / sqrt(d))`` then ``attn_drop``, an
  identity in eval mode), as timm does with ``fused_attn = False``, so attention methods can
  observe them.

Both are plain torch, a few tens of thousands of parameters; ``benchmarks/bench_known_cause.py``
trains them in minutes on one CPU core and stores their weights in ``benchmarks/known_cause/``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "TinyCNN",
    "TinyViT",
    "tiny_model",
    "train_known_cause",
    "train_steps",
]


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class TinyCNN(nn.Module):
    """Convolutions, global average pooling, a linear head.

    Args:
        num_classes: outputs.
        width: channels of the first convolution (then 2x and 4x).
    """

    def __init__(self, num_classes: int = 5, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(3, w, 1),
            *_conv(w, 2 * w, 2),
            *_conv(2 * w, 2 * w, 1),
            *_conv(2 * w, 4 * w, 2),
            *_conv(4 * w, 4 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images to (B, num_classes) logits."""
        return self.fc(self.pool(self.features(x)).flatten(1))


class PatchEmbed(nn.Module):
    """Patches to tokens: a convolution of kernel and stride ``patch`` (ViT), or with ``stem``
    channels, two 3 x 3 convolutions of stride 2 first and a projection of kernel and stride
    ``patch // 4`` (a convolutional stem, Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"); either way one token per ``patch`` x ``patch`` patch."""

    def __init__(self, img_size: int, patch: int, dim: int, stem: int = 0) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch, patch)
        self.grid_size = (img_size // patch, img_size // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if stem:
            if patch % 4:
                raise ValueError(f"a stem needs a patch size divisible by 4, not {patch}")
            self.stem: nn.Module = nn.Sequential(
                *_conv(3, stem // 2, 2),
                *_conv(stem // 2, stem, 2),
            )
            self.proj = nn.Conv2d(stem, dim, patch // 4, stride=patch // 4)
        else:
            self.stem = nn.Identity()
            self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) to (B, N, dim)."""
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with explicit weights (timm's ``Attention``, unfused)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = False
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) to (B, N, dim)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Two linear layers with GELU between (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) to (B, N, dim)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) to (B, N, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A tiny vision transformer with a class token (timm's layout, see the module docstring).

    Args:
        num_classes: outputs.
        img_size: side of the square input.
        patch: side of a patch (``img_size`` must be a multiple).
        dim: token width.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``.
        stem: channels of a convolutional stem in the patch embedding (0: none, plain ViT).
    """

    def __init__(
        self,
        num_classes: int = 5,
        img_size: int = 64,
        patch: int = 8,
        dim: int = 48,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        stem: int = 0,
    ) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        self.num_classes = num_classes
        self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch, dim, stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images to (B, num_classes) logits."""
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])


ARCHITECTURES = ("cnn", "vit")
"""Names accepted by :func:`tiny_model`."""


def tiny_model(arch: str, num_classes: int = 5) -> nn.Module:
    """A fresh :class:`TinyCNN` (``"cnn"``) or :class:`TinyViT` (``"vit"``, with a 32-channel
    convolutional stem: a plain ViT learns these images several times slower), default sizes."""
    if arch == "cnn":
        return TinyCNN(num_classes)
    if arch == "vit":
        return TinyViT(num_classes, stem=32)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def train_known_cause(
    net: nn.Module,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    seed: int = 0,
    num_classes: int = 5,
) -> list[float]:
    """Train ``net`` on a fresh known-cause batch each step (no image is seen twice).

    AdamW with a linear warm-up over ``warmup`` steps and a cosine decay to 0; batch ``t`` is
    ``known_cause_batch(batch_size, seed=seed * 1_000_003 + t + 1)``, so held-out images drawn
    with seeds of another range (the benchmark uses ``10**9 + i``) are never trained on.
    Deterministic for a given initial state, torch version and thread count. The network is
    left in eval mode.

    Args:
        net: the classifier (changed in place).
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: steps of linear warm-up.
        seed: seed of the batch sequence.
        num_classes: classes of the images (the network's outputs).

    Returns:
        The training loss of each step.
    """
    from convlens.synthesis.known_cause import known_cause_batch

    def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = known_cause_batch(batch_size, seed=seed * 1_000_003 + t + 1, num_classes=num_classes)
        return b.images, b.labels

    return train_steps(net, steps, batch, lr=lr, weight_decay=weight_decay, warmup=warmup)


def train_steps(
    net: nn.Module,
    steps: int,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
) -> list[float]:
    """Train ``net`` with cross-entropy on ``batch(t)`` (images, labels) at step ``t``.

    AdamW with a linear warm-up over ``warmup`` steps and a cosine decay to 0; the network is
    left in eval mode with no parameter gradients, also when a step raises. Deterministic for a
    given initial state, batches, torch version and thread count.

    Returns:
        The training loss of each step.
    """
    import math

    import torch.nn.functional as F

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    net.train()
    try:
        for t in range(steps):
            scale = 0.5 * (1.0 + math.cos(math.pi * t / steps)) * min(1.0, (t + 1) / max(warmup, 1))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            images, labels = batch(t)
            loss = F.cross_entropy(net(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:  # eval mode and no gradients left behind, also when a step fails
        net.eval()
        net.zero_grad(set_to_none=True)
    return losses
