"""Where two graphs start to differ: the first shared intermediate tensor beyond tolerance.

When ``verify`` finds outputs that differ, it says which outputs but not where the difference
starts. Polygraphy's answer is to mark every tensor as an output and compare them all; across a
folded graph most names differ, but the ones the two graphs share by name (a folded Conv writes
the output name of the BatchNorm it absorbed, a fused LayerNorm the name of the last op it
replaced) carry the same value in both. :func:`first_divergence`:

1. takes the tensors that a node of each graph produces under the same name, graph outputs
   included (graph inputs and weights are not intermediates; tensors inside If/Loop/Scan bodies
   cannot be exposed; values that are not tensors, such as sequences, are left out);
2. runs each model once on one sample, with those tensors exposed as outputs, one session at a
   time (the reference's is dropped before the candidate's is built; only the shared tensors'
   values are kept in between);
3. walks the candidate's nodes in their (topological) order and returns the first shared tensor
   that fails the rule ``verify`` applies to outputs (shape, dtype, NaN/Inf positions, and
   ``max_abs_error <= atol + rtol * max|ref|`` with the same tolerances), with the nodes that
   produce it in each graph and its errors.

The sample is the one on which the outputs differed most (relative to their tolerance), so the
walk looks where the failure is largest. float16/bfloat16 tensors are judged as ``verify``
judges such outputs (:mod:`normfold.low_precision`): against a run of the reference widened to
float32 (``widened``, a third session, after the other two), with the 16-bit reference's own
error as allowance; when that model cannot run, against the 16-bit reference within
``FACTOR + 1`` times the tolerance.

:class:`Localization` says what was found, and when nothing was, why (``note``): the graphs
share no tensor, none of the compared ones differs, or onnxruntime cannot run a model with its
intermediates exposed (a failure to localize never fails the verification).
"""

from __future__ import annotations

__all__ = ["Localization", "first_divergence", "worst_sample"]

import dataclasses
import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from normfold import low_precision
from normfold.errors import InputError, first_line
from normfold.runtime import ort_reason, session

Outputs = dict[str, np.ndarray]
# Compares two lists of samples tensor by tensor, as verify compares outputs, the third (or None)
# being the widened reference's run: name -> result with ``passed``, ``max_abs_error`` and
# ``max_rel_error``.
Compare = Callable[[list[Outputs], list[Outputs], "list[Outputs] | None"], Mapping[str, Any]]


@dataclasses.dataclass
class Localization:
    """What :func:`first_divergence` found.

    ``divergence``: ``{"tensor", "reference_node", "candidate_node", "max_abs_error",
    "max_rel_error"}`` or None; ``compared``: how many shared tensors both runs produced and
    were compared; ``note``: one sentence for people (always set when ``divergence`` is None,
    and when the first divergence is a graph output, since then no intermediate differs).
    """

    divergence: dict[str, Any] | None
    compared: int
    note: str | None = None


def first_divergence(
    reference: ir.Model,
    candidate: ir.Model,
    sample: Mapping[str, np.ndarray],
    compare: Compare,
    *,
    candidate_sample: Mapping[str, np.ndarray] | None = None,
    widened: Callable[[], ir.Model] | None = None,
) -> Localization:
    """The first tensor shared by name that differs beyond tolerance (see the module doc).

    ``sample`` feeds the reference (``candidate_sample`` the candidate, when its inputs are a
    subset). ``widened`` builds the reference with every float16/bfloat16 tensor in float32
    (:func:`normfold.verification.float64_model`); it is called only when a shared tensor is
    float16/bfloat16.
    """
    shared = _shared_tensors(reference, candidate)
    if not shared:
        return Localization(None, 0, "the graphs share no tensor by name: nothing to compare")
    try:
        expected = _run_exposing(reference, shared, sample, "the reference")
        gc.collect()
        got = _run_exposing(candidate, shared, candidate_sample if candidate_sample is not None else sample,
                            "the candidate")
        gc.collect()
    except _CannotExpose as error:
        return Localization(None, 0, f"could not localize: {error}")
    truth, fallback = _widened_run(widened, expected, sample)
    outputs = {value.name for value in candidate.graph.outputs}
    compared = 0
    for name, ref_node, cand_node in shared:  # in the candidate's order
        if name not in expected or name not in got:
            continue
        compared += 1
        wide = [{name: truth[name]}] if name in truth else None
        result = compare([{name: expected[name]}], [{name: got[name]}], wide)[name]
        if not result.passed:
            divergence = {
                "tensor": name,
                "reference_node": ref_node,
                "candidate_node": cand_node,
                "max_abs_error": _json_number(result.max_abs_error),
                "max_rel_error": _json_number(result.max_rel_error),
            }
            note = None
            if name in outputs:  # the walk reached an output: no intermediate tells more
                before = (f"none of the {compared - 1} tensor(s) the graphs share by name before it differs"
                          if compared > 1 else "the graphs share no tensor by name before it")
                note = f"{name!r} is a graph output: {before}"
            return Localization(divergence, compared, _joined(note, fallback))
    note = f"none of the {compared} tensor(s) the graphs share by name differs on the sample where the outputs differ most"
    return Localization(None, compared, _joined(note, fallback))


