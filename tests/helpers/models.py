"""Tiny deterministic models shared by the tests, the seeding that makes them deterministic, and
the source of the tiny user-model file (``net.py``) that the CLI and analysis tests load.

Every model here is small enough to run in milliseconds and is made deterministic by
:func:`seeded` (weights and BatchNorm statistics drawn from a fixed seed, float64, eval mode).
Models used by one test file only stay in that file.
"""

from __future__ import annotations

import textwrap

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "ChannelsLastNet",
    "GapNet",
    "LinearNet",
    "NoGapNet",
    "SharedActNet",
    "TinyResNet",
    "TinyVGG",
    "TinyViT",
    "TinyViTBlock",
    "TokenViT",
    "images",
    "seeded",
    "tiny_net_source",
]


class GapNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> BN -> ReLU -> global average pool -> dropout -> linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn(self.conv2(self.relu1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


class SharedActNet(nn.Module):
    """One ReLU module called three times with different shapes (as EfficientNet does), and a
    functional mean instead of a pooling module."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.block = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 7, 1)
        self.fc = nn.Linear(7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = x + self.act(self.block(x))
        x = self.act(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class NoGapNet(nn.Module):
    """conv -> ReLU -> flatten -> linear: no global average pooling, so no CAM."""

    def __init__(self, size: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


class LinearNet(nn.Module):
    """logits = W vec(x) + b: every gradient is a row of W, worked out by hand."""

    def __init__(self, size: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Identity()
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class TinyVGG(nn.Module):
    """Three VGG blocks (conv-ReLU-conv-ReLU-maxpool) and a flatten-linear head, for 16x16 input."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(3, 4), *block(4, 6), *block(6, 8))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two conv-BN, an in-place residual add, a 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A ResNet-18 in miniature: strided stem, max pool, two basic blocks, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 5, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(4, 4, 1)
        self.layer2 = BasicBlock(4, 8, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm -> nn.MultiheadAttention -> residual, LayerNorm ->
    MLP (GELU) -> residual (torchvision's ``EncoderBlock``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """A vision transformer in miniature, laid out like torchvision's ``VisionTransformer``
    (``class_token``, integer ``patch_size``, ``nn.MultiheadAttention`` blocks): patch
    embedding by a strided conv, a class token first, learned position embeddings, ``depth``
    blocks, LayerNorm, a linear head on the class token. 12x12 input, 3x3 patch grid."""

    def __init__(
        self,
        size: int = 12,
        patch_size: int = 4,
        dim: int = 8,
        heads: int = 2,
        depth: int = 2,
        classes: int = 5,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size = size, patch_size
        self.conv_proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, (size // patch_size) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(TinyViTBlock(dim, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        return self.head(self.ln(self.blocks(tokens))[:, 0])


class _Attention(nn.Module):
    """Multi-head self-attention written out: qkv projection, softmax(q k^T / sqrt(d)) v, proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenViT(nn.Module):
    """A vision transformer in plain torch: patch-embedding convolution (kernel = stride =
    ``patch``), ``prefix`` learned tokens in front (a class token, then distillation or register
    tokens), position embeddings, ``depth`` pre-norm blocks, a final LayerNorm and a linear head
    on the class token (``pool="cls"``) or on the mean of the patch tokens (``pool="mean"``)."""

    def __init__(
        self,
        classes: int = 5,
        size: int = 16,
        patch: int = 4,
        dim: int = 8,
        depth: int = 2,
        heads: int = 2,
        prefix: int = 1,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.prefix, self.pool = prefix, pool
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, prefix, dim))
        self.pos = nn.Parameter(torch.zeros(1, prefix + (size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(_Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix_tokens.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0] if self.pool == "cls" else t[:, self.prefix :].mean(1))


class ChannelsLastNet(nn.Module):
    """Swin-style channels-last features: patch-embedding convolution, permute to (B, H, W, C),
    LayerNorm, a per-position MLP, a final LayerNorm, mean over the grid, linear head."""

    def __init__(self, classes: int = 5, patch: int = 4, dim: int = 6) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).permute(0, 2, 3, 1)
        t = self.norm(t + self.mlp(self.norm1(t)))
        return self.head(t.mean(dim=(1, 2)))


def seeded(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Draw ``model``'s parameters (normal, std 0.5) and BatchNorm statistics from ``seed``;
    return it in ``dtype`` and eval mode."""
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def images(b: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """``b`` standard-normal float64 RGB images of ``size`` x ``size`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)


def tiny_net_source(seed: int = 0) -> str:
    """Python source of a user-model file whose ``build()`` returns a seeded three-class net:
    conv -> ReLU(inplace) -> strided conv -> ReLU -> global average pool -> linear."""
    return textwrap.dedent(
        f"""
        import torch
        from torch import nn

        def build():
            torch.manual_seed({seed})
            return nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
            )
        """
    )
