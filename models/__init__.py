"""The reference model zoo: small models built in code, in the spellings real model code uses.

Each family module writes its model the way its upstream source does (torchvision's ResNet,
the ConvNeXt repository's hand-written channels-first LayerNorm, Hugging Face's BERT, LLaMA,
T5 and Gemma 3, diffusers' UNet blocks, ultralytics' YOLO, the DiT repository's adaLN blocks,
timm's RepVGG, MobileOne and LeViT blocks in their training-time multi-branch form),
because normfold's passes must recognise the graphs those spellings export to. Every model is
built deterministically from a seed, in eval mode, with random normalization statistics and
affine parameters (never the identity defaults), so that a wrong fold changes the outputs.

torch is needed to build a model but not to import this package: family modules are imported
by :func:`build` only. :mod:`normfold.models.export` turns a model into ONNX files with the
exporter settings users have.
"""

from __future__ import annotations

__all__ = ["NAMES", "ZooModel", "build"]

import dataclasses
import importlib
import inspect
from typing import TYPE_CHECKING, Any

from normfold.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Model name -> family module (one file per family).
_FAMILIES: dict[str, str] = {
    "resnet": "resnet",
    "mobilenetv2": "mobilenet",
    "vgg": "vgg",
    "convnext": "convnext",
    "bert": "bert",
    "llama": "llama",
    "unet": "unet",
    "t5": "t5",
    "gemma": "gemma",
    "yolo": "yolo",
    "dit": "dit",
    "repvgg": "repvgg",
    "mobileone": "mobileone",
    "levit": "levit",
}

NAMES: tuple[str, ...] = tuple(_FAMILIES)

TORCH_HINT = "pip install 'normfold[torch]' torch==2.13.0"


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A built zoo model with what an exporter needs to know about it.

    ``example_inputs`` are the positional arguments of ``module.forward``, named by
    ``input_names``; ``dynamic_axes`` names the symbolic axes ("batch", "seq") of each input and
    output, in the form ``torch.onnx.export(dynamic_axes=...)`` takes.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    def half(self) -> ZooModel:
        """A float16 copy: parameters, buffers and floating example inputs in half precision.

        Integer inputs (token ids, masks) stay as they are; the original is left untouched.
        """
        import copy

        module = copy.deepcopy(self.module).half()
        inputs = tuple(t.half() if t.is_floating_point() else t for t in self.example_inputs)
        return dataclasses.replace(self, module=module, example_inputs=inputs)

    def feeds(self) -> dict[str, np.ndarray]:
        """The example inputs as onnxruntime feeds (name -> numpy array)."""
        return {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, self.example_inputs)}

    def torch_outputs(self, inputs: tuple[torch.Tensor, ...] | None = None) -> dict[str, np.ndarray]:
        """Run the module (on ``inputs``, default the example inputs); outputs by name."""
        import torch

        with torch.inference_mode():
            result = self.module(*(self.example_inputs if inputs is None else inputs))
        outputs = result if isinstance(result, tuple) else (result,)
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, outputs)}


def build(name: str, *, seed: int = 0, **size: Any) -> ZooModel:
    """Build zoo model ``name`` from ``seed``; ``size`` overrides the family's size defaults.

    Unknown names or size parameters raise :class:`InputError`, as does a missing torch.
    """
    if name not in _FAMILIES:
        raise InputError(f"unknown zoo model {name!r}; choose one of: {', '.join(NAMES)}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(f"the model zoo ({name}) needs torch: {TORCH_HINT}") from None
    builder = importlib.import_module(f"normfold.models.{_FAMILIES[name]}").build
    known = [p for p in inspect.signature(builder).parameters if p != "seed"]
    unknown = sorted(set(size) - set(known))
    if unknown:
        raise InputError(
            f"zoo model {name!r} has no size parameter {unknown[0]!r}; it takes: {', '.join(known)}"
        )
    return builder(seed=seed, **size)


def family_module(name: str) -> str:
    """The import name of the module that defines zoo model ``name`` (for cache keys)."""
    if name not in _FAMILIES:
        raise InputError(f"unknown zoo model {name!r}; choose one of: {', '.join(NAMES)}")
    return f"normfold.models.{_FAMILIES[name]}"
