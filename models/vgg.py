"""torchvision's VGG-BN spelling, shrunk, with BatchNorm1d in the classifier.

Features are ``Conv3x3 -> BatchNorm2d -> ReLU`` stacks separated by MaxPool; the classifier is
``Flatten -> Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear -> BatchNorm1d -> ReLU ->
Linear``, the head many tabular and older vision models use. A BatchNorm after a Linear
exports as BatchNormalization (or Mul/Add) on a 2-D tensor after a Gemm or MatMul, which a
Conv-only folder misses. The convolutions keep their bias (torchvision's VGG does), so a fold
must carry it.
"""

from __future__ import annotations

__all__ = ["VGG", "build"]

import torch
from torch import nn

from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


class VGG(nn.Module):
    """``config`` lists conv widths as multiples of ``width``; 0 is a 2x2 max pool."""

    def __init__(self, width: int, config: tuple[int, ...], image: int, hidden: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = 3, image
        for entry in config:
            if entry == 0:
                layers.append(nn.MaxPool2d(2, 2))
                side //= 2
                continue
            cout = width * entry
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build(
    *,
    seed: int = 0,
    width: int = 8,
    config: tuple[int, ...] = (1, 0, 2, 0, 4, 4, 0),
    hidden: int = 64,
    classes: int = 10,
    batch: int = 1,
    image: int = 32,
) -> ZooModel:
    """VGG-BN on ``batch x 3 x image x image`` images (image must survive the pools)."""
    with seeded(seed):
        module = VGG(width, tuple(config), image, hidden, classes)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    return finish("vgg", module, {"input": x}, {"logits": {0: "batch"}})
