"""The float16/bfloat16 precision rule that verification and every fold share.

A float16 or bfloat16 model has an error of its own: against the same model converted to
float32 (every float tensor and Cast target widened), its outputs are off by its rounding.
A candidate is judged against that float32 run too, and may be off by at most::

    FACTOR · (the reference model's own error) + floor(dtype) · max|float32 output|

``FACTOR = 4`` leaves room for folds that round weights once instead of activations at every
op; the floor, ``4u`` (four unit roundoffs, two machine epsilons: 2.0e-3 for float16, 1.6e-2 for
bfloat16), lets a candidate differ by the rounding of its folded weights (a couple of output
ulps) where the reference happens to be exact: onnxruntime runs a float16 Conv+BN in float32,
so the unfolded graph rounds only its output.
A fold that passes this rule site by site (``normfold.math.fold_precision``) passes it for the
whole model; one 1.8–3.2% off (a float16 Conv+BN whose folded weights lose the float32
cancellation the unfolded graph computes) fails it, where a flat 1e-2 tolerance let it through.
"""

from __future__ import annotations

__all__ = ["FACTOR", "floor", "is_low_precision", "rounded"]

import ml_dtypes
import numpy as np

FACTOR = 4.0


def _dtype(dtype: object) -> np.dtype:
    return np.dtype(dtype)


def is_low_precision(dtype: object) -> bool:
    """float16, bfloat16 and the 8-bit floats: the dtypes the rule applies to."""
    dtype = _dtype(dtype)
    return dtype.kind in "fV" and dtype.itemsize <= 2 and dtype.name.startswith(("float", "bfloat"))


def floor(dtype: object) -> float:
    """``4u`` of ``dtype`` (two machine epsilons), relative to an output's largest magnitude."""
    return 2 * float(ml_dtypes.finfo(_dtype(dtype)).eps)


def rounded(array: np.ndarray, dtype: object) -> np.ndarray:
    """``array`` cast to ``dtype`` and back to float64."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return np.asarray(array, np.float64).astype(_dtype(dtype)).astype(np.float64)
