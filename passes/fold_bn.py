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
     ``Add(Mul(x, s), t)`` with ``s``, ``t`` shaped ``[C, 1, …]`` for its input's rank
     (``fold_bn_lower``).
  5. Every BN still in the graph is in the record's ``refused`` list with the reason: the
     first rule's refusal, else what is wrong with the BN itself (training form, parameters
     that are graph inputs, …), else "nothing to fold into" with its producer and readers.

All arithmetic is float64 from the stored tensors, cast once to the model's dtype; new tensors
are new initializers (a weight that another node reads is never changed). Sites are recorded as
``{"node": bn, "into": op, "how": "producer" | "consumer" | "lowered"}``.

Preconditions: none. ``cleanup`` usually runs first (it turns constants that exporters compute
at run time into initializers), but values of ``Constant`` nodes are read as constants too. The
pass infers shapes first (ranks decide which folds are exact) and names unnamed nodes so the
report can refer to them. The rules and their order are the ``fold-bn`` lines of
:mod:`normfold.passes.rules` (sweep ``fold``: rules 1-3, sweep ``lower``: rule 4).
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import onnx_ir as ir
import onnx_ir.passes.common as common

from normfold.catalog import pass_info
from normfold.errors import Refusal
from normfold.passes import rules as registry
from normfold.passes._fold_graph import FreshNames, Reads, batchnorm_affine, describe, opset_of
from normfold.passes._shapes import infer_shapes
from normfold.passes.base import NormfoldPass, apply_rules


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
        count = 0
        for sweep, rules in registry.sweeps(self.name, self.record, self.options, fresh, model=model):
            count += apply_rules(model, rules)
            if sweep == "fold":
                # What the folds left is refused with its reason (and lowered next, if asked).
                for bn in _batchnorms(model):
                    self.record.refuse(Refusal(_why_left(bn, model, self.options.freeze_initializer_inputs)), bn)
        self.record.keep_refusals_of({bn.name for bn in _batchnorms(model)})
        return count > 0
