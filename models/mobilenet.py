"""torchvision's MobileNetV2 spelling, shrunk: depthwise convolutions and ReLU6.

Each inverted residual is ``1x1 expand -> BN -> ReLU6 -> 3x3 depthwise (groups=C) -> BN ->
ReLU6 -> 1x1 project -> BN`` with no activation after the projection, and a residual Add when
stride is 1 and the width does not change; blocks with expansion 1 skip the expand conv, as in
torchvision. ReLU6 exports as ``Clip(0, 6)``; a grouped convolution's weight is
``[C, 1, k, k]``, so a per-channel fold must scale axis 0, not axis 1.
"""

from __future__ import annotations

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "build"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded

# (expansion t, output channels c as a multiple of width, repeats n, first stride s)
_SETTINGS: tuple[tuple[int, int, int, int], ...] = ((1, 1, 1, 1), (6, 2, 2, 2), (6, 3, 2, 2), (6, 4, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand, depthwise, project; residual when the shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residual stages, 1x1 head conv, pooled Linear classifier."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, width, stride=2)]
        cin = width
        for expand, multiple, repeats, stride in _SETTINGS:
            cout = width * multiple
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        last = width * 8
        layers.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def build(*, seed: int = 0, width: int = 8, classes: int = 10, batch: int = 1, image: int = 32) -> ZooModel:
    """MobileNetV2 on ``batch x 3 x image x image`` images, stem width ``width``."""
    with seeded(seed):
        module = MobileNetV2(width, classes)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("mobilenetv2", module, {"input": x}, {"logits": {0: "batch"}})
