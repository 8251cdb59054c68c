"""Clean-up: the exact, generic simplifications every later pass relies on.

Rule:
  1. Fold every node whose inputs are all constants (onnxscript's ``FoldConstantsPass``), so
     weights that exporters compute at run time (dynamo's ``optimize=False`` zero biases via
     ``CastLike``/``Expand``, transposed weights) become initializers a fold can read. Only
     constant folding runs: onnxscript's default *rewrite rules* are never used, because they
     match constants with ``isclose(rel=1e-5, abs=1e-8)`` and delete ``Add(x, 1e-12)``
     (BERT's LayerNorm eps), which turns all-zero rows into NaN.
  2. Eval-mode ``Dropout`` and ``Identity`` nodes are removed (an ``Identity`` between a graph
     input and a graph output stays: the interface must not change).
  3. ``Constant`` nodes become initializers, so passes see every constant the same way.
  4. Nodes and functions whose outputs nobody reads are removed; the graph is put in
     topological order.

Preconditions: none. A node that reads a graph input is never folded, even when that input
has an initializer (old exporters' ``keep_initializers_as_inputs``): the user may feed it.
"""

from __future__ import annotations

__all__ = ["CleanupPass"]

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding

from normfold.catalog import pass_info
from normfold.passes.base import NormfoldPass

# Elements; large enough for the weight transposes and bias expansions exporters emit.
_FOLD_INPUT_LIMIT = 1 << 22
_FOLD_OUTPUT_LIMIT = 1 << 22


class CleanupPass(NormfoldPass):
    """Constant folding (eps-safe), Identity/Dropout removal, dead code, topological order."""

    name = "cleanup"
    summary = pass_info(name).summary

    def apply(self, model: ir.Model) -> bool:
        before = Counter(node.op_type for node in model.graph.all_nodes())
        result = ir.passes.Sequential(
            _constant_folding.FoldConstantsPass(
                shape_inference=False,
                input_size_limit=_FOLD_INPUT_LIMIT,
                output_size_limit=_FOLD_OUTPUT_LIMIT,
            ),
            common.IdentityEliminationPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )(model)
        after = Counter(node.op_type for node in model.graph.all_nodes())
        for op_type, count in sorted((before - after).items()):
            self.record.by_op[op_type] = count
            self.record.applied += count
        return result.modified
