"""fold-bn: fold every BatchNormalization that can be folded exactly; say why for every other one.

Rule:
  1. A BN after a Conv, ConvTranspose, Gemm, MatMul + bias Add or bare MatMul folds into that
     producer (``fold_bn_producer``: ``W' = W·s``, ``b' = b·s + t``).
  2. A BN after a chain of Flatten/Reshape/Transpose/Squeeze/Unsqueeze that carries such a
     producer's output channels, unmerged, to the BN's axis 1 folds into that producer; the
     chain stays (``fold_bn_producer_route``: LeViT's ``LinearNorm``, BN on tokens).
  3. A BN that is not folded into its producer folds into the ops that read it: an unpadded
     Conv (any groups), a zero-padded Conv when its shift is zero, a Gemm or a rank-2 MatMul,
     directly or through a channel-ordered Flatten/Reshape (``fold_bn_consumer``).
  4. With ``lower_standalone_bn``, every BN still left whose parameters are constants becomes
     ``Add(Mul(x, s), t)`` with ``s``, ``t`` shaped ``[C, 1, …]`` for its input's rank.
  5. Every BN still in the graph is in the record's ``refused`` list with the reason: the
     first rule's refusal, else what is wrong with the BN itself (training form, parameters
     that are graph inputs, …), else "nothing to fold into" with its producer and readers.

All arithmetic is float64 from the stored tensors, cast once to the model's dtype; new tensors
are new initializers (a weight that another node reads is never changed). Sites are recorded as
``{"node": bn, "into": op, "how": "producer" | "consumer" | "lowered"}``.

Preconditions: none. ``cleanup`` usually runs first (it turns constants that exporters compute
at run time into initializers), but values of ``Constant`` nodes are read as constants too. The
pass infers shapes first (ranks decide which folds are exact) and names unnamed nodes so the
report can refer to them.
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass", "LowerBatchNorm"]

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from normfold.catalog import pass_info
from normfold.passes.base import NormfoldPass, apply_rules
from normfold.math import fold_precision
from normfold.passes._shapes import infer_shapes
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    FoldRule,
    FreshNames,
    Reads,
    batchnorm_affine,
    batchnorm_statistics,
    describe,
    freeze,
    initializer,
    opset_of,
    rank_of,
    require_castable,
    require_graph,
    require_precise,
    tensor_dtype,
)
from normfold.passes.fold_bn_consumer import FoldBnIntoConsumer
from normfold.passes.fold_bn_producer import FoldBnIntoProducer
from normfold.passes.fold_bn_producer_route import FoldBnThroughShapes
from onnxscript.rewriter._basics import MatchResult


def _batchnorms(model: ir.Model) -> list[ir.Node]:
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    return [n for n in nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]


_ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Mish", "Clip", "Swish",
})
_SUMS = frozenset({"Add", "Sum", "Sub", "Concat"})


def _no_fold_reason(node: ir.Node | None, side: str) -> str:
    """Why the neighbour ``node`` (``side``: "input"/"reader") cannot take the BN exactly."""
    if node is None:
        return "its input is a graph input" if side == "input" else "it is a graph output"
    if node.op_type in _ACTIVATIONS:
        where = "before" if side == "input" else "after"
        return (
            f"{describe(node)} {where} it is a nonlinear activation"
            + (" (a pre-activation BN): a per-channel scale and shift do not pass through it"
               if side == "reader" else ", not a linear op with weights to absorb the scale")
        )
    if node.op_type in _SUMS:
        return (
            f"{describe(node)} combines it with other tensors"
            + (", so no single op's weights hold its channels" if side == "input"
               else " (fold-branches merges it only as a branch of a Conv of the same input)")
        )
    return f"{describe(node)} is not a Conv, Gemm or MatMul with constant weights"


def _why_left(bn: ir.Node, model: ir.Model, freeze_inputs: bool) -> str:
    """Why a BN no rule matched is still there: its own parameters, or its neighbours (each
    named with the reason no exact fold goes through it)."""
    try:
        batchnorm_affine(bn, opset_of(bn, model), Reads(freeze_inputs))
    except Refusal as refusal:
        return refusal.reason
    source = bn.inputs[0]
    producer = source.producer()
    origin = (
        f"the producer is {describe(producer)}"
        if producer
        else f"its input '{source.name}' is a graph input"
    )
    users = [user for user, _ in bn.outputs[0].uses()]
    readers = [describe(user) for user in users]
    if bn.outputs[0].is_graph_output():
        readers.append("the graph output")
    reasons = [_no_fold_reason(producer, "input")]
    reasons += [_no_fold_reason(user, "reader") for user in dict.fromkeys(users)]
    return (
        f"nothing to fold into: {origin}, and its output goes to "
        f"{', '.join(readers) or 'nothing'}. No exact fold exists: {'; '.join(reasons)}"
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
        reads = Reads(self.options.freeze_initializer_inputs)
        require_graph(context)
        scale, shift = batchnorm_affine(bn, opset_of(bn, context.model), reads)
        rank = rank_of(x) or rank_of(normalized)
        if rank is None:
            raise Refusal(
                "the rank of its input is unknown, so it cannot be lowered to Mul + Add"
            )
        dtype = x.dtype or normalized.dtype or tensor_dtype(bn.inputs[1])
        require_castable({"scale": scale, "shift": shift}, dtype)
        # Mul + Add compute y·s + t: where |μ·s| dwarfs the output, that cancels (the BN does not).
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


class FoldBatchNormPass(NormfoldPass):
    """Fold BatchNormalization into producers and consumers; optionally lower the rest."""

    name = "fold-bn"
    summary = pass_info(name).summary

    def apply(self, model: ir.Model) -> bool:
        if not _batchnorms(model):
            return False
        # Shapes decide exactness (a MatMul's feature axis, a Reshape's order); names are for
        # the report. Failed inference leaves the model as it is and only costs refusals.
        infer_shapes(model)
        common.NameFixPass()(model)
        fresh = FreshNames(model)
        through_shapes = FoldBnThroughShapes(self.record, self.options, fresh)
        count = apply_rules(
            model,
            [
                FoldBnIntoProducer(self.record, self.options, fresh),
                through_shapes,
                FoldBnIntoConsumer(self.record, self.options, fresh),
            ],
        )
        through_shapes.redirect_shape_readers(model)
        for bn in _batchnorms(model):
            self.record.refuse(Refusal(_why_left(bn, model, self.options.freeze_initializer_inputs)), bn)
        if self.options.lower_standalone_bn:
            count += apply_rules(model, [LowerBatchNorm(self.record, self.options, fresh)])
        self.record.keep_refusals_of({bn.name for bn in _batchnorms(model)})
        return count > 0