def _widened_run(
    widened: Callable[[], ir.Model] | None, expected: Outputs, sample: Mapping[str, np.ndarray]
) -> tuple[Outputs, str | None]:
    """The float32 run of the reference's float16/bfloat16 shared tensors (none when there are
    none), and a note when that run could not be made."""
    low = [name for name, array in expected.items() if low_precision.is_low_precision(array.dtype)]
    if widened is None or not low:
        return {}, None
    wide_sample = {
        name: array.astype(np.float32) if low_precision.is_low_precision(array.dtype) else array
        for name, array in sample.items()
    }
    try:
        truth = _run_exposing(widened(), [(name, "", "") for name in low], wide_sample, "the float32 reference")
    except (_CannotExpose, InputError) as error:
        return {}, f"float16/bfloat16 tensors judged against the 16-bit reference ({error})"
    finally:
        gc.collect()
    return truth, None


def _joined(note: str | None, fallback: str | None) -> str | None:
    return "; ".join(part for part in (note, fallback) if part) or None


def worst_sample(
    ref_outputs: Sequence[Outputs],
    cand_outputs: Sequence[Outputs],
    compare: Compare,
    truth_outputs: Sequence[Outputs] | None = None,
) -> int:
    """The sample on which an output differs most (largest relative error; not measured counts
    as infinite), judged as verify judged it (``truth_outputs``: its widened reference's run)."""

    def badness(k: int) -> float:
        truth = None if truth_outputs is None else [truth_outputs[k]]
        results = compare([ref_outputs[k]], [cand_outputs[k]], truth).values()
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


class _CannotExpose(Exception):
    """onnxruntime cannot build or run a model with its shared tensors exposed."""


def _run_exposing(
    model: ir.Model, shared: list[tuple[str, str, str]], sample: Mapping[str, np.ndarray], label: str
) -> Outputs:
    """Run a copy of ``model`` with the shared tensors as outputs; returns those that are tensors."""
    probe = model.clone()  # shares the weights
    wanted = {name for name, _, _ in shared}
    present = {value.name for value in probe.graph.outputs}
    for node in probe.graph:
        for value in node.outputs:
            # Exporters leave many intermediates untyped: onnxruntime infers the type of an
            # untyped graph output itself. (onnx_ir's ShapeInferencePass would type a sequence
            # as a tensor of its element type, which onnxruntime then refuses to load.)
            declared = value.type is None or isinstance(value.type, ir.TensorType)
            if value.name in wanted and value.name not in present and declared:
                probe.graph.outputs.append(value)
                present.add(value.name)
    try:
        sess = session(probe)
    except InputError as error:
        raise _CannotExpose(f"onnxruntime cannot load {label} with its shared tensors as outputs: "
                            f"{ort_reason(error)}") from None
    # A sequence, map or optional cannot be compared as an array.
    names = [out.name for out in sess.get_outputs() if out.name in wanted and out.type.startswith("tensor(")]
    try:
        arrays = sess.run(names, dict(sample))
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise _CannotExpose(f"onnxruntime cannot run {label} with its shared tensors as outputs: "
                            f"{first_line(error)}") from None
    del sess
    return {name: np.asarray(array) for name, array in zip(names, arrays)}


def _json_number(value: float) -> float | str | None:
    if value != value:
        return None
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return float(value)
