"""fold-affine: fold constant per-channel Mul/Add/Sub/Div after a linear op into its weights.

The rule, with its preconditions and what is refused, is
:mod:`normfold.passes.fold_affine_producer`; its four variants (Mul/Div by a constant second,
Mul by a constant first, Add/Sub either way) are the ``fold-affine`` lines of
:mod:`normfold.passes.rules`, run in one sweep. Sites are recorded as ``{"node": the
Mul/Add/…, "into": the linear op, "how": its op type}``.
"""

from __future__ import annotations

__all__ = ["FoldAffinePass"]

import onnx_ir as ir
import onnx_ir.passes.common as common

from normfold.catalog import pass_info
from normfold.passes import rules as registry
from normfold.passes._fold_graph import FreshNames
from normfold.passes.base import NormfoldPass, apply_rules


class FoldAffinePass(NormfoldPass):
    """Fold constant per-channel Mul/Add/Sub/Div chains into the Conv/Gemm/MatMul before them."""

    name = "fold-affine"
    summary = pass_info(name).summary

    def apply(self, model: ir.Model) -> bool:
        common.NameFixPass()(model)
        fresh = FreshNames(model)
        sweeps = registry.sweeps(self.name, self.record, self.options, fresh, model=model)
        count = sum(apply_rules(model, rules) for _, rules in sweeps)
        self.record.keep_refusals_of({node.name for node in model.graph.all_nodes()})
        return count > 0
