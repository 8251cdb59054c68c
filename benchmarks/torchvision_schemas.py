"""Make the registry's torchvision importable with the CPU torch (a bench and test helper).

The only torchvision wheel the registry serves is a CUDA build whose ``_C`` ops do not load
against the CPU torch 2.13.0. Its model definitions do not need them, but ``import
torchvision`` (and so ``import timm`` or ``import transformers`` when torchvision is installed)
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, which fails unless
those op schemas exist. :func:`define` defines them once; see TRAPS.md. Never in the library.
"""

from __future__ import annotations

__all__ = ["define"]

from typing import Any

_LIBRARIES: list[Any] = []  # kept alive: a dropped Library unregisters its schemas


def define() -> None:
    """Define the ``torchvision::nms`` / ``torchvision::qnms`` schemas unless they exist."""
    import torch

    if _LIBRARIES or hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)
