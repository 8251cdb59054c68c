"""Where two graphs start to differ: the first shared intermediate tensor beyond tolerance.

When ``verify`` finds outputs that differ, it says which outputs but not where the difference
starts. Polygraphy's answer is to mark every tensor as an output and compare them all; across a
folded graph most names differ, but the ones the two graphs share by name (a folded Conv writes
the output name of the BatchNorm it absorbed, a fused LayerNorm the name of the last op it
replaced) carry the same value in both. :func:`first_divergence`:

1. takes the tensors that a node of each graph produces under the same name (graph inputs and
   weights are not intermediates; values of unknown element type cannot be graph outputs and
   are left out after onnx's shape inference);
2. runs each model once on one sample, with those tensors exposed as outputs, one session at a
   time (the reference's is dropped before the candidate's is built; only the shared tensors'
   values are kept in between);
3. walks the candidate's nodes in their (topological) order and returns the first shared tensor
   that fails the rule ``verify`` applies to outputs (shape, dtype, NaN/Inf positions, and
   ``max_abs_error <= atol + rtol * max|ref|`` with the same tolerances), with the nodes that
   produce it in each graph and its errors.

The sample is the one on which the outputs differed most (relative to their tolerance), so the
walk looks where the failure is largest.
"""

from __future__ import annotations

__all__ = ["first_divergence", "worst_sample"]

import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from normfold.runtime import run, session

Outputs = dict[str, np.ndarray]
# Compares two lists of samples tensor by tensor, as verify compares outputs: name -> result with
# ``passed``, ``max_abs_error`` and ``max_rel_error``.
Compare = Callable[[list[Outputs], list[Outputs]], Mapping[str, Any]]


def first_divergence(
    reference: ir.Model,
    candidate: ir.Model,
    sample: Mapping[str, np.ndarray],
    compare: Compare,
    *,
    candidate_sample: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """The first tensor shared by name that differs beyond tolerance, or None when none does.

    ``sample`` feeds the reference (``candidate_sample`` the candidate, when its inputs are a
    subset). The result is ``{"tensor", "reference_node", "candidate_node", "max_abs_error",
    "max_rel_error"}``.
    """
    shared = _shared_tensors(reference, candidate)
    if not shared:
        return None
    expected = _run_exposing(reference, shared, sample)
    gc.collect()
    got = _run_exposing(candidate, shared, candidate_sample if candidate_sample is not None else sample)
    gc.collect()
    producers = {name: (ref_node, cand_node) for name, ref_node, cand_node in shared}
    for name, _, _ in shared:  # in the candidate's order
        if name not in expected or name not in got:
            continue
        result = compare([{name: expected[name]}], [{name: got[name]}])[name]
        if not result.passed:
            ref_node, cand_node = producers[name]
            return {
                "tensor": name,
                "reference_node": ref_node,
                "candidate_node": cand_node,
                "max_abs_error": _json_number(result.max_abs_error),
                "max_rel_error": _json_number(result.max_rel_error),
            }
    return None


def worst_sample(ref_outputs: Sequence[Outputs], cand_outputs: Sequence[Outputs], compare: Compare) -> int:
    """The sample on which an output differs most (largest relative error; not measured counts
    as infinite)."""

    def badness(k: int) -> float:
        results = compare([ref_outputs[k]], [cand_outputs[k]]).values()
        return max((_worst(r.max_rel_error) for r in results if not r.passed), default=0.0)

    return max(range(len(ref_outputs)), key=badness)


def _worst(error: float) -> float:
    return float("inf") if error != error else error  # NaN: not measured (shape, NaN mismatch)


def _shared_tensors(reference: ir.Model, candidate: ir.Model) -> list[tuple[str, str, str]]:
    """(tensor, reference node, candidate node) for each name a node of each graph produces,
    in the candidate's node order."""
    produced_by = {value.name: node for node in reference.graph for value in node.outputs if value.name}
    shared = []
    for node in candidate.graph:
        for value in node.outputs:
            other = produced_by.get(value.name) if value.name else None
            if other is not None:
                shared.append((value.name, other.name or other.op_type, node.name or node.op_type))
    return shared


def _run_exposing(model: ir.Model, shared: list[tuple[str, str, str]], sample: Mapping[str, np.ndarray]) -> Outputs:
    """Run a copy of ``model`` with the shared tensors (those of known element type) as outputs."""
    probe = model.clone()  # shares the weights
    # Graph outputs need an element type; exporters leave many intermediates untyped.
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(probe)
    wanted = {name for name, _, _ in shared}
    present = {value.name for value in probe.graph.outputs}
    for node in probe.graph:
        for value in node.outputs:
            if value.name in wanted and value.name not in present and value.dtype is not None:
                probe.graph.outputs.append(value)
                present.add(value.name)
    sess = session(probe)
    outputs = run(sess, dict(sample))
    del sess
    return {name: array for name, array in outputs.items() if name in wanted}


def _json_number(value: float) -> float | str | None:
    if value != value:
        return None
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return float(value)
