"""Prove with onnxruntime that a candidate graph computes what a reference graph computes.

Both models run in onnxruntime's CPU provider with graph optimizations off
(:func:`normfold.runtime.session`), on the same inputs: the user's (a mapping, a list of them,
or an ``.npz`` read by :func:`normfold.inputs.load_inputs`) or ``samples`` random ones shaped
from the reference (:func:`normfold.inputs.generate_inputs`, sample ``k`` seeded ``seed + k``).
The reference runs on every sample and its session is dropped before the candidate's is built,
so two big models are never in memory together.

The rule, per output of the reference (errors are maxima over all samples):
  1. The candidate has an output of that name, of the same shape and dtype.
  2. NaN and ±Inf sit at the same positions (``nan_mismatch == inf_mismatch == 0``).
  3. Floating point: ``max_abs_error <= atol + rtol * max|ref|``, where ``max_abs_error`` is
     ``max |cand - ref|`` over positions finite in both, computed in float64, and
     ``max_rel_error = max_abs_error / max|ref|`` (scale-relative; 0 when both are all zero,
     ``inf`` when only the reference is). Integer, bool and string outputs must be equal.
  4. Tolerances default by the reference output's dtype (:func:`default_tolerance`); ``rtol``
     and ``atol`` override them for floating-point outputs.

:func:`compare` judges outputs computed elsewhere (a torch module's, by
:func:`normfold.torch.export`) by the same rule, so there is one comparator.

The interface is part of what is verified, so a changed one is a FAILED report, never an
exception: every input the reference needs must be an input of the candidate with the same
dtype (the candidate may drop inputs that were initializer-inputs of the reference: those are
never fed), the candidate may need no other input, and the output names must be the same. A
candidate that fails ``onnx.checker`` (full check, onnxruntime's ONNX-domain contrib ops
opaque) or that onnxruntime cannot load or run is FAILED too, with the reason in ``problems``:
it is the thing under test. A reference that fails the checker or cannot load or run, bad
``inputs`` or ``dims``, and a model file that cannot be read at all raise :class:`InputError`
(``normfold verify`` exit 2).

**float16/bfloat16 outputs** (the rule shared with the folds, ``normfold.low_precision``): a
16-bit model's outputs carry its own rounding, so they are judged against a run of the
reference converted to float32 (:func:`float64_model` with ``dtype=FLOAT``: every float tensor,
type and Cast target widened; float64 with ``reference_precision="float64"``), and the
candidate passes when its error against that run is at most ``FACTOR = 4`` times the reference
model's own error against it plus ``atol + rtol * max|float32 ref|`` (default ``rtol`` 4u:
2.0e-3 float16, 1.6e-2 bfloat16; ``atol = rtol / 10``). NaN/±Inf positions are compared with
the reference model's (an output that overflows float16 in the reference may overflow in the
candidate). When no float32 reference can be built, the candidate is compared with the
reference model within ``(FACTOR + 1)`` times the tolerance. The report's ``reference`` says
which run was the truth (``model``, ``float32`` or ``float64``).

``reference_precision="float64"`` compares the candidate with a float64 copy of the reference
instead (built on an onnx_ir clone, see :func:`float64_model`; inputs are upcast), and reports
in ``baseline_abs_error`` / ``baseline_rel_error`` the reference model's own error at its
precision against that float64 run, so fold error can be told from rounding. Integer and bool
outputs are still compared with the reference at its own precision (an ArgMax may flip on a
near tie between precisions; that is not the candidate's fault).
"""

from __future__ import annotations

__all__ = [
    "OutputComparison",
    "check_runs",
    "VerificationReport",
    "compare",
    "default_tolerance",
    "float64_model",
    "verify",
]

import dataclasses
import gc
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from tqdm import tqdm

from normfold import low_precision
from normfold.errors import InputError, first_line
from normfold.inputs import check_inputs, generate_inputs, load_inputs, model_inputs, write_inputs
from normfold.io import ModelLike, check, load
from normfold.options import VerifyOptions, split
from normfold.progress import Steps
from normfold.runtime import ort_reason, session

if TYPE_CHECKING:
    from normfold.localize import Localization

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]

