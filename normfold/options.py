"""The options objects: what the passes may do (:class:`PassOptions`) and how verification runs
and compares two models (:class:`VerifyOptions`).

Each is built once — by the command line's argument groups (:mod:`normfold.cli.options`, where
every field is the flag of the same name, ``--max-opset`` for ``max_opset``), or by a Python
caller — and handed down: ``normfold.optimize(path, options=PassOptions(target="onnxruntime"))``,
``normfold.verify(ref, cand, VerifyOptions(rtol=1e-4))``. The jobs also take the fields as
keywords (``normfold.optimize(path, target="onnxruntime", rtol=1e-4)``, see :func:`split`), so a
new option is a field here, its flag in its group, and the code that reads it.

This module imports nothing heavy: the command line builds the options (and reports a bad
value) before onnx, onnxruntime or the passes are loaded.
"""

from __future__ import annotations

__all__ = ["PassOptions", "Target", "VerifyOptions", "split"]

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

Target = Literal["onnx", "onnxruntime"]


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Settings that several passes read."""

    # The op set of the output: standard ONNX, or onnxruntime's contrib ops where faster.
    target: Target = "onnx"
    # Never raise the model's default-domain opset above this (a fusion that needs more is refused).
    max_opset: int | None = None
    # Treat initializers that are also graph inputs as constants (and drop those inputs).
    freeze_initializer_inputs: bool = False
    # Turn BatchNorms nothing folds into into one Mul and one Add.
    lower_standalone_bn: bool = False
    # Emit onnxruntime's Skip*Normalization ops (target onnxruntime) even where measured slower.
    skip_ops: bool = False


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """How two models are run and compared (see :mod:`normfold.verification`)."""

    # An .npz path, one mapping, or a list of mappings (one per sample); None: random samples.
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None
    # Sizes for the symbolic dims of the random samples (batch=2, seq=16).
    dims: Mapping[str, int] | None = None
    samples: int = 3
    seed: int = 0
    # Tolerances (relative to an output's max |value|, absolute); None: by the output's dtype.
    rtol: float | None = None
    atol: float | None = None
    # Run the reference as it is, or converted to float64.
    reference_precision: Literal["model", "float64"] = "model"
    # When outputs differ, find the first intermediate tensor that differs.
    localize: bool = False
    # Write the samples used to this .npz.
    save_inputs: str | os.PathLike | None = None


def split(settings: Mapping[str, Any], *kinds: Any) -> list[Any]:
    """``kinds`` (options instances) with ``settings`` (field name -> value) applied, each field
    to the options object that has it; ``TypeError`` for a name none of them has."""
    owners = {field.name: index for index, kind in enumerate(kinds) for field in dataclasses.fields(kind)}
    unknown = sorted(set(settings) - set(owners))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}: not an option")
    grouped: list[dict[str, Any]] = [{} for _ in kinds]
    for name, value in settings.items():
        grouped[owners[name]][name] = value
    return [dataclasses.replace(kind, **values) for kind, values in zip(kinds, grouped)]
