"""Batch-1 CPU latency under onnxruntime: the input model, normfold's outputs, other tools'.

    python -m benchmarks.latency [--cases resnet,bert,llama] [--runs 10] [--warmup 2] [--threads 2]
                                 [--json latency.json]

Cases (zoo exports through :func:`normfold.models.export.cached_export`):

- ``resnet`` (issue 3): the zoo's ResNet at ResNet-34's shape (BasicBlocks ``(3, 4, 6, 3)``,
  width 64, 1000 classes, 224x224 images; 3.6 GFLOPs), exported ``ts13-keepbn`` so every
  BatchNorm is a node: the input and normfold's output.
- ``bert`` (issue 4): BERT-base (12 layers, hidden 768, 12 heads, vocab 30522) exported
  ``ts14`` (LayerNorm decomposed), sequence 64.
- ``repvgg`` (issue 14): the zoo's RepVGG at RepVGG-A0's shape (stages 48-96-192-1280 wide,
  ``(2, 4, 14, 1)`` blocks after the stem, 224x224, 1000 classes), exported ``ts13-keepbn`` in
  its training-time form (three branches a block): the input and normfold's output, where
  ``fold-branches`` makes every block one 3×3 Conv.
- ``llama`` (issue 4): a LLaMA-style decoder of 8 layers, hidden 1024, 16 heads (4 KV heads),
  vocab 32000 (about 150M parameters), exported ``ts17`` (RMSNorm decomposed), sequence 32.

For the transformers the candidates are normfold ``--target onnx`` and ``--target
onnxruntime`` and the other tools' outputs (onnxscript's ``optimize_for_ort``, the
onnxruntime transformers optimizer, onnxruntime's own EXTENDED level saved offline), each made
by :mod:`benchmarks.tools` in its own process. Every model is timed twice: in a session with
graph optimizations off (``ORT_DISABLE_ALL``: what the file itself costs) and on
(``ORT_ENABLE_ALL``: what a user gets by default).

Measurement: ``intra_op_num_threads`` fixed (``--threads``, default 2: this machine's cores),
sequential execution, the same random batch-1 inputs for every model. Models are timed in
blocks of rounds, each block interleaving the input with optimizations on and the model
measured (each round runs input-on, candidate-off, candidate-on once; ``--warmup`` untimed
rounds first), so load from other processes on this shared machine falls on both alike. The
table gives the median and p90 of the rounds in ms, and the speedup of each median over the
input's median with optimizations on measured in the same block.
Each candidate's outputs are compared with the input's (optimizations off): ``max rel`` is
the largest error relative to each output's largest magnitude; a tool that fails is listed
with its error.
"""

from __future__ import annotations

