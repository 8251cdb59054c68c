"""The ConvNeXt repository's spelling (facebookresearch/ConvNeXt), shrunk.

Two LayerNorm spellings in one model, as in the original code:

- channels-first LayerNorm written by hand over axis 1 of NCHW (stem and downsampling layers):
  ``u = x.mean(1, keepdim=True); s = (x - u).pow(2).mean(1, keepdim=True);
  x = (x - u) / torch.sqrt(s + eps); x = w[:, None, None] * x + b[:, None, None]``.
  It exports to ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add over axis 1, which a fuser
  must not mistake for a last-axis LayerNorm.
- ``nn.LayerNorm(eps=1e-6)`` on NHWC inside each block, between two permutes.

Blocks: depthwise 7x7 conv -> permute to NHWC -> LayerNorm -> Linear(4x) -> GELU -> Linear ->
layer-scale ``gamma`` -> permute back -> residual. Layer scale is random here (upstream starts
it at 1e-6, which would make every block nearly the identity).
"""

from __future__ import annotations

__all__ = ["Block", "ConvNeXt", "LayerNorm", "build"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


class LayerNorm(nn.Module):
    """ConvNeXt's LayerNorm: ``channels_last`` calls F.layer_norm, ``channels_first`` is by hand."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    """ConvNeXt block: dwconv7x7 -> LN (NHWC) -> Linear -> GELU -> Linear -> gamma, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    """Patchify stem (4x4 stride 4 + LN), stages separated by LN + 2x2 stride-2 convs, LN head."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm(dims[0], data_format="channels_first")
                )
            ]
        )
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], data_format="channels_first"),
                    nn.Conv2d(dims[i], dims[i + 1], 2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dim) for _ in range(depth))) for dim, depth in zip(dims, depths)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean([-2, -1])))


def build(
    *,
    seed: int = 0,
    width: int = 16,
    depths: tuple[int, ...] = (1, 2, 1),
    classes: int = 10,
    batch: int = 1,
    image: int = 32,
) -> ZooModel:
    """ConvNeXt with stage widths ``width * 2**i`` on ``batch x 3 x image x image`` images."""
    dims = tuple(width * 2**i for i in range(len(depths)))
    with seeded(seed):
        module = ConvNeXt(dims, tuple(depths), classes)
        randomize_norms(module, extra=(LayerNorm,))
        x = torch.randn(batch, 3, image, image)
    return finish("convnext", module, {"input": x}, {"logits": {0: "batch"}})
