"""fold-bn, rule 4 (with ``lower_standalone_bn``): a BatchNormalization nothing folds into becomes
``Add(Mul(x, s), t)``.

Rule. ``BatchNormalization(x)`` in inference form with constant parameters is the per-channel
affine map ``s·x + t`` (:func:`normfold.math.batchnorm.bn_scale_shift`, float64); it is
replaced by ``Mul`` and ``Add`` with ``s`` and ``t`` as new initializers shaped ``[C, 1, …]``
for the input's rank, cast once to the input's dtype. Refused, with the reason: the training
forms and parameters that are not constants (:func:`~normfold.passes._fold_graph.batchnorm_affine`),
an input of unknown rank, constants the dtype cannot hold, and a map that cancels: ``x·s + t``
rounds the product before adding ``t``, so where ``|μ·s|`` dwarfs the output (the BN computes
``s·(x − μ) + β``) the lowered form is refused (probed with the BN's own statistics,
:func:`normfold.math.fold_precision.lowered_outputs`). Runs after the folds, on what they left
(see :mod:`normfold.passes.fold_bn`).
"""

from __future__ import annotations

__all__ = ["LowerBatchNorm"]

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.math import fold_precision
from normfold.passes._fold_graph import (
    FoldRule,
    Reads,
    batchnorm_statistics,
    freeze,
    initializer,
    rank_of,
    require_castable,
    require_precise,
    tensor_dtype,
)


@dataclasses.dataclass(frozen=True)
class _Lowering:
    """What the check hands the rewrite: ``bn`` becomes ``x·scale + shift`` (float64 constants
    shaped ``[C, 1, …]``, cast to ``dtype``)."""

    bn: ir.Node
    scale: np.ndarray
    shift: np.ndarray
    dtype: ir.DataType
    reads: Reads


class LowerBatchNorm(FoldRule):
    """``BatchNormalization(x)`` → ``Add(Mul(x, s), t)`` with constants shaped ``[C, 1, …]``."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["normalized"])

    def check(self, context: Any, x: ir.Value, normalized: ir.Value, **_: Any) -> MatchResult:
        bn = normalized.producer()
        scale, shift, reads = self.read_batchnorm(context, bn)
        rank = rank_of(x) or rank_of(normalized)
        if rank is None:
            raise Refusal(
                "the rank of its input is unknown, so it cannot be lowered to Mul + Add"
            )
        dtype = x.dtype or normalized.dtype or tensor_dtype(bn.inputs[1])
        require_castable({"scale": scale, "shift": shift}, dtype)
        mean, std = batchnorm_statistics(bn, reads)
        require_precise(lambda: fold_precision.lowered_outputs(scale, shift, mean, std, dtype.numpy()), dtype)
        shape = (scale.size,) + (1,) * (rank - 2)
        self._plan = _Lowering(bn, scale.reshape(shape), shift.reshape(shape), dtype, reads)
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        plan: _Lowering = self._plan
        bn, scale, shift, dtype = plan.bn, plan.scale, plan.shift, plan.dtype
        freeze(plan.reads, self.record)
        name = bn.name  # the pass names every node first
        self.record.site(bn.name, op="Mul+Add", into=f"{name}/Mul", how="lowered")
        scaled = op.Mul(
            x, initializer(op, scale, dtype, self._fresh(f"{name}/scale")), _name=f"{name}/Mul"
        )
        return op.Add(
            scaled, initializer(op, shift, dtype, self._fresh(f"{name}/shift")), _name=f"{name}/Add"
        )
