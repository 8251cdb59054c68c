"""torchvision's ResNet spelling, shrunk: the model every BatchNorm folder is tested on first.

Stem ``Conv(7x7, stride 2) -> BatchNorm2d -> ReLU -> MaxPool``, then ``BasicBlock`` stages
(``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, added to the shortcut, then ReLU). A block that
changes width or stride has a ``downsample`` shortcut ``Sequential(conv1x1, BatchNorm2d)``, so
one Add reads two Conv+BN pairs; the others use the identity. Global average pool, flatten,
Linear head. Convolutions before a BatchNorm have no bias, as in torchvision.
"""

from __future__ import annotations

__all__ = ["BasicBlock", "ResNet", "build"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with BatchNorm and a residual."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A three-stage ResNet with ``blocks[i]`` BasicBlocks of width ``width * 2**i``."""

    def __init__(self, width: int, blocks: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers: list[nn.Module] = []
        inplanes = width
        for stage, count in enumerate(blocks):
            planes = width * 2**stage
            stage_blocks = [BasicBlock(inplanes, planes, stride=1 if stage == 0 else 2)]
            stage_blocks += [BasicBlock(planes, planes) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage_blocks))
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build(
    *,
    seed: int = 0,
    width: int = 8,
    blocks: tuple[int, ...] = (2, 2, 2),
    classes: int = 10,
    batch: int = 1,
    image: int = 32,
) -> ZooModel:
    """ResNet on ``batch x 3 x image x image`` images (default 8-16-32 wide, 2 blocks a stage)."""
    with seeded(seed):
        module = ResNet(width, tuple(blocks), classes)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("resnet", module, {"input": x}, {"logits": {0: "batch"}})
