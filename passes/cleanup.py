"""Clean-up: the exact, generic simplifications every later pass relies on.

Rule:
  1. Fold every node whose inputs are all constants, so weights that exporters compute at run
     time (dynamo's ``optimize=False`` zero biases via ``CastLike``/``Expand``, transposed
     weights) become initializers a fold can read. onnxscript's ``FoldConstantsPass`` does the
     symbolic part (``Shape`` of a static shape, no-op ``Reshape``/``Cast``/``Expand``) with
     its evaluation of nodes switched off; the values are computed by onnxruntime
     (``_ort_constants``: onnx's reference implementation folded a BatchNormalization 8.4%
     off), alternating until nothing more folds. onnxscript's default *rewrite rules* are
     never used, because they match constants with ``isclose(rel=1e-5, abs=1e-8)`` and delete
     ``Add(x, 1e-12)`` (BERT's LayerNorm eps), which turns all-zero rows into NaN.
  2. Eval-mode ``Dropout`` and ``Identity`` nodes are removed (an ``Identity`` between a graph
     input and a graph output stays: the interface must not change).
  3. ``Constant`` nodes become initializers, so passes see every constant the same way.
  4. Nodes and functions whose outputs nobody reads are removed; the graph is put in
     topological order.
  5. The bodies of model-local functions are left as they are (no pass rewrites them); the
     report notes each function that remains.

An ``Identity`` whose input is itself an output of the graph stays too: onnx_ir 1.1's
``IdentityEliminationPass`` would merge the two outputs into one value (a Scan body's carried
state and its scan output then collapse into one, a wrong graph).

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
from normfold.passes._ort_constants import fold_with_onnxruntime
from normfold.passes.base import NormfoldPass

# Elements; large enough for the weight transposes and bias expansions exporters emit.
_FOLD_INPUT_LIMIT = 1 << 22
_FOLD_OUTPUT_LIMIT = 1 << 22
# Shape steps and onnxruntime evaluation alternate (a Shape made constant lets its Gather fold);
# real exporters' graphs settle in two rounds.
_MAX_ROUNDS = 4


class CleanupPass(NormfoldPass):
    """Constant folding (eps-safe), Identity/Dropout removal, dead code, topological order."""

    name = "cleanup"
    summary = pass_info(name).summary

    def apply(self, model: ir.Model) -> bool:
        before = Counter(node.op_type for node in model.graph.all_nodes())
        modified = False
        symbolic = ir.passes.Sequential(
            common.NameFixPass(),  # onnxruntime evaluates constants by value name
            _constant_folding.FoldConstantsPass(
                shape_inference=False,
                input_size_limit=_FOLD_INPUT_LIMIT,
                output_size_limit=_FOLD_OUTPUT_LIMIT,
                should_fold=lambda node: False,  # never onnx.reference: values come from onnxruntime
            ),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        )
        for _ in range(_MAX_ROUNDS):
            modified |= symbolic(model).modified
            if not fold_with_onnxruntime(
                model, input_size_limit=_FOLD_INPUT_LIMIT, output_size_limit=_FOLD_OUTPUT_LIMIT
            ):
                break
            modified = True
        result = ir.passes.Sequential(
            common.NameFixPass(),
            _IdentityElimination(),
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
        for function in model.functions.values():
            ops = sorted({node.op_type for node in function})
            self.record.notes.append(
                f"function {function.domain}::{function.name} ({', '.join(ops)}) left as it is: "
                "the passes rewrite the main graph and its subgraphs, not function bodies"
            )
        return modified or result.modified


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's pass, keeping ``y = Identity(x)`` when both ``x`` and ``y`` are graph outputs."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.inputs else None
        both_outputs = source is not None and source.is_graph_output() and node.outputs[0].is_graph_output()
        if node.op_type == "Identity" and both_outputs:
            return False
        return super()._try_eliminate_identity_node(node)
