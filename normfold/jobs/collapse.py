"""The ``normfold collapse IN.onnx`` job: load → cleanup → collapse → exact passes → measure → save.

1. The input is loaded and never modified; ``cleanup`` runs, then the ``collapse`` pass (which
   needs the BatchNorms still in the graph: it reads their parameters), then every exact
   default pass (``fold-bn`` and the others), then ``onnx.checker``.
2. The result is compared with the input in onnxruntime (optimizations off) on the calibration
   sample, or on ``samples`` random inputs shaped from the model: the per-output deviation is
   the report's ``verification`` object. It is a measurement, not a pass/fail verdict: the job
   is approximate by nature. It fails (:class:`VerificationError`) only when ``max_deviation``
   was asked for and the written model would exceed it.
3. Cost: the input, its BN-folded dense form (the budget's reference) and the output are
   counted (MACs) and timed batch-1 in onnxruntime (:class:`~normfold.passes.collapse.CostMeter`:
   median of ``latency_repeats`` rounds of ``latency_runs`` runs, the IQR kept), unless
   ``measure_latency`` is off. With ``target_latency`` the pass chooses its removals jointly
   under that budget and the report holds its prediction beside the measured output, and the
   options it weighed, the chosen and the refused with their reasons.
"""

from __future__ import annotations

__all__ = ["CollapseJob", "collapse_onnx"]

import dataclasses
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from normfold import io, progress
from normfold.errors import InputError, VerificationError
from normfold.jobs import common
from normfold.inputs import generate_inputs, load_inputs
from normfold.passes import DEFAULT_PASSES, PassOptions, create_passes
from normfold.options import Target
from normfold.passes.collapse import COLLAPSE_SITES, CollapsePass, CostMeter, dense_form
from normfold.verification import verify


@dataclasses.dataclass
class CollapseJob:
    """The collapsed model, its report, and the files ``save`` must not overwrite."""

    model: ir.Model
    report: dict[str, Any]
    protected: frozenset[Path] = frozenset()

    def save(self, path: str | os.PathLike, *, external_data: str | None = None) -> Path:
        written = io.save(self.model, path, external_data=external_data, protect=self.protected)
        self.report["output"] = str(written)
        return written


def collapse_onnx(
    source: io.ModelLike,
    *,
    remove: int | None = None,
    max_deviation: float | None = None,
    calibration: str | os.PathLike | None = None,
    max_flops_growth: float = 1.0,
    target: Target = "onnx",
    max_opset: int | None = None,
    samples: int = 3,
    show_progress: bool = False,
    target_latency: float | None = None,
    measure_latency: bool = True,
    max_segment_sites: int = 2,
    latency_runs: int = 50,
    latency_repeats: int = 5,
    max_steps: int = 3,
) -> CollapseJob:
    """Collapse ``source`` (see the module docstring); ``calibration`` is an ``.npz`` of model inputs.

    ``target_latency=R`` chooses the removals jointly so that the batch-1 onnxruntime latency
    is predicted at R times the BN-folded dense model's (a MACs ratio when ``measure_latency``
    is False), in up to ``max_steps`` joint steps, within ``max_deviation`` (default 0.01) as without a budget."""
    options = PassOptions(target=target, max_opset=max_opset)
    bar = progress.Steps(["load", "collapse", "exact passes", "check", "measure"], enabled=show_progress)
    with bar.step("load"):
        model, reference = common.working_copy(source)
    label = common.source_label(source)
    feeds = load_inputs(calibration, model) if calibration is not None else None
    meter = CostMeter(model, feeds[0] if feeds else generate_inputs(model, seed=0, label=label),
                      measure=measure_latency, runs=latency_runs, repeats=latency_repeats)
    collapse = CollapsePass(options, remove=remove, max_deviation=max_deviation, calibration=feeds,
                            max_flops_growth=max_flops_growth, samples=samples, target_latency=target_latency,
                            measure_latency=measure_latency, max_segment_sites=max_segment_sites,
                            max_steps=max_steps, meter=meter,
                            measure=False)  # the job measures the final model once, below
    exact = create_passes(list(DEFAULT_PASSES), options)
    report: dict[str, Any] = {"input": label, "output": None, "target": target, **common.summary(model, "before")}
    cost: dict[str, Any] = {"by": "latency" if measure_latency else "macs", "input": _cost(meter, model)}
    with bar.step("collapse"):
        exact[0](model)  # cleanup
        cost["dense"] = _cost(meter, dense_form(model))
        collapse(model)
    with bar.step("exact passes"):
        ir.passes.PassManager(exact[1:])(model)
    remaining = {node.name for node in model.graph.all_nodes()}
    for done in (exact[0], collapse, *exact[1:]):
        if done is not collapse:
            done.record.keep_refusals_of(remaining)
    with bar.step("check"):
        common.check_output(model, label)
    with bar.step("measure"):
        measured = verify(reference, model, inputs=feeds, samples=samples)
        cost["output"] = _cost(meter, model)
    bar.close()
    summary: dict[str, Any] = {
        "removed": sum(n for op, n in collapse.record.by_op.items() if op in COLLAPSE_SITES),
        "sites": [s["node"] for s in collapse.record.sites if s.get("how") == "linearized"],
        "refused": collapse.record.refused,
        "mode": "remove" if remove is not None else "target_latency" if target_latency is not None else "max_deviation",
        "max_deviation": collapse.max_deviation,
    }
    if collapse.selection is not None:
        selection = collapse.selection
        summary.update(target_latency=target_latency, feasible=selection["feasible"], chosen=selection["chosen"],
                       steps=selection["steps"], options=selection["options"], max_segment_sites=max_segment_sites)
        cost["predicted"] = {"latency_ms" if measure_latency else "macs": selection["predicted_cost"]}
    if measure_latency:
        cost["settings"] = {**meter.table.settings, "models_timed": len(meter.table)}
    report.update(
        common.summary(model, "after"),
        passes=[p.record.to_dict() for p in (exact[0], collapse, *exact[1:])],
        collapse=summary,
        cost=cost,
        verification=measured.to_dict(),
    )
    if collapse.max_deviation is not None and measured.max_rel_error > collapse.max_deviation:
        raise VerificationError(
            f"{label}: the collapsed model deviates {measured.max_rel_error:.3g} (relative) "
            f"> --max-deviation {collapse.max_deviation:g}; nothing written"
        )
    return CollapseJob(model, report, common.protected_files(source, model))


def _cost(meter: CostMeter, model: ir.Model) -> dict[str, Any]:
    """MACs (None when a shape is not static) and, when measuring, the batch-1 latency with its IQR."""
    try:
        macs: int | None = meter.macs(model)
    except InputError:
        macs = None
    return {"macs": macs, "latency": meter.timing(model).to_dict() if meter.measure else None}
