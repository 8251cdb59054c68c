"""timm's MobileOne spelling (``byobnet.MobileOneBlock``), shrunk: the over-parameterized form.

A MobileOne block sums a skip ``BatchNorm2d`` (when it keeps width and stride 1), a 1×1 "scale"
``ConvNormAct`` (when its kernel is larger than 1) and ``num_conv_branches`` k×k
``ConvNormAct`` branches, written as timm writes it: ``identity_out = 0``, ``scale_out = 0``,
``out = scale_out + identity_out``, then ``out += conv(x)`` per branch, then ReLU. Stages
alternate a depthwise 3×3 block (``groups = channels``, stride 2 at a stage's start) and a
pointwise 1×1 block, as MobileOne-S* do. Exported, a block is an ``Add`` chain over BN, 1×1
and 3×3 branches of one input, with a constant 0 where a branch is missing; ``fold-branches``
merges each into one Conv (depthwise ones into a depthwise Conv with a diagonal identity).
"""

from __future__ import annotations

__all__ = ["MobileOne", "MobileOneBlock", "build"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded
from normfold.models.repvgg import ConvNormAct


class MobileOneBlock(nn.Module):
    """timm's MobileOneBlock in its training-time form."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 2,
    ) -> None:
        super().__init__()
        self.num_conv_branches = num_conv_branches
        use_ident = in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(out_chs) if use_ident else None
        self.conv_kxk = nn.ModuleList(
            ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, groups=groups, apply_act=False)
            for _ in range(num_conv_branches)
        )
        self.conv_scale = None
        if kernel_size > 1:
            self.conv_scale = ConvNormAct(
                in_chs, out_chs, 1, stride=stride, groups=groups, apply_act=False
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for ck in self.conv_kxk:
            out += ck(x)
        return self.act(out)


class MobileOne(nn.Module):
    """A stem block (3×3, stride 2), then per stage pairs of depthwise and pointwise blocks."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], classes: int, branches: int) -> None:
        super().__init__()
        self.stem = MobileOneBlock(3, widths[0], 3, stride=2, num_conv_branches=1)
        blocks: list[nn.Module] = []
        in_chs = widths[0]
        for width, depth in zip(widths, depths, strict=True):
            for index in range(depth):
                stride = 2 if index == 0 else 1
                blocks.append(MobileOneBlock(in_chs, in_chs, 3, stride, groups=in_chs,
                                             num_conv_branches=branches))
                blocks.append(MobileOneBlock(in_chs, width, 1, 1, num_conv_branches=branches))
                in_chs = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_chs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build(
    *,
    seed: int = 0,
    widths: tuple[int, ...] = (8, 16, 32),
    depths: tuple[int, ...] = (1, 2, 1),
    branches: int = 2,
    classes: int = 10,
    batch: int = 1,
    image: int = 32,
) -> ZooModel:
    """MobileOne on ``batch x 3 x image x image`` images with ``branches`` k×k branches a block."""
    with seeded(seed):
        module = MobileOne(tuple(widths), tuple(depths), classes, branches)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("mobileone", module, {"input": x}, {"logits": {0: "batch"}})
