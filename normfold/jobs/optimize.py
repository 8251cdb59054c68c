"""The optimize job: load → passes → check → verify against the input → save.

One place decides the order of work, so the CLI and the Python API behave the same:

1. The input is loaded (validated, external data memory-mapped) and never modified: passes
   run on a copy when the caller handed us an ``onnx_ir.Model``, and on a fresh load otherwise.
2. ``cleanup`` and then the chosen passes run in one ``onnx_ir`` ``PassManager``; each pass keeps
   a record of the sites it rewrote and the ones it refused.
3. The result must pass ``onnx.checker``, run in memory on the graph without its weights' data
   (:func:`normfold.io.weightless_proto`), so a model of any size is checked without reading them.
4. Unless verification is switched off, onnxruntime runs input and result (optimizations off)
   on the same inputs, one session after the other; :meth:`OptimizeResult.save` refuses to
   write a result that failed.

Weights stay memory-mapped throughout: only the tensors a pass rewrites are read. Each step
(load, each pass, check, verify, and a later save) is timed and its peak resident memory
measured (:class:`normfold.progress.Steps`): the report's ``seconds`` and ``peak_rss_mb``.
"""

from __future__ import annotations

__all__ = ["OptimizeResult", "optimize"]

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from normfold import io, progress
from normfold.errors import InputError, VerificationError
from normfold.jobs import common
from normfold.opset import model_opset
from normfold.options import VerifyOptions, split
from normfold.passes import PassOptions, create_passes

if TYPE_CHECKING:
    from normfold.verification import VerificationReport


@dataclasses.dataclass
class OptimizeResult:
    """The optimized model, the report of what was done, and the verification (if run)."""

    model: ir.Model
    report: dict[str, Any]
    verification: VerificationReport | None
    protected: frozenset[Path] = frozenset()
    steps: progress.Steps | None = dataclasses.field(default=None, repr=False)

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.passed

    def save(self, path: str | os.PathLike, *, external_data: str | None = None) -> Path:
        """Write the model atomically; refuses when verification ran and failed."""
        if self.verification is not None and not self.verification.passed:
            raise VerificationError(f"{path}: not written: the optimized model failed verification")
        steps = self.steps or progress.Steps(enabled=False)
        with steps.step("save", total=io.tensor_bytes(self.model), unit="B") as bar:
            written = io.save(self.model, path, external_data=external_data, protect=self.protected, progress=bar.update)
        self.report["output"] = str(written)
        self.report.setdefault("seconds", {})["save"] = round(steps.seconds["save"], 3)
        self.report.setdefault("peak_rss_mb", {})["save"] = steps.peak_rss_mb["save"]
        return written


def optimize(
    source: io.ModelLike,
    *,
    passes: Sequence[str] | None = None,
    options: PassOptions | None = None,
    verify: bool = True,
    verify_options: VerifyOptions | None = None,
    show_progress: bool = False,
    **settings: Any,
) -> OptimizeResult:
    """Run the exact passes (default: all) on ``source`` and verify the result against it.

    ``options`` says what the passes may do, ``verify_options`` how the result is compared with
    ``source`` (:mod:`normfold.options`); ``settings`` are fields of either, as keywords
    (``target="onnxruntime"``, ``max_opset=17``, ``rtol=1e-4``, ``save_inputs="x.npz"`` ...),
    applied over them. ``show_progress`` shows each step that takes longer than a second on
    stderr (also the result's :meth:`~OptimizeResult.save`).
    """
    options, checks = split(settings, options or PassOptions(), verify_options or VerifyOptions())
    target, max_opset = options.target, options.max_opset
    if target not in ("onnx", "onnxruntime"):
        raise InputError(f"unknown target {target!r}; choose 'onnx' or 'onnxruntime'")
    if options.skip_ops and target != "onnxruntime":
        raise InputError("--skip-ops emits onnxruntime contrib ops: it needs --target onnxruntime")
    pass_list = create_passes(None if passes is None else list(passes), options)
    steps = ["load", *(p.name for p in pass_list), "check"] + (["verify"] if verify else []) + ["save"]
    bar = progress.Steps(steps, enabled=show_progress)

    # The cyclic collector is held off from the load to the output's check (see cyclic_gc_held).
    with common.cyclic_gc_held():
        with bar.step("load"):
            model, reference = common.working_copy(source)
        label = common.source_label(source)
        if max_opset is not None and model_opset(model) > max_opset:
            raise InputError(f"{label}: the model is at opset {model_opset(model)}, above --max-opset {max_opset}")
        if checks.dims:
            # A --dims name the model lacks is bad input before any pass runs, verified or not.
            from normfold.inputs import resolve_dims  # here: a run without --dims never imports it

            resolve_dims(model, checks.dims)
        # Verification reads the input's interface from this copy (it shares the weights) instead
        # of parsing the file again; onnxruntime still runs the file itself.
        unchanged = model.clone() if verify and isinstance(reference, (str, os.PathLike)) else None
        report: dict[str, Any] = {"input": label, "output": None, "target": target, **common.summary(model, "before")}
        for normfold_pass in pass_list:
            with bar.step(normfold_pass.name):
                ir.passes.PassManager([normfold_pass])(model)
        remaining = {node.name for node in model.graph.all_nodes()}
        for normfold_pass in pass_list:
            normfold_pass.record.keep_refusals_of(remaining)
        with bar.step("check"):
            common.check_output(model, label)
        report.update(common.summary(model, "after"), passes=[p.record.to_dict() for p in pass_list])
    verification = None
    if verify:
        # Imported here: --no-verify never imports verification (input generation, sessions).
        from normfold.verification import verify as run_verification

        # Verification shows its own progress, one line per session (reference, candidate).
        with bar.step("verify", show=False):
            verification = run_verification(
                reference, model, checks, progress=show_progress, reference_model=unchanged
            )
        report["verification"] = verification.to_dict()
    bar.close()
    report["seconds"] = {name: round(value, 3) for name, value in bar.seconds.items()}
    report["peak_rss_mb"] = dict(bar.peak_rss_mb)
    protected = common.protected_files(source, model)
    return OptimizeResult(model=model, report=report, verification=verification, protected=protected, steps=bar)

