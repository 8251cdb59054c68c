"""Ultralytics' YOLO spelling (ultralytics/nn/modules: Conv, Bottleneck, C2f, C3, SPPF, Detect), shrunk.

Every convolution of the backbone, neck and head branches is ultralytics' ``Conv``:
``Conv2d(bias=False, padding=k // 2) -> BatchNorm2d(eps=1e-3, momentum=0.03) -> SiLU``. Around
them, the places a BatchNorm folder must not trip over:

- ``C2f`` (YOLOv8): ``cv1`` output split in two by ``chunk(2, 1)``, each bottleneck reading the
  last piece, all pieces concatenated into ``cv2``. ``C3`` (YOLOv5): two parallel 1x1 ``Conv``\\s
  of the same input, one through bottlenecks, concatenated into ``cv3``. ``Bottleneck`` adds its
  input to ``cv2(cv1(x))`` when it keeps the width.
- ``SPPF``: three chained ``MaxPool2d(5, 1, 2)`` whose outputs and input are concatenated.
- A PAN neck: ``nn.Upsample(scale_factor=2, mode="nearest")`` + ``Concat`` top-down, strided
  ``Conv`` + ``Concat`` bottom-up.
- A YOLOv8 ``Detect`` head: per level two branches ``Conv -> Conv -> Conv2d(bias=True)`` (box
  distribution and classes) concatenated on channels, one ``(batch, 4 * reg_max + classes, h,
  w)`` output per level, as ``Detect`` returns them in training mode and raw-head exports
  (RKNN, TensorRT plugins) write them. The box decoding (DFL, anchors) is left out: it holds
  no BatchNorm, and its flatten to a variable anchor count would give the exporters'
  invented symbolic axes.
"""

from __future__ import annotations

__all__ = ["C3", "SPPF", "YOLO", "Bottleneck", "C2f", "Conv", "Detect", "build"]

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Pad to 'same' shape outputs."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Standard convolution with args(ch_in, ch_out, kernel, stride, padding, groups, dilation)."""

    default_act = nn.SiLU()

    def __init__(
        self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Standard bottleneck: ``x + cv2(cv1(x))`` when ``shortcut`` and the width is kept."""

    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: tuple[int, int] = (3, 3), e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """Faster implementation of CSP Bottleneck with 2 convolutions (YOLOv8)."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        self.c = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """CSP Bottleneck with 3 convolutions (YOLOv5)."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial Pyramid Pooling - Fast (SPPF) layer for YOLOv5 by Glenn Jocher."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2  # hidden channels
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """YOLOv8 Detect head without decoding: the box-distribution and class maps of every level."""

    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 4) -> None:
        super().__init__()
        self.nc = nc  # number of classes
        self.reg_max = reg_max  # DFL channels
        self.no = nc + reg_max * 4  # number of outputs per anchor
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(ch[0], min(self.nc, 100))  # channels
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch
        )

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat((cv2(xi), cv3(xi)), 1) for cv2, cv3, xi in zip(self.cv2, self.cv3, x))


class YOLO(nn.Module):
    """A YOLOv8-style detector, stage widths ``w, 2w, 4w, 8w, 8w`` at strides 2 to 32.

    Backbone ``Conv -> Conv -> C2f -> Conv -> C2f (P3) -> Conv -> C3 (P4) -> Conv -> C2f ->
    SPPF (P5)``, a PAN neck, and the Detect head on P3, P4, P5.
    """

    def __init__(self, w: int, classes: int, depth: int) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = w, 2 * w, 4 * w, 8 * w, 8 * w
        self.stem = nn.Sequential(Conv(3, c1, 3, 2), Conv(c1, c2, 3, 2), C2f(c2, c2, depth, True))
        self.p3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, depth, True))
        self.p4 = nn.Sequential(Conv(c3, c4, 3, 2), C3(c4, c4, depth, True))
        self.p5 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, depth, True), SPPF(c5, c5, 5))
        self.upsample = nn.Upsample(None, 2, "nearest")
        self.concat = Concat(1)
        self.top_down4 = C2f(c5 + c4, c4, depth)
        self.top_down3 = C2f(c4 + c3, c3, depth)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bottom_up4 = C2f(c3 + c4, c4, depth)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bottom_up5 = C2f(c4 + c5, c5, depth)
        self.detect = Detect(classes, (c3, c4, c5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.top_down4(self.concat([self.upsample(p5), p4]))
        n3 = self.top_down3(self.concat([self.upsample(n4), p3]))
        n4 = self.bottom_up4(self.concat([self.down3(n3), n4]))
        n5 = self.bottom_up5(self.concat([self.down4(n4), p5]))
        return self.detect([n3, n4, n5])


def build(
    *,
    seed: int = 0,
    width: int = 4,
    depth: int = 1,
    classes: int = 8,
    batch: int = 1,
    image: int = 64,
) -> ZooModel:
    """YOLOv8-style detector on ``batch x 3 x image x image`` images (``image`` a multiple of 32).

    YOLOv8n is about ``width=16, depth=1, classes=80, image=640`` (with its deeper stages).
    """
    if image % 32:
        raise InputError(f"image ({image}) must be a multiple of 32, the detector's largest stride")
    with seeded(seed):
        module = YOLO(width, classes, depth)
        randomize_norms(module)
        x = torch.randn(batch, 3, image, image)
    outputs = {f"output{level}": {0: "batch"} for level in range(3)}
    return finish("yolo", module, {"images": x}, outputs)
