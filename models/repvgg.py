"""timm's RepVGG spelling (``byobnet.RepVggBlock``), shrunk: the training-time three-branch form.

Each block adds ``ConvNormAct(k×k)``, ``ConvNormAct(1×1)`` (both without activation) and, when
the block keeps its width and stride 1, a lone ``BatchNorm2d`` of its input (the identity
branch), then applies ReLU — exactly timm's ``RepVggBlock.forward`` with ``reparam_conv`` unset
(``x = conv_1x1(x) + conv_kxk(x); x += identity``). Padding is timm's ``get_padding``:
``((stride − 1) + dilation·(k − 1)) // 2``, so a stride-2 block pads its 3×3 Conv by 1 and its
1×1 Conv by 0. The network is a stem block of stride 2, stages whose first block has stride 2,
global average pool and a Linear head. ``normfold`` merges each block into one 3×3 Conv
(``fold-branches``), which is what timm's ``reparameterize()`` does in torch.
"""

from __future__ import annotations

__all__ = ["ConvNormAct", "RepVgg", "RepVggBlock", "build", "get_padding"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's symmetric padding for a Conv (``timm.layers.padding.get_padding``)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: Conv (no bias) → BatchNorm2d → activation (or none)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        apply_act: bool = True,
    ) -> None:
        super().__init__()
        padding = get_padding(kernel_size, stride, dilation)
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class RepVggBlock(nn.Module):
    """timm's RepVggBlock in its training-time form (identity BN + k×k + 1×1 branches)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        use_ident = in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(out_chs) if use_ident else None
        self.conv_kxk = ConvNormAct(
            in_chs, out_chs, kernel_size, stride=stride, groups=groups, apply_act=False
        )
        self.conv_1x1 = ConvNormAct(in_chs, out_chs, 1, stride=stride, groups=groups, apply_act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x += identity
        return self.act(x)


class RepVgg(nn.Module):
    """A stem block (stride 2) and stages of RepVggBlocks of width ``widths[i]``."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], classes: int, groups: int) -> None:
        super().__init__()
        self.stem = RepVggBlock(3, widths[0], stride=2)
        blocks: list[nn.Module] = []
        in_chs = widths[0]
        for width, depth in zip(widths, depths, strict=True):
            for index in range(depth):
                # Grouped 3×3 blocks as in RepVGG-B*g*: every other block of width-keeping ones.
                grouped = groups if index % 2 and in_chs == width and width % groups == 0 else 1
                blocks.append(RepVggBlock(in_chs, width, stride=2 if index == 0 else 1, groups=grouped))
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
    depths: tuple[int, ...] = (1, 3, 2),
    groups: int = 2,
    classes: int = 10,
    batch: int = 1,
    image: int = 32,
) -> ZooModel:
    """RepVGG on ``batch x 3 x image x image`` images (stages ``widths`` wide, ``depths`` deep)."""
    with seeded(seed):
        module = RepVgg(tuple(widths), tuple(depths), classes, groups)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("repvgg", module, {"input": x}, {"logits": {0: "batch"}})