__all__ = ["CASES", "Case", "main"]

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_TOOL_TIMEOUT_S = 900
TRANSFORMER_TOOLS = ("normfold", "normfold-ort", "onnxscript-ort", "ort-transformers", "ort-extended")


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to time: a zoo export and the tools whose outputs are timed beside it."""

    name: str
    label: str
    model: str
    variant: str
    size: dict[str, Any]
    dims: dict[str, int]
    tools: tuple[str, ...]


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("resnet", "ResNet-34 shape, 224x224, ts13-keepbn", "resnet", "ts13-keepbn",
             {"width": 64, "blocks": (3, 4, 6, 3), "image": 224, "classes": 1000}, {"batch": 1}, ("normfold",)),
        Case("repvgg", "RepVGG-A0 shape, 224x224, ts13-keepbn", "repvgg", "ts13-keepbn",
             {"widths": (48, 96, 192, 1280), "depths": (2, 4, 14, 1), "groups": 1, "image": 224,
              "classes": 1000}, {"batch": 1}, ("normfold",)),
        Case("bert", "BERT-base, seq 64, ts14", "bert", "ts14",
             {"layers": 12, "hidden": 768, "heads": 12, "vocab": 30522}, {"batch": 1, "seq": 64}, TRANSFORMER_TOOLS),
        Case("llama", "LLaMA 8x1024 (150M), seq 32, ts17", "llama", "ts17",
             {"layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "vocab": 32000},
             {"batch": 1, "seq": 32}, TRANSFORMER_TOOLS),
    )
}


@dataclasses.dataclass
class Timing:
    model: str  # "input" or the tool's name
    level: str  # "off" | "on"
    times_ms: list[float]
    baseline_ms: list[float]  # the input's, with optimizations on, in the same rounds
    max_rel_error: float | None = None
    error: str | None = None
    nodes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times_ms, 90))


def _make(tool: str, source: Path, out: Path) -> tuple[float | None, str | None]:
    """Run one tool in its own process; (seconds, error)."""
    try:
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.tools", tool, str(source), str(out)],
            check=False, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {_TOOL_TIMEOUT_S} s"
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"exit {process.returncode}, no result"}
    return result.get("seconds"), result.get("error")


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def _max_rel(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    errors = []
    for name, ref in reference.items():
        cand = candidate.get(name)
        if cand is None or cand.shape != ref.shape:
            return float("inf")
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        errors.append(float(np.nanmax(np.abs(c - r))) / max(float(np.nanmax(np.abs(r))), 1e-30))
    return max(errors)


def _rounds(sessions: list[Any], feeds: dict[str, np.ndarray], warmup: int, runs: int) -> list[list[float]]:
    """Time each session once per round, ``warmup`` untimed rounds first; ms per session."""
    times: list[list[float]] = [[] for _ in sessions]
    for round_ in range(warmup + runs):
        for index, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feeds)
            if round_ >= warmup:
                times[index].append((time.perf_counter() - start) * 1000)
    return times


def time_case(case: Case, folder: Path, *, warmup: int, runs: int, threads: int) -> list[Timing]:
    from normfold.inputs import generate_inputs
    from normfold.io import load
    from normfold.models.export import cached_export
    from normfold.runtime import ort_reason, session

    print(f"latency: exporting {case.name}", file=sys.stderr)
    source = cached_export(case.model, case.variant, **case.size)
    feeds = generate_inputs(load(source), dims=case.dims, seed=0)
    input_off, input_on = session(source, threads=threads, prepack=True, spinning=True), session(source, optimize=True, threads=threads)
    names = [o.name for o in input_off.get_outputs()]
    reference = dict(zip(names, input_off.run(names, feeds)))

    candidates: list[tuple[str, Path | None, str | None]] = []
    for tool in case.tools:
        out = folder / f"{case.name}-{tool}.onnx"
        seconds, error = _make(tool, source, out)
        print(f"latency: {case.name}: {tool} took {seconds or 0:.1f} s", file=sys.stderr)
        candidates.append((tool, None if error else out, error))

    # Each block times the input with optimizations on beside what it measures (see docstring).
    print(f"latency: {case.name}: timing the input", file=sys.stderr)
    on_times, off_times = _rounds([input_on, input_off], feeds, warmup, runs)
    nodes = _nodes(source)
    timings = [Timing("input", "off", off_times, on_times, nodes=nodes)]
    baseline = list(on_times)
    for tool, path, error in candidates:
        if path is None:
            timings.append(Timing(tool, "off", [], [], error=error))
            continue
        try:
            off, on = session(path, threads=threads, prepack=True, spinning=True), session(path, optimize=True, threads=threads)
            outputs = dict(zip(names, off.run(names, feeds)))
        except Exception as exc:  # onnxruntime's own untyped errors: the output does not run
            timings.append(Timing(tool, "off", [], [], error=ort_reason(exc)))
            continue
        print(f"latency: {case.name}: timing {tool}", file=sys.stderr)
        block_on, cand_off, cand_on = _rounds([input_on, off, on], feeds, warmup, runs)
        baseline += block_on
        error = _max_rel(reference, outputs)
        timings.append(Timing(tool, "off", cand_off, block_on, error, nodes=_nodes(path)))
        timings.append(Timing(tool, "on", cand_on, block_on, error, nodes=_nodes(path)))
        del off, on
    timings.insert(1, Timing("input", "on", baseline, baseline, nodes=nodes))
    return timings


def table(results: dict[str, list[Timing]], threads: int) -> str:
    header = (f"{'case':<8}{'model':<18}{'nodes':>7}  {'ORT opt':<9}{'median ms':>11}{'p90 ms':>9}"
              f"{'vs input on':>13}{'max rel':>10}")
    lines = [header, "-" * len(header)]
    for name, timings in results.items():
        for t in timings:
            if t.error:
                lines.append(f"{name:<8}{t.model:<18}{'-':>7}  fails: {t.error}")
                continue
            speedup = statistics.median(t.baseline_ms) / t.median
            rel = "-" if t.max_rel_error is None else f"{t.max_rel_error:.1e}"
            lines.append(
                f"{name:<8}{t.model:<18}{t.nodes:>7}  {t.level:<9}{t.median:>11.1f}{t.p90:>9.1f}{speedup:>12.2f}x{rel:>10}"
            )
    lines.append(f"(batch 1, CPU execution provider, intra_op_num_threads={threads}, sequential; "
                 "'vs input on': input's median with ORT_ENABLE_ALL / this median, same rounds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every timing here")
    args = parser.parse_args(argv)
    results: dict[str, list[Timing]] = {}
    with tempfile.TemporaryDirectory(prefix="normfold-latency-") as folder:
        for name in args.cases.split(","):
            started = time.perf_counter()
            results[name] = time_case(CASES[name], Path(folder), warmup=args.warmup, runs=args.runs, threads=args.threads)
            print(f"latency: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(table(results, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {name: [dataclasses.asdict(t) for t in timings] for name, timings in results.items()}, indent=2
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
