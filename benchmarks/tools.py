"""The tools users would pick instead of normfold, each run the way its documentation says.

``python -m benchmarks.tools TOOL IN.onnx OUT.onnx`` runs one tool in a fresh process (so the
harness can measure its wall time and peak RSS alone) and prints ``{"seconds": ...}``; a tool
that fails prints ``{"error": "..."}`` and exits 1. Each tool is a function ``(in, out) -> None``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _normfold(target: str) -> Callable[[Path, Path], None]:
    def run(source: Path, out: Path) -> None:
        import normfold

        # Verification is timed on its own in the harness; the other tools do not verify.
        normfold.optimize(source, target=target, verify=False).save(out)

    return run


def _onnxscript_optimize(source: Path, out: Path) -> None:
    import onnx_ir as ir
    import onnxscript

    model = ir.load(source)
    onnxscript.optimizer.optimize(model)  # constant folding + the default rewrite rules
    onnxscript.rewriter.rewrite(model)
    ir.save(model, out)


def _onnxscript_fusions(source: Path, out: Path) -> None:
    import onnx_ir as ir
    import onnxscript
    from onnxscript.rewriter import onnx_fusions

    model = ir.load(source)
    onnxscript.optimizer.optimize(model)
    onnx_fusions.fuse(model)
    ir.save(model, out)


def _onnxscript_ort(source: Path, out: Path) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(source)
    optimize_for_ort(model)
    ir.save(model, out)


def _onnxruntime(level: str) -> Callable[[Path, Path], None]:
    def run(source: Path, out: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])

    return run


def _ort_transformers(source: Path, out: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(source), model_type="bert", opt_level=1, use_gpu=False).save_model_to_file(str(out))


def _onnxsim(source: Path, out: Path) -> None:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(source))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, out)


def _onnxslim(source: Path, out: Path) -> None:
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(source)), out)


def _onnxoptimizer(source: Path, out: Path) -> None:
    import onnx
    import onnxoptimizer

    passes = onnxoptimizer.get_fuse_and_elimination_passes()
    onnx.save(onnxoptimizer.optimize(onnx.load(source), passes), out)


TOOLS: dict[str, Callable[[Path, Path], None]] = {
    "normfold": _normfold("onnx"),
    "normfold-ort": _normfold("onnxruntime"),
    "onnxscript": _onnxscript_optimize,
    "onnxscript-fusions": _onnxscript_fusions,
    "onnxscript-ort": _onnxscript_ort,
    "ort-basic": _onnxruntime("BASIC"),
    "ort-extended": _onnxruntime("EXTENDED"),
    "ort-transformers": _ort_transformers,
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
    "onnxoptimizer": _onnxoptimizer,
}


def main(argv: list[str]) -> int:
    name, source, out = argv
    start = time.perf_counter()
    try:
        TOOLS[name](Path(source), Path(out))
    except Exception as error:  # any tool failure is a benchmark result, not a crash
        print(json.dumps({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}))
        return 1
    print(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
