"""timm's LeViT spelling (``levit.py``), shrunk: BatchNorm on tokens after every Linear.

``LinearNorm`` is timm's: ``Linear`` (no bias), then ``BatchNorm1d`` over the flattened tokens,
``bn(x.flatten(0, 1)).reshape_as(x)``; ``ConvNorm`` is Conv2d (no bias) + BatchNorm2d;
``NormLinear`` (the head) is ``BatchNorm1d`` then ``Linear``. A stem of ``ConvNorm`` +
Hardswish pairs (stride 2 each) makes ``image/4 × image/4`` tokens; ``LevitBlock``s add an
attention (``qkv`` and ``proj`` are ``LinearNorm``; learned attention biases indexed by relative
position, as timm's ``Attention``) and an MLP of two ``LinearNorm``s to the residual stream;
the tokens are averaged and ``NormLinear`` classifies. Exported, each ``LinearNorm`` is
``MatMul → Flatten/Reshape → BatchNormalization → Reshape``: the BN normalizes the Linear's
output features, which stay the last axis through the reshape, so it folds into the MatMul.
"""

from __future__ import annotations

__all__ = ["Attention", "ConvNorm", "Levit", "LevitBlock", "LinearNorm", "NormLinear", "build"]

import itertools

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


class ConvNorm(nn.Module):
    """timm's ConvNorm: Conv2d without bias, then BatchNorm2d."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """timm's LinearNorm: Linear without bias, BatchNorm1d over the (batch·tokens) rows."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """timm's NormLinear (the classifier head): BatchNorm1d, then Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


class Attention(nn.Module):
    """timm's LeViT Attention on ``(B, N, C)`` tokens with relative-position attention biases."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + key_dim * num_heads * 2)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(self.val_attn_dim, dim))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.randn(num_heads, len(offsets)) * 0.1)
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3
        )
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    """timm's LevitMlp: LinearNorm, Hardswish, LinearNorm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitBlock(nn.Module):
    """timm's LevitBlock: ``x + attn(x)``, then ``x + mlp(x)``."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio=2.0, resolution=resolution)
        self.mlp = LevitMlp(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Levit(nn.Module):
    """Stem (two ConvNorm + Hardswish, stride 4), LeViT blocks on tokens, NormLinear head."""

    def __init__(self, dim: int, depth: int, key_dim: int, num_heads: int, image: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvNorm(3, dim // 2, 3, 2, 1), nn.Hardswish(), ConvNorm(dim // 2, dim, 3, 2, 1)
        )
        resolution = (image + 3) // 4
        self.stages = nn.Sequential(*(LevitBlock(dim, key_dim, num_heads, resolution) for _ in range(depth)))
        self.head = NormLinear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.stages(x)
        return self.head(x.mean(1))


def build(
    *,
    seed: int = 0,
    dim: int = 32,
    depth: int = 2,
    key_dim: int = 8,
    num_heads: int = 2,
    classes: int = 10,
    batch: int = 2,
    image: int = 32,
) -> ZooModel:
    """LeViT on ``batch x 3 x image x image`` images (``image`` fixed: the attention biases)."""
    with seeded(seed):
        module = Levit(dim, depth, key_dim, num_heads, image, classes)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("levit", module, {"input": x}, {"logits": {0: "batch"}})
