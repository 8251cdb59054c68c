"""The tools users would pick instead of normfold, each run the way its documentation says.

``python -m benchmarks.tools TOOL IN.onnx OUT.onnx`` runs one tool in a fresh process (so the
harness can measure its wall time and peak RSS alone) and prints ``{"seconds": ...}``; a tool
that fails prints ``{"error": "..."}`` and exits 1. Each tool is a function ``(in, out) -> None``.

A model whose weights lie in an external data file (a model over 2 GB has to) is written the
same way, weights in ``OUT.data`` beside OUT, the way each tool's documentation says to save
large models; ``onnx-ir`` and ``onnx`` (load and save, nothing else) are the floor every tool
pays for reading and writing the file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Protobuf cannot hold a model over 2 GiB; tools get the same margin as normfold.io.
_LARGE = 1_800_000_000


def _data_name(source: Path, out: Path) -> str | None:
    """``OUT.data`` when the input keeps its weights in external data, else None (one file)."""
    import onnx

    proto = onnx.load(source, load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return out.name + ".data" if external else None


def _onnx_save(model, source: Path, out: Path) -> None:
    import onnx

    data = _data_name(source, out)
    if data is None and model.ByteSize() <= _LARGE:
        onnx.save(model, out)
    else:
        onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data or out.name + ".data")


def _ir_save(model, source: Path, out: Path) -> None:
    import onnx_ir as ir

    ir.save(model, out, external_data=_data_name(source, out))


def _onnx_ir_copy(source: Path, out: Path) -> None:
    import onnx_ir as ir

    _ir_save(ir.load(source), source, out)


def _onnx_copy(source: Path, out: Path) -> None:
    import onnx

    _onnx_save(onnx.load(source), source, out)


def _normfold(target: str) -> Callable[[Path, Path], None]:
    def run(source: Path, out: Path) -> None:
        import contextlib
        import io

        from normfold.cli import run as normfold_command

        # The command users run (its console script's entry point), without verification:
        # it is timed on its own in the harness, and the other tools do not verify.
        data = _data_name(source, out)
        argv = ["optimize", str(source), "-o", str(out), "--no-verify", "-q", "--target", target,
                *(["--external-data", data] if data else [])]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
            code = normfold_command(argv)
        if code != 0:
            raise RuntimeError(f"normfold exited {code}: {errors.getvalue().strip()}")

    return run


def _onnxscript_optimize(source: Path, out: Path) -> None:
    import onnx_ir as ir
    import onnxscript

    model = ir.load(source)
    onnxscript.optimizer.optimize(model)  # constant folding + the default rewrite rules
    onnxscript.rewriter.rewrite(model)
    _ir_save(model, source, out)


def _onnxscript_fusions(source: Path, out: Path) -> None:
    import onnx_ir as ir
    import onnxscript
    from onnxscript.rewriter import onnx_fusions

    model = ir.load(source)
    onnxscript.optimizer.optimize(model)
    onnx_fusions.fuse(model)
    _ir_save(model, source, out)


def _onnxscript_ort(source: Path, out: Path) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(source)
    optimize_for_ort(model)
    _ir_save(model, source, out)


def _onnxruntime(level: str) -> Callable[[Path, Path], None]:
    def run(source: Path, out: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
        options.optimized_model_filepath = str(out)
        data = _data_name(source, out)
        if data is not None:  # onnxruntime's documented way to write a model over 2 GB
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
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
    _onnx_save(model, source, out)


def _onnxslim(source: Path, out: Path) -> None:
    import onnx
    import onnxslim

    _onnx_save(onnxslim.slim(onnx.load(source)), source, out)


def _onnxoptimizer(source: Path, out: Path) -> None:
    import onnx
    import onnxoptimizer

    passes = onnxoptimizer.get_fuse_and_elimination_passes()
    _onnx_save(onnxoptimizer.optimize(onnx.load(source), passes), source, out)


TOOLS: dict[str, Callable[[Path, Path], None]] = {
    "onnx-ir": _onnx_ir_copy,
    "onnx": _onnx_copy,
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


def _peak_rss_mb() -> float | None:
    """This process's own peak RSS (VmHWM). ``wait4``'s ``ru_maxrss`` cannot tell it: the child
    inherits the parent's high-water mark across fork and exec."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def main(argv: list[str]) -> int:
    name, source, out = argv
    start = time.perf_counter()
    try:
        TOOLS[name](Path(source), Path(out))
    except Exception as error:  # any tool failure is a benchmark result, not a crash
        print(json.dumps({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}))
        return 1
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