# (rtol, atol) by dtype name. The criterion is scale-relative (rtol * max|ref|), so rtol is in
# units of the output's largest magnitude. Re-associating a sum of K terms (what folding and
# fusing do) moves a result by about sqrt(K) ulps of the scale: float32 folds of deep networks
# measure 1e-7 to 1e-5 of the scale, and a wrong fold (lost bias, wrong axis, eps moved onto
# the std) errs by 1e-3 or more. Each rtol leaves ~10x margin above rounding noise for its
# precision (float32 eps 1.2e-7, float64 2.2e-16); atol = rtol / 10 only matters for outputs
# whose scale is near zero. float16/bfloat16 add FACTOR times the reference's own error against
# float64 (low_precision); their rtol is the floor of that rule, two machine epsilons.
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-10),
    "float32": (1e-4, 1e-5),
    "float16": (low_precision.floor("float16"), low_precision.floor("float16") / 10),
    "bfloat16": (low_precision.floor(ml_dtypes.bfloat16), low_precision.floor(ml_dtypes.bfloat16) / 10),
}
# float8/float6/float4 formats: two or three mantissa bits.
_TINY_FLOAT_TOLERANCE = (0.25, 0.025)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
# Integer attributes that name the floating-point type an op produces.
_DTYPE_ATTRIBUTES = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "Bernoulli": "dtype",
    "DequantizeLinear": "output_dtype",
}
# Where onnxruntime names the node it cannot build: missing kernel, or a type the op refuses.
_NODE_IN_ERROR = re.compile(r"node with name '([^']*)'|[Nn]ode ?\(([^)]*)\)")
_OP_IN_ERROR = re.compile(r"implementation for (\w+)\(|of operator \((\w+)\)|Op \((\w+)\)")


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` for outputs of ``dtype`` (numpy dtype, ``ir.DataType`` or name).

    float64 (1e-9, 1e-10), float32 (1e-4, 1e-5), float16 (2.0e-3, 2.0e-4) and bfloat16
    (1.6e-2, 1.6e-3) on top of 4x the reference's own error (module doc),
    8-bit and smaller floats (0.25, 0.025); integers, bools and strings (0, 0): exact.
    """
    name = _dtype_name(dtype)
    if name in _TOLERANCES:
        return _TOLERANCES[name]
    if re.match(r"float[468]", name):
        return _TINY_FLOAT_TOLERANCE
    return (0.0, 0.0)


@dataclasses.dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference's (maxima over samples).

    Errors not measured (shapes differ, output missing, candidate failed) are NaN.
    ``baseline_*`` (float64 mode only): the reference model's own error against float64.
    """

    name: str
    shape: tuple[int, ...]
    candidate_shape: tuple[int, ...]
    dtype: str
    candidate_dtype: str
    max_abs_error: float
    max_rel_error: float
    nan_mismatch: int
    inf_mismatch: int
    rtol: float
    atol: float
    passed: bool
    problem: str | None = None
    baseline_abs_error: float | None = None
    baseline_rel_error: float | None = None
    # Percentiles (p50, p90, p99) of |cand - ref| over every finite position of every sample.
    abs_error_percentiles: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (not measured) becomes null, ±inf the strings "inf"/"-inf"."""
        result: dict[str, Any] = {
            "shape": list(self.shape),
            "candidate_shape": list(self.candidate_shape),
            "dtype": self.dtype,
            "candidate_dtype": self.candidate_dtype,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "nan_mismatch": self.nan_mismatch,
            "inf_mismatch": self.inf_mismatch,
            "rtol": self.rtol,
            "atol": self.atol,
            "passed": self.passed,
            "problem": self.problem,
        }
        # Always present: null when nothing was measured (missing output, other shape, no
        # position finite in both).
        percentiles = self.abs_error_percentiles
        result["abs_error_percentiles"] = None if percentiles is None else {
            k: _json_float(v) for k, v in percentiles.items()
        }
        if self.baseline_abs_error is not None:
            result["baseline_abs_error"] = _json_float(self.baseline_abs_error)
            result["baseline_rel_error"] = _json_float(self.baseline_rel_error)
        return result


@dataclasses.dataclass
class VerificationReport:
    """The outcome of :func:`verify`: per-output comparisons and what failed beyond them.

    ``problems`` holds the failures no single output owns (interface changes, a candidate that
    does not load); ``float32_ops`` the op types the float64 reference had to run in float32
    because onnxruntime's CPU provider has no double kernel for them or refuses double inputs.
    ``seconds`` and ``peak_rss_mb`` are per phase (``inputs``, ``reference``, ``candidate``,
    ``reference_float64``), the peak as :class:`normfold.progress.Steps` measures it.
    """

    passed: bool
    outputs: dict[str, OutputComparison]
    max_abs_error: float
    max_rel_error: float
    samples: int
    reference: Literal["model", "float32", "float64"]
    seconds: dict[str, float]
    problems: list[str] = dataclasses.field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    float32_ops: list[str] = dataclasses.field(default_factory=list)
    peak_rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    # With ``localize``: where the graphs start to differ (:mod:`normfold.localize`), None when
    # the outputs agree or no shared tensor differs; ``localize_note`` says why nothing was
    # found, or that the first divergence is a graph output.
    localized: bool = False
    first_divergence: dict[str, Any] | None = None
    localize_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``normfold verify --report`` writes)."""
        localized = (
            {"first_divergence": self.first_divergence, "localize_note": self.localize_note} if self.localized else {}
        )
        return {
            "passed": self.passed,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "samples": self.samples,
            "reference": self.reference,
            "problems": list(self.problems),
            "outputs": {name: c.to_dict() for name, c in self.outputs.items()},
            "inputs": {name: list(shape) for name, shape in self.input_shapes.items()},
            "float32_ops": list(self.float32_ops),
            "seconds": {key: round(value, 4) for key, value in self.seconds.items()},
            "peak_rss_mb": dict(self.peak_rss_mb),
            **localized,
        }

    def format_table(self) -> str:
        """A table for people, one row per output, ending in one PASSED:/FAILED: line."""
        baseline = self.reference != "model"
        header = ["output", "shape", "dtype", "max abs", "max rel", "nan/inf", "tolerance"]
        header += ["ref max abs"] if baseline else []
        header += ["result"]
        rows = [header]
        for c in self.outputs.values():
            shape = _shape_text(c.shape) if c.shape == c.candidate_shape else (
                f"{_shape_text(c.shape)} vs {_shape_text(c.candidate_shape)}"
            )
            dtype = c.dtype if c.dtype == c.candidate_dtype else f"{c.dtype} vs {c.candidate_dtype}"
            tolerance = "exact" if c.rtol == 0 and c.atol == 0 else f"rtol {c.rtol:g} atol {c.atol:g}"
            row = [c.name, shape, dtype, _number(c.max_abs_error), _number(c.max_rel_error),
                   f"{c.nan_mismatch}/{c.inf_mismatch}", tolerance]
            row += [_number(c.baseline_abs_error)] if baseline else []
            row += ["PASS" if c.passed else "FAIL"]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        for c in self.outputs.values():
            if c.problem:
                lines.append(f"{c.name}: {c.problem}")
        lines.extend(self.problems)
        if self.first_divergence is not None:
            d = self.first_divergence
            note = f" ({self.localize_note})" if self.localize_note else ""
            lines.append(
                f"first divergence: tensor {d['tensor']!r} (reference node {d['reference_node']!r}, candidate node "
                f"{d['candidate_node']!r}): max abs {_number(_float(d['max_abs_error']))}, "
                f"max rel {_number(_float(d['max_rel_error']))}{note}"
            )
        elif self.localized and not self.passed:
            lines.append(f"first divergence: {self.localize_note}")
        if self.float32_ops:
            lines.append(
                "float64 reference ran these ops in float32 (onnxruntime's CPU provider cannot run "
                f"them in double): {', '.join(self.float32_ops)}"
            )
        against = f"a {self.reference} reference" if baseline else "the reference"
        summary = (
            f"{len(self.outputs)} output(s) over {self.samples} sample(s) against {against}, "
            f"max abs {_number(self.max_abs_error)}, max rel {_number(self.max_rel_error)}"
        )
        if self.passed:
            lines.append(f"PASSED: {summary}")
        else:
            failed = [name for name, c in self.outputs.items() if not c.passed]
            what = f"{len(failed)} output(s) differ ({', '.join(failed)})" if failed else "interface differs"
            lines.append(f"FAILED: {what}; {summary}")
        return "\n".join(lines)


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    options: VerifyOptions | None = None,
    *,
    progress: bool = False,
    reference_model: ir.Model | None = None,
    **settings: Any,
) -> VerificationReport:
    """Run both models on the same inputs and compare every output (rules in the module doc).

    ``options`` (:class:`~normfold.options.VerifyOptions`, or its fields as keywords:
    ``inputs=``, ``rtol=``, ``localize=True`` ...) say how.

    ``inputs`` (an ``.npz`` path, one mapping, or a list of mappings, one per sample) replaces
    the random samples; then ``samples`` is ignored and ``dims`` must not be given. Models
    given as paths are loaded by onnxruntime from the path (external data stays on disk).
    ``reference_model`` is the reference's graph when the caller holds it already (an
    unchanged copy of what ``reference`` names): the file is then not parsed a second time.
    ``localize``: when outputs differ, find the first intermediate tensor the two graphs share
    by name that differs (:func:`normfold.localize.first_divergence`). ``save_inputs``: write
    the samples used to this ``.npz`` (:func:`normfold.inputs.write_inputs`; ``inputs`` reads it
    back).
    """
    options = split(settings, options or VerifyOptions())[0]
    inputs, dims, samples, seed = options.inputs, options.dims, options.samples, options.seed
    rtol, atol, reference_precision = options.rtol, options.atol, options.reference_precision
    localize, save_inputs = options.localize, options.save_inputs
    if reference_precision not in ("model", "float64"):
        raise InputError(f"reference precision {reference_precision!r}: expected 'model' or 'float64'")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} {value!r}: must be a finite number >= 0")
    ref_label, cand_label = _label(reference, "<reference>"), _label(candidate, "<candidate>")
    steps = Steps(enabled=progress)
    try:
        with steps.step("inputs", show=False):
            ref_model = reference_model if reference_model is not None else _checked(reference, ref_label)
            cand_model = load(candidate, check=False)
            checker_problems = _checker_problems(candidate, cand_label)
            feeds = _samples(ref_model, inputs, dims, samples, seed, ref_label)
            if save_inputs is not None:
                write_inputs(save_inputs, feeds)

        # One session at a time: each is dropped (and its memory-mapped weights unmapped)
        # before the next is built, so the peak stays near one session of the larger model.
        with steps.step("reference", label="verify: reference", total=len(feeds), unit="run") as bar:
            ref_outputs = _run_reference(_runnable(reference, ref_model), feeds, ref_label, "", bar)
            gc.collect()

        f64_outputs: list[Outputs] | None = None
        float32_ops: list[str] = []
        # 16-bit outputs are always judged against a wider run: float32 unless float64 is asked.
        low = _has_low_precision_output(ref_outputs[0])
        truth = "float64" if reference_precision == "float64" else "float32"
        if reference_precision == "float64" or low:
            label = f"verify: {truth} reference"
            with steps.step(f"reference_{truth}", label=label, total=len(feeds), unit="run") as bar:
                try:
                    wide = ir.DataType.DOUBLE if truth == "float64" else ir.DataType.FLOAT
                    f64_session, float32_ops = _float64_session(ref_model, ref_label, wide)
                    f64_feeds = [{k: _upcast(v, wide) for k, v in sample.items()} for sample in feeds]
                    f64_outputs = _run_reference(f64_session, f64_feeds, ref_label, f"{truth} ", bar)
                except InputError as error:
                    if reference_precision == "float64":
                        raise
                    logger.info("no float32 reference for the 16-bit outputs: %s", error)
                f64_session = None
                gc.collect()

        input_problems, output_problems, cand_feeds = _interface_problems(ref_model, cand_model, feeds)
        problems = checker_problems + input_problems + output_problems
        with steps.step("candidate", label="verify: candidate", total=len(cand_feeds), unit="run") as bar:
            if input_problems:
                cand_outputs, run_problem = None, "not compared: the candidate's inputs differ from the reference's"
            else:
                cand_outputs, run_problem = _run_candidate(_runnable(candidate, cand_model), cand_feeds, bar)
                if run_problem:
                    problems.append(f"{cand_label}: {run_problem}")
                    run_problem = "not compared: the candidate did not run"
            gc.collect()
    finally:
        steps.close()

    comparisons = _compare_all(ref_outputs, f64_outputs, cand_outputs, run_problem, rtol, atol)
    divergence, note = None, None
    if localize and cand_outputs is None:
        note = "not localized: the candidate did not run"
    elif localize and all(c.passed for c in comparisons.values()):
        # Passed, or failed for a reason no tensor carries (checker, interface): nothing to find.
        note = None if not problems else "not localized: every output agrees; the problems above are the failure"
    elif localize:
        started = time.perf_counter()
        found = _localize(ref_model, cand_model, feeds, cand_feeds, ref_outputs, cand_outputs, f64_outputs, rtol, atol)
        divergence, note = found.divergence, found.note
        steps.seconds["localize"] = time.perf_counter() - started
    return _report(
        comparisons,
        problems,
        samples=len(feeds),
        reference="model" if f64_outputs is None else truth,
        seconds=dict(steps.seconds),
        input_shapes={name: tuple(array.shape) for name, array in feeds[0].items()},
        float32_ops=float32_ops,
        peak_rss_mb=dict(steps.peak_rss_mb),
        localized=localize,
        first_divergence=divergence,
        localize_note=note,
    )


def compare(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]] | None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    problems: Sequence[str] = (),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    truth: Sequence[Mapping[str, np.ndarray]] | None = None,
    truth_precision: Literal["float32", "float64"] = "float32",
) -> VerificationReport:
    """Compare outputs computed elsewhere by :func:`verify`'s rule (module doc, 1-4).

    ``truth`` (one mapping per sample) is the reference computed at a wider precision
    (``truth_precision``: the model converted by :func:`float64_model`); float16/bfloat16
    outputs are then judged by the low-precision rule against it, as :func:`verify` does.

    ``reference`` and ``candidate`` hold one mapping (output name -> array) per sample, in the
    same order; the reference's first sample names the outputs compared, and a candidate output
    the reference lacks is a problem, as in :func:`verify`. ``candidate=None`` means the
    candidate did not run, and ``problems`` should say why. This is how outputs that no ONNX
    model produced (a torch module's, :func:`normfold.torch.export`) are judged with the same
    tolerances and NaN/Inf rules as a verification.
    """
    if not reference:
        raise InputError("compare: no reference outputs (at least one sample is needed)")
    problems = list(problems)
    if candidate is not None:
        problems += [
            f"output {name!r} of the candidate is not an output of the reference"
            for name in candidate[0]
            if name not in reference[0]
        ]
    run_problem = "not compared: the candidate did not run" if candidate is None else None
    comparisons = _compare_all(
        [dict(outputs) for outputs in reference],
        None if truth is None else [dict(outputs) for outputs in truth],
        None if candidate is None else [dict(outputs) for outputs in candidate],
        run_problem,
        rtol,
        atol,
    )
    return _report(
        comparisons,
        problems,
        samples=len(reference),
        reference="model" if truth is None else truth_precision,
        seconds={},
        input_shapes=dict(input_shapes or {}),
    )


def _report(
    comparisons: dict[str, OutputComparison], problems: list[str], **fields: Any
) -> VerificationReport:
    """The report of ``comparisons``: passed, and the maxima over the outputs that were measured."""
    measured = [c for c in comparisons.values() if not math.isnan(c.max_abs_error)]
    return VerificationReport(
        passed=not problems and all(c.passed for c in comparisons.values()),
        outputs=comparisons,
        max_abs_error=max((c.max_abs_error for c in measured), default=math.nan),
        max_rel_error=max((c.max_rel_error for c in measured), default=math.nan),
        problems=problems,
        **fields,
    )


def _localize(
    ref_model: ir.Model,
    cand_model: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    cand_feeds: list[dict[str, np.ndarray]],
    ref_outputs: list[Outputs],
    cand_outputs: list[Outputs],
    truth_outputs: list[Outputs] | None,
    rtol: float | None,
    atol: float | None,
) -> Localization:
    """The first shared tensor beyond tolerance, on the sample where the outputs differ most;
    16-bit tensors judged against a float32 run of the reference when verify had one."""
    from normfold.localize import first_divergence, worst_sample

    def compare(refs: list[Outputs], cands: list[Outputs], truths: list[Outputs] | None) -> dict[str, OutputComparison]:
        return _compare_all(refs, truths, cands, None, rtol, atol)

    def widened() -> ir.Model:
        return float64_model(ref_model, ir.DataType.FLOAT)

    k = worst_sample(ref_outputs, cand_outputs, compare, truth_outputs)
    return first_divergence(ref_model, cand_model, feeds[k], compare, candidate_sample=cand_feeds[k],
                            widened=widened if truth_outputs is not None else None)


# --- inputs and runs -----------------------------------------------------------------------


def _samples(
    model: ir.Model,
    inputs: str | Path | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None,
    dims: Mapping[str, int] | None,
    samples: int,
    seed: int,
    label: str,
) -> list[dict[str, np.ndarray]]:
    if inputs is None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InputError(f"samples {samples!r}: must be a positive integer")
        return [generate_inputs(model, dims=dims, seed=seed + k, label=label) for k in range(samples)]
    if dims:
        raise InputError("dims: give either inputs or dims (dims shape random inputs only)")
    if isinstance(inputs, (str, os.PathLike)):
        return load_inputs(inputs, model)
    given = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not given:
        raise InputError("inputs: an empty list of samples")
    return [check_inputs(sample, model, f"inputs[{k}]") for k, sample in enumerate(given)]


def _checked(source: ModelLike, label: str) -> ir.Model:
    """``source`` loaded as ``optimize`` loads its input: ``onnx.checker``'s full check on the
    file or proto (so what onnx_ir would silently repair, like an initializer given twice, is
    seen), known op domains."""
    model = load(source)
    if isinstance(source, ir.Model):
        check(model, label, full_check=True)
    return model


def _checker_problems(source: ModelLike, label: str) -> list[str]:
    """The candidate is what is under test: failing ``onnx.checker`` makes it FAILED, not bad input."""
    try:
        _checked(source, label)
    except InputError as error:
        return [str(error)]
    return []


def check_runs(source: ModelLike, label: str | None = None) -> None:
    """Raise :class:`InputError` when onnxruntime cannot load ``source`` or run it on one random
    sample: what ``verify`` and ``optimize`` would say of it as a reference (named ``label``)."""
    model = load(source, check=False)
    label = label or _label(source, "<model>")
    feeds = _samples(model, None, None, 1, 0, label)
    with tqdm(disable=True) as bar:
        _run_reference(_runnable(source, model), feeds, label, "", bar)


def _runnable(source: ModelLike, model: ir.Model) -> ModelLike:
    # From a path, onnxruntime reads the file itself: faster, and external data stays on disk.
    return source if isinstance(source, (str, os.PathLike, onnx.ModelProto)) else model


def _run_reference(source: Any, feeds: list[dict[str, np.ndarray]], label: str, kind: str, bar: tqdm) -> list[Outputs]:
    if isinstance(source, (str, os.PathLike, onnx.ModelProto, ir.Model)):
        try:
            source = session(source)
        except InputError as error:
            raise InputError(f"{label}: {kind}reference model fails to load in onnxruntime: {ort_reason(error)}") from None
    outputs = []
    for k, sample in enumerate(feeds):
        try:
            outputs.append(_run(source, sample))
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise InputError(f"{label}: {kind}reference model fails to run on sample {k}: {first_line(error)}") from None
        bar.update()
    return outputs


def _run_candidate(
    source: ModelLike, feeds: list[dict[str, np.ndarray]], bar: tqdm
) -> tuple[list[Outputs] | None, str | None]:
    try:
        sess = session(source)
    except InputError as error:
        return None, f"candidate fails to load in onnxruntime: {ort_reason(error)}"
    outputs = []
    for k, sample in enumerate(feeds):
        try:
            outputs.append(_run(sess, sample))
        except Exception as error:  # onnxruntime raises its own untyped errors
            return None, f"candidate fails to run on sample {k}: {first_line(error)}"
        bar.update()
    return outputs, None


def _run(sess: Any, feeds: dict[str, np.ndarray]) -> Outputs:
    names = [output.name for output in sess.get_outputs()]
    return {name: np.asarray(array) for name, array in zip(names, sess.run(names, feeds))}


def _interface_problems(
    ref: ir.Model, cand: ir.Model, feeds: list[dict[str, np.ndarray]]
) -> tuple[list[str], list[str], list[dict[str, np.ndarray]]]:
    """Input problems (the candidate cannot be fed), output-name problems, candidate feeds."""
    input_problems: list[str] = []
    cand_inputs = {value.name: value for value in cand.graph.inputs}
    for value in model_inputs(ref):
        other = cand_inputs.get(value.name)
        if other is None:
            input_problems.append(f"input {value.name!r} of the reference is not an input of the candidate")
        elif other.dtype != value.dtype:
            input_problems.append(
                f"input {value.name!r} is {_type_text(other)} in the candidate but {_type_text(value)} in the reference"
            )
    fed = {value.name for value in model_inputs(ref)}
    for value in model_inputs(cand):
        if value.name not in fed:
            where = " (a weight in the reference)" if value.name in ref.graph.initializers else ""
            input_problems.append(f"input {value.name!r} of the candidate is not an input of the reference{where}")
    ref_outputs = {value.name for value in ref.graph.outputs}
    output_problems = [
        f"output {value.name!r} of the candidate is not an output of the reference"
        for value in cand.graph.outputs
        if value.name not in ref_outputs
    ]
    cand_feeds = [{name: array for name, array in sample.items() if name in cand_inputs} for sample in feeds]
    return input_problems, output_problems, cand_feeds


# --- comparison ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Errors:
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    max_abs: float = 0.0
    scale: float = 0.0
    nan_mismatch: int = 0
    inf_mismatch: int = 0
    unequal: int = 0
    # |cand - ref| at the positions finite in both, one array per sample (for the percentiles).
    differences: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def percentiles(self) -> dict[str, float] | None:
        if not self.differences:
            return None
        values = np.percentile(np.concatenate(self.differences), [50, 90, 99])
        return {"p50": float(values[0]), "p90": float(values[1]), "p99": float(values[2])}

    @property
    def shape_problem(self) -> str | None:
        for ref_shape, cand_shape in self.shapes:
            if ref_shape != cand_shape:
                return f"shape {_shape_text(ref_shape)} vs {_shape_text(cand_shape)}"
        return None

    @property
    def max_rel(self) -> float:
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else math.inf


def _measure(refs: Sequence[np.ndarray], cands: Sequence[np.ndarray]) -> _Errors:
    errors = _Errors()
    for ref, cand in zip(refs, cands):
        errors.shapes.append((tuple(ref.shape), tuple(cand.shape)))
        if ref.shape != cand.shape:
            continue
        if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
            unequal = int(np.sum(ref != cand))
            errors.unequal += unequal
            errors.max_abs = max(errors.max_abs, float(unequal > 0))
            continue
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        errors.nan_mismatch += int(np.sum(np.isnan(r) != np.isnan(c)))
        errors.inf_mismatch += int(np.sum((np.isposinf(r) != np.isposinf(c)) | (np.isneginf(r) != np.isneginf(c))))
        finite = np.isfinite(r) & np.isfinite(c)
        if finite.any():
            difference = np.abs(c[finite] - r[finite])
            errors.differences.append(difference)
            errors.max_abs = max(errors.max_abs, float(np.max(difference)))
        finite_ref = np.abs(r[np.isfinite(r)])
        if finite_ref.size:
            errors.scale = max(errors.scale, float(finite_ref.max()))
        if ref.dtype.kind not in "fcV" or cand.dtype.kind not in "fcV":
            errors.unequal += int(np.sum(ref != cand)) if ref.dtype == cand.dtype else int(np.sum(r != c))
    return errors


def _compare_all(
    ref_outputs: list[Outputs],
    f64_outputs: list[Outputs] | None,
    cand_outputs: list[Outputs] | None,
    run_problem: str | None,
    rtol: float | None,
    atol: float | None,
) -> dict[str, OutputComparison]:
    comparisons = {}
    for name, first in ref_outputs[0].items():
        refs = [outputs[name] for outputs in ref_outputs]
        dtype = _dtype_name(first.dtype)
        exact = default_tolerance(dtype) == (0.0, 0.0)
        default_rtol, default_atol = default_tolerance(dtype)
        tol_r = default_rtol if exact or rtol is None else rtol
        tol_a = default_atol if exact or atol is None else atol
        baseline_abs = baseline_rel = None
        truth = refs
        if f64_outputs is not None and not exact:
            truth = [outputs[name] for outputs in f64_outputs]
            baseline = _measure(truth, refs)
            baseline_abs, baseline_rel = baseline.max_abs, baseline.max_rel
        missing = run_problem if cand_outputs is None else None
        if cand_outputs is not None and name not in cand_outputs[0]:
            missing = "missing from the candidate's outputs"
        if missing:
            comparisons[name] = OutputComparison(
                name, tuple(first.shape), (), dtype, "-", math.nan, math.nan, 0, 0, tol_r, tol_a,
                False, missing, baseline_abs, baseline_rel,
            )
            continue
        cands = [outputs[name] for outputs in cand_outputs]
        errors = _measure(truth, cands)
        low = low_precision.is_low_precision(first.dtype)
        if low and truth is not refs:
            # NaN/Inf where the 16-bit reference has them (it may overflow where float64 does not).
            at_model_precision = _measure(refs, cands)
            errors.nan_mismatch, errors.inf_mismatch = at_model_precision.nan_mismatch, at_model_precision.inf_mismatch
        cand_dtype = _dtype_name(cands[0].dtype)
        problem = errors.shape_problem
        if problem is None and cand_dtype != dtype:
            problem = f"dtype {dtype} vs {cand_dtype}"
        if problem is None and errors.nan_mismatch:
            problem = f"NaN at {errors.nan_mismatch} position(s) where the other has none"
        if problem is None and errors.inf_mismatch:
            problem = f"±Inf differs at {errors.inf_mismatch} position(s)"
        if problem is None and exact and errors.unequal:
            problem = f"{errors.unequal} value(s) differ (must be equal)"
        limit = tol_a + tol_r * errors.scale
        rule = "atol + rtol * max|ref|"
        if low and baseline_abs is not None:
            limit += low_precision.FACTOR * baseline_abs
            rule = f"{low_precision.FACTOR:g} x the reference's own error {baseline_abs:.3g} + {rule}"
        elif low:
            limit *= low_precision.FACTOR + 1
            rule = f"{low_precision.FACTOR + 1:g} x ({rule})"
        if problem is None and errors.max_abs > limit:
            problem = f"max abs error {errors.max_abs:.3g} > {rule} = {limit:.3g}"
        shape_known = errors.shape_problem is None
        comparisons[name] = OutputComparison(
            name=name,
            shape=tuple(first.shape),
            candidate_shape=tuple(cands[0].shape),
            dtype=dtype,
            candidate_dtype=cand_dtype,
            max_abs_error=errors.max_abs if shape_known else math.nan,
            max_rel_error=errors.max_rel if shape_known else math.nan,
            nan_mismatch=errors.nan_mismatch,
            inf_mismatch=errors.inf_mismatch,
            rtol=tol_r,
            atol=tol_a,
            passed=problem is None,
            problem=problem,
            baseline_abs_error=baseline_abs,
            baseline_rel_error=baseline_rel,
            abs_error_percentiles=errors.percentiles if shape_known else None,
        )
    return comparisons


# --- float64 reference ---------------------------------------------------------------------


def float64_model(model: ir.Model, dtype: ir.DataType = ir.DataType.DOUBLE) -> ir.Model:
    """A clone of ``model`` that computes in float64 (or ``dtype``, e.g. float32 for the
    16-bit rule) wherever the model computed in a float.

    Every float32/float16/bfloat16 tensor becomes float64: initializers, Constant and
    ConstantOfShape values, graph input/output and intermediate value types, and the target
    type of Cast (and of EyeLike, Random*, Bernoulli, DequantizeLinear). CastLike follows its
    target. ``model`` is not changed (its tensors are shared, never written). Ops that cannot
    run in double in onnxruntime are wrapped later by :func:`_float64_session`.
    """
    wide = np.dtype(dtype.numpy())
    clone = model.clone()
    # Exporters often leave intermediate values untyped; wrapping an op in float32 casts must
    # know which of its inputs and outputs are floats.
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(clone)
    graphs = list(clone.graphs())
    for function in clone.functions.values():
        graphs.append(function.graph)
        graphs.extend(function.graph.subgraphs())
    for number, graph in enumerate(graphs):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and tensor.dtype in _FLOAT_TYPES:
                value.const_value = ir.tensor(tensor.numpy().astype(wide), name=value.name)
        for value in _graph_values(graph):
            if value.type is not None:
                value.type = _double_type(value.type, dtype)
        for index, node in enumerate(graph):
            if not node.name:
                node.name = f"normfold_f64_{number}_{index}"
            _double_attributes(node, dtype)
    return clone


def _graph_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _double_type(type_: ir.TypeProtocol, dtype: ir.DataType) -> ir.TypeProtocol:
    if isinstance(type_, ir.TensorType):
        return ir.TensorType(dtype) if type_.dtype in _FLOAT_TYPES else type_
    if isinstance(type_, ir.SequenceType):
        return ir.SequenceType(_double_type(type_.elem_type, dtype))
    if isinstance(type_, ir.OptionalType):
        return ir.OptionalType(_double_type(type_.elem_type, dtype))
    return type_


def _double_attributes(node: ir.Node, dtype: ir.DataType) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    name = _DTYPE_ATTRIBUTES.get(node.op_type)
    attribute = node.attributes.get(name) if name else None
    if attribute is not None and ir.DataType(attribute.as_int()) in _FLOAT_TYPES:
        node.attributes[name] = ir.AttrInt64(name, dtype)
    for key, attribute in list(node.attributes.items()):
        if attribute.type == ir.AttributeType.TENSOR and attribute.as_tensor().dtype in _FLOAT_TYPES:
            node.attributes[key] = ir.AttrTensor(key, ir.tensor(attribute.as_tensor().numpy().astype(dtype.numpy())))
    if node.op_type == "Constant":
        for key in ("value_float", "value_floats"):
            attribute = node.attributes.pop(key, None)
            if attribute is not None:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.asarray(attribute.value, dtype.numpy())))


def _float64_session(model: ir.Model, label: str, dtype: ir.DataType = ir.DataType.DOUBLE) -> tuple[Any, list[str]]:
    """A session of the float64 (or ``dtype``) model; ops onnxruntime refuses in double run in
    float32.

    Each failure names a node; every node of that op type is wrapped (Cast to float32 before,
    Cast back after), so there is at most one retry per op type. A failure inside an ONNX
    function the runtime expanded (e.g. Gelu's Erf) names no node of the graph: then the
    function ops are wrapped.
    """
    f64 = float64_model(model, dtype)
    wrapped: set[tuple[str, str]] = set()
    while True:
        try:
            return session(f64), sorted(op for _, op in wrapped)
        except InputError as error:
            reason = ort_reason(error)
            nodes = _nodes_to_wrap(f64, reason, wrapped)
            if not nodes:
                raise InputError(f"{label}: cannot build a {np.dtype(dtype.numpy()).name} reference: {reason}") from None
            logger.info("float64 reference: running %s in float32", sorted({n.op_type for n in nodes}))
            for node in nodes:
                _compute_in_float32(node)


def _nodes_to_wrap(model: ir.Model, message: str, wrapped: set[tuple[str, str]]) -> list[ir.Node]:
    nodes = [node for graph in model.graphs() for node in graph]
    names = {group for match in _NODE_IN_ERROR.finditer(message) for group in match.groups() if group}
    ops = {group for match in _OP_IN_ERROR.finditer(message) for group in match.groups() if group}
    keys = {(n.domain, n.op_type) for n in nodes if n.name in names}
    keys = keys or {(n.domain, n.op_type) for n in nodes if n.op_type in ops}
    keys = keys or {(n.domain, n.op_type) for n in nodes if _is_function_op(n, model)}
    keys -= wrapped
    wrapped |= keys
    return [n for n in nodes if (n.domain, n.op_type) in keys and _touches_double(n)]


def _is_function_op(node: ir.Node, model: ir.Model) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, model.opset_imports.get("", 1), "")
    except onnx.defs.SchemaError:
        return False
    return schema.has_function or schema.has_context_dependent_function


def _touches_double(node: ir.Node) -> bool:
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    return any(v.dtype == ir.DataType.DOUBLE for v in values)


def _compute_in_float32(node: ir.Node) -> None:
    """Feed ``node`` float32 copies of its double inputs and cast its outputs back to double."""
    graph = node.graph
    for index, value in enumerate(node.inputs):
        if value is None or value.dtype != ir.DataType.DOUBLE:
            continue
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{node.name}/float32_in{index}")
        cast.outputs[0].name = f"{node.name}/float32_in{index}"
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        cast.outputs[0].shape = value.shape
        graph.insert_before(node, cast)
        node.replace_input_with(index, cast.outputs[0])
    for index, value in enumerate(node.outputs):
        if value.dtype != ir.DataType.DOUBLE:
            continue
        uses = list(value.uses())
        value.type = ir.TensorType(ir.DataType.FLOAT)
        back = ir.node("Cast", [value], {"to": ir.DataType.DOUBLE}, name=f"{node.name}/float64_out{index}")
        restored = back.outputs[0]
        restored.type = ir.TensorType(ir.DataType.DOUBLE)
        restored.shape = value.shape
        graph.insert_after(node, back)
        for user, position in uses:
            user.replace_input_with(position, restored)
        name = value.name
        value.name = f"{name}/float32"
        restored.name = name
        for position, output in enumerate(graph.outputs):
            if output is value:
                graph.outputs[position] = restored


# --- small helpers -------------------------------------------------------------------------


def _has_low_precision_output(outputs: Outputs) -> bool:
    return any(low_precision.is_low_precision(array.dtype) for array in outputs.values())


def _upcast(array: np.ndarray, dtype: ir.DataType = ir.DataType.DOUBLE) -> np.ndarray:
    widen = array.dtype.kind == "f" or _dtype_name(array.dtype) == "bfloat16"
    return array.astype(dtype.numpy()) if widen else array


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, ir.DataType):
        return np.dtype(dtype.numpy()).name
    if isinstance(dtype, str):
        return dtype
    return np.dtype(dtype).name


def _label(source: ModelLike, default: str) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else default


def _type_text(value: ir.Value) -> str:
    return value.dtype.name.lower() if value.dtype is not None else str(value.type)


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def _float(value: float | str | None) -> float:
    """A JSON-ready number back as a float (null is NaN)."""
    return math.nan if value is None else float(value)


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)
