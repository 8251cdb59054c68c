"""Isolated normalization ops on onnxruntime's CPU provider: every spelling fuse-norm chooses among.

    python -m benchmarks.norm_ops [--cases rmsnorm,groupnorm] [--threads 1,2] [--runs 25]
                                  [--warmup 2] [--block-ms 20] [--sizes default|small]
                                  [--json norm_ops.json]

The target-specific choices of ``fuse-norm`` (:mod:`normfold.passes.fuse_rms_norm`,
:mod:`~normfold.passes.fuse_layer_norm`, :mod:`~normfold.passes.fuse_group_norm`,
:mod:`~normfold.passes.fuse_skip_norm`, :mod:`~normfold.passes._norm_spec`) rest on these
measurements. Each case is one normalization, float32, written several ways as tiny graphs, the
first spelling being the one the others are compared with:

- ``rmsnorm`` 1x128x768: decomposed (Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul weight; opset
  17), RMSNormalization-23, SimplifiedLayerNormalization (onnxruntime's, ONNX domain, opset 17;
  see :mod:`normfold.ort_contrib`).
- ``layernorm`` 1x128x768: decomposed (opset 17), LayerNormalization-17, LayerNormalization at
  opset 13 (onnxruntime's ONNX-domain contrib op).
- ``residual-layernorm`` 1x128x768: Add + decomposed LayerNorm, Add + LayerNormalization-17,
  com.microsoft SkipLayerNormalization.
- ``residual-rmsnorm`` 1x128x768: Add + SimplifiedLayerNormalization, Add +
  RMSNormalization-23, com.microsoft SkipSimplifiedLayerNormalization.
- ``groupnorm`` 1x320x64x64, 32 groups: Reshape + InstanceNormalization + Reshape + Mul + Add
  (opset 13, as :func:`normfold.passes._norm_spec.emit` writes it), GroupNormalization-21, and
  the hand-written decomposed graph (opset 17).
- ``channels-first-layernorm`` 1x96x56x56 over axis 1 (ConvNeXt): decomposed over axis 1,
  Transpose + LayerNormalization-17 + Transpose.

``--sizes small`` shrinks every shape (a smoke run of a few seconds).

Check: every spelling runs once with graph optimizations off (:func:`normfold.runtime.run`) on
the same seeded inputs; ``max rel`` is ``max|y - y_first| / max|y_first|`` against the case's
first spelling. A spelling that onnxruntime cannot load or run is listed with its error.

Measurement: every spelling in a session with graph optimizations off (``ORT_DISABLE_ALL``: what
the graph itself costs) and one with them on (``ORT_ENABLE_ALL``: what a user gets by default),
for each ``--threads`` count, sequential execution. Each thread count is timed in a process of
its own whose sessions share one onnxruntime thread pool of that size: a session's own pool
keeps its workers spinning for a while after each call, so sessions with pools of their own,
timed in turn, steal the cores from each other (on this 2-core machine that made two-thread
calls 2-5x slower). A sample is the mean time of one call in a block of back-to-back calls
lasting about ``--block-ms`` (the number of calls is set per session while warming it up; a call
includes onnxruntime's Python binding, a few µs). All sessions of a case are timed round by
round, each round one block of every session (the order rotating), ``--warmup`` untimed rounds
first, so load from other processes on this shared machine falls on all alike. The table gives
the median and p90 over ``--runs`` rounds in µs per call, and ``vs 1st``: this median over the
first spelling's median at the same optimization level and thread count (below 1: faster).
"""

from __future__ import annotations

__all__ = ["CASES", "Case", "Row", "Size", "Spelling", "main", "measure", "table"]

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from normfold.runtime import ort_reason, run

LEVELS = ("off", "on")


@dataclasses.dataclass(frozen=True)
class Size:
    """The input shape of a case (and the group count, for GroupNorm)."""

    shape: tuple[int, ...]
    groups: int = 0

    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{dims}, {self.groups} groups" if self.groups else dims


class _Graph:
    """Nodes and float32/int64 initializers of one graph at one default-domain opset."""

    def __init__(self, opset: int, microsoft: bool) -> None:
        self.opset = opset
        self.microsoft = microsoft
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: Any) -> str:
        array = np.asarray(value)
        array = array.astype(np.int64 if array.dtype.kind in "iu" else np.float32)
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", **attributes: Any) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, domain=domain, **attributes))
        return out

    def model(self, inputs: tuple[str, ...], shape: tuple[int, ...], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "norm",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
            self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.microsoft:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return model


Body = Callable[[_Graph, Size], str]


@dataclasses.dataclass(frozen=True)
class Spelling:
    """One way to write a case: ``body`` adds its nodes to a graph at ``opset`` and returns y."""

    name: str
    opset: int
    body: Body
    microsoft: bool = False


@dataclasses.dataclass(frozen=True)
class Case:
    """One normalization: its graph inputs (of the same shape), sizes and spellings."""

    name: str
    inputs: tuple[str, ...]
    sizes: dict[str, Size]
    spellings: tuple[Spelling, ...]

    def model(self, spelling: Spelling, size: Size) -> onnx.ModelProto:
        graph = _Graph(spelling.opset, spelling.microsoft)
        return graph.model(self.inputs, size.shape, spelling.body(graph, size))

    def feeds(self, size: Size) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        # An offset mean, so that centring matters.
        return {name: rng.normal(0.5, 2.0, size=size.shape).astype(np.float32) for name in self.inputs}


# --- the spellings ------------------------------------------------------------------------

_RMS_EPS, _EPS = 1e-6, 1e-5


def _scale(n: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(0.5, 1.5, size=n).astype(np.float32)


def _bias(n: int) -> np.ndarray:
    return np.random.default_rng(2).normal(size=n).astype(np.float32)


def _per_channel(values: np.ndarray, rank: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (rank - 2))


def _rms_decomposed(g: _Graph, x: str, size: Size) -> str:
    mean_square = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), axes=[-1])
    root = g.op("Sqrt", g.op("Add", mean_square, g.const(_RMS_EPS)))
    return g.op("Mul", g.op("Div", x, root), g.const(_scale(size.shape[-1])))


def _ln_decomposed(g: _Graph, x: str, size: Size, axis: int = -1) -> str:
    centred = g.op("Sub", x, g.op("ReduceMean", x, axes=[axis]))
    variance = g.op("ReduceMean", g.op("Pow", centred, g.const(2.0)), axes=[axis])
    normalized = g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(_EPS))))
    scale, bias = _scale(size.shape[axis]), _bias(size.shape[axis])
    if axis != -1:
        scale, bias = _per_channel(scale, len(size.shape)), _per_channel(bias, len(size.shape))
    return g.op("Add", g.op("Mul", normalized, g.const(scale)), g.const(bias))


def _layer_norm(g: _Graph, x: str, size: Size) -> str:
    hidden = size.shape[-1]
    return g.op("LayerNormalization", x, g.const(_scale(hidden)), g.const(_bias(hidden)), axis=-1, epsilon=_EPS)


def _rms_op(op_type: str) -> Callable[[_Graph, str, Size], str]:
    def body(g: _Graph, x: str, size: Size) -> str:
        return g.op(op_type, x, g.const(_scale(size.shape[-1])), axis=-1, epsilon=_RMS_EPS)

    return body


def _on_x(norm: Callable[[_Graph, str, Size], str]) -> Body:
    return lambda g, size: norm(g, "x", size)


def _on_sum(norm: Callable[[_Graph, str, Size], str]) -> Body:
    return lambda g, size: norm(g, g.op("Add", "x", "r"), size)


def _skip_layer_norm(g: _Graph, size: Size) -> str:
    hidden = size.shape[-1]
    scale, bias = g.const(_scale(hidden)), g.const(_bias(hidden))
    return g.op("SkipLayerNormalization", "x", "r", scale, bias, domain="com.microsoft", epsilon=_EPS)


def _skip_simplified(g: _Graph, size: Size) -> str:
    scale = g.const(_scale(size.shape[-1]))
    return g.op("SkipSimplifiedLayerNormalization", "x", "r", scale, domain="com.microsoft", epsilon=_RMS_EPS)


def _group_affine(g: _Graph, y: str, size: Size) -> str:
    channels, rank = size.shape[1], len(size.shape)
    scale, bias = _per_channel(_scale(channels), rank), _per_channel(_bias(channels), rank)
    return g.op("Add", g.op("Mul", y, g.const(scale)), g.const(bias))


def _group_instance(g: _Graph, size: Size) -> str:
    view = g.op("Reshape", "x", g.const([0, size.groups, -1]))
    ones, zeros = g.const(np.ones(size.groups)), g.const(np.zeros(size.groups))
    normalized = g.op("InstanceNormalization", view, ones, zeros, epsilon=_EPS)
    return _group_affine(g, g.op("Reshape", normalized, g.op("Shape", "x")), size)


def _group_norm(g: _Graph, size: Size) -> str:
    channels = size.shape[1]
    scale, bias = g.const(_scale(channels)), g.const(_bias(channels))
    return g.op("GroupNormalization", "x", scale, bias, num_groups=size.groups, epsilon=_EPS)


def _group_decomposed(g: _Graph, size: Size) -> str:
    view = g.op("Reshape", "x", g.const([0, size.groups, -1]))
    centred = g.op("Sub", view, g.op("ReduceMean", view, axes=[2]))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[2])
    normalized = g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(_EPS))))
    back = g.op("Reshape", normalized, g.const([0, *size.shape[1:]]))
    return _group_affine(g, back, size)


def _channels_first_decomposed(g: _Graph, size: Size) -> str:
    return _ln_decomposed(g, "x", size, axis=1)


def _channels_first_transposed(g: _Graph, size: Size) -> str:
    rank = len(size.shape)
    last = g.op("Transpose", "x", perm=[0, *range(2, rank), 1])
    channels = size.shape[1]
    normalized = g.op(
        "LayerNormalization", last, g.const(_scale(channels)), g.const(_bias(channels)), axis=-1, epsilon=_EPS
    )
    return g.op("Transpose", normalized, perm=[0, rank - 1, *range(1, rank - 1)])


_TOKENS = {"default": Size((1, 128, 768)), "small": Size((1, 8, 32))}

CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("rmsnorm", ("x",), _TOKENS, (
            Spelling("decomposed@17", 17, _on_x(_rms_decomposed)),
            Spelling("RMSNormalization@23", 23, _on_x(_rms_op("RMSNormalization"))),
            Spelling("SimplifiedLayerNormalization@17", 17, _on_x(_rms_op("SimplifiedLayerNormalization"))),
        )),
        Case("layernorm", ("x",), _TOKENS, (
            Spelling("decomposed@17", 17, _on_x(_ln_decomposed)),
            Spelling("LayerNormalization@17", 17, _on_x(_layer_norm)),
            Spelling("LayerNormalization@13 (ort contrib)", 13, _on_x(_layer_norm)),
        )),
        Case("residual-layernorm", ("x", "r"), _TOKENS, (
            Spelling("Add+decomposed@17", 17, _on_sum(_ln_decomposed)),
            Spelling("Add+LayerNormalization@17", 17, _on_sum(_layer_norm)),
            Spelling("ms.SkipLayerNormalization", 17, _skip_layer_norm, microsoft=True),
        )),
        Case("residual-rmsnorm", ("x", "r"), _TOKENS, (
            Spelling("Add+SimplifiedLayerNormalization@17", 17, _on_sum(_rms_op("SimplifiedLayerNormalization"))),
            Spelling("Add+RMSNormalization@23", 23, _on_sum(_rms_op("RMSNormalization"))),
            Spelling("ms.SkipSimplifiedLayerNormalization", 17, _skip_simplified, microsoft=True),
        )),
        Case("groupnorm", ("x",), {"default": Size((1, 320, 64, 64), 32), "small": Size((1, 32, 8, 8), 8)}, (
            Spelling("Reshape+InstanceNormalization@13", 13, _group_instance),
            Spelling("GroupNormalization@21", 21, _group_norm),
            Spelling("decomposed@17", 17, _group_decomposed),
        )),
        Case("channels-first-layernorm", ("x",), {"default": Size((1, 96, 56, 56)), "small": Size((1, 16, 8, 8))}, (
            Spelling("decomposed@17 (axis 1)", 17, _channels_first_decomposed),
            Spelling("Transpose+LayerNormalization@17", 17, _channels_first_transposed),
        )),
    )
}


# --- checking and timing ------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One spelling at one optimization level and thread count."""

    case: str
    spelling: str
    opt: str  # "off" (ORT_DISABLE_ALL) | "on" (ORT_ENABLE_ALL)
    threads: int
    max_rel: float | None = None  # against the case's first spelling, optimizations off
    error: str | None = None
    calls_per_block: int = 0
    times_us: list[float] = dataclasses.field(default_factory=list)
    vs_first: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times_us)

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times_us, 90))


@dataclasses.dataclass
class _Checked:
    spelling: str
    model: onnx.ModelProto | None  # None: it does not run, so it is not timed
    max_rel: float | None = None
    error: str | None = None


@dataclasses.dataclass
class _Timing:
    calls_per_block: int = 0
    times_us: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def _max_rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    r, c = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.max(np.abs(c - r))) / max(float(np.max(np.abs(r))), 1e-30)


def _check(case: Case, size: Size, feeds: dict[str, np.ndarray]) -> list[_Checked]:
    """Run every spelling once, optimizations off; compare with the first spelling."""
    reference: np.ndarray | None = None
    checked = []
    for index, spelling in enumerate(case.spellings):
        model = case.model(spelling, size)
        try:
            (output,) = run(model, feeds).values()
        except Exception as exc:  # noqa: BLE001  (onnxruntime's own untyped errors: this spelling does not run)
            checked.append(_Checked(spelling.name, None, error=ort_reason(exc)))
            continue
        if index == 0:
            reference = output
        checked.append(_Checked(spelling.name, model, None if reference is None else _max_rel(reference, output)))
    return checked


def measure(
    cases: Sequence[tuple[Case, Size]], *, threads: Sequence[int], runs: int, warmup: int, block_ms: float
) -> dict[str, list[Row]]:
    """Check every spelling of ``cases`` here, time them in one process per thread count.

    Rows per case by optimization level, then thread count, then spelling.
    """
    results: dict[str, list[_Checked]] = {}
    with tempfile.TemporaryDirectory(prefix="normfold-norm-ops-") as temporary:
        folder = Path(temporary)
        plan = []
        for index, (case, size) in enumerate(cases):
            feeds = case.feeds(size)
            results[case.name] = checked = _check(case, size, feeds)
            np.savez(folder / f"{index}-feeds.npz", **feeds)
            models: list[str | None] = []
            for k, item in enumerate(checked):
                models.append(None if item.model is None else f"{index}-{k}.onnx")
                if item.model is not None:
                    onnx.save(item.model, folder / f"{index}-{k}.onnx")
            plan.append({"case": case.name, "feeds": f"{index}-feeds.npz", "models": models})
        (folder / "plan.json").write_text(json.dumps(plan))
        timed = {count: _time_in_process(folder, count, runs, warmup, block_ms) for count in threads}
    return {name: _rows(name, checked, timed) for name, checked in results.items()}


def _time_in_process(
    folder: Path, threads: int, runs: int, warmup: int, block_ms: float
) -> dict[str, list[dict[str, Any]]] | str:
    """Time the plan in ``folder`` in a new process (see the module docstring); or why it failed."""
    command = [sys.executable, "-m", "benchmarks.norm_ops", "--time-plan", str(folder), "--threads", str(threads),
               "--runs", str(runs), "--warmup", str(warmup), "--block-ms", str(block_ms)]
    process = subprocess.run(
        command, check=False, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode or not lines:
        return f"the timing process for {threads} thread(s) exited with {process.returncode}"
    return json.loads(lines[-1])


def _rows(name: str, checked: list[_Checked], timed: dict[int, dict[str, list[dict[str, Any]]] | str]) -> list[Row]:
    rows: list[Row] = []
    for opt in LEVELS:
        for count, result in timed.items():
            group = []
            for k, item in enumerate(checked):
                row = Row(name, item.spelling, opt, count, max_rel=item.max_rel, error=item.error)
                if row.error is None and isinstance(result, str):
                    row.error = result
                elif row.error is None:
                    timing = _Timing(**result[name][k][opt])
                    row.error, row.calls_per_block, row.times_us = timing.error, timing.calls_per_block, timing.times_us
                group.append(row)
            first = group[0]
            for row in group:
                if row.error is None and first.error is None:
                    row.vs_first = row.median / first.median
            rows += group
    return rows


# --- the timing process -------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    timing: _Timing
    sess: ort.InferenceSession
    output: list[str]


def _timing_session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_per_session_threads = False  # the process's one pool (see the module docstring)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _calls_per_block(slot: _Slot, feeds: dict[str, np.ndarray], block_s: float) -> int:
    """Call the session for about ``block_s`` (warming it up); the calls that fill one block."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < block_s:
        slot.sess.run(slot.output, feeds)
        calls += 1
    return max(1, round(calls * block_s / elapsed))


def _time_rounds(slots: list[_Slot], feeds: dict[str, np.ndarray], warmup: int, runs: int) -> None:
    for round_ in range(warmup + runs):
        # Rotate the order so that no session always follows the same one.
        shift = round_ % len(slots)
        for slot in slots[shift:] + slots[:shift]:
            calls = slot.timing.calls_per_block
            start = time.perf_counter()
            for _ in range(calls):
                slot.sess.run(slot.output, feeds)
            if round_ >= warmup:
                slot.timing.times_us.append((time.perf_counter() - start) / calls * 1e6)


def _time_plan(folder: Path, threads: int, runs: int, warmup: int, block_ms: float) -> dict[str, Any]:
    """Every model of the plan at both levels: {case: [{level: timing} per spelling]}."""
    # Only onnxruntime's binding module offers the process-wide pool to Python.
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads, 1)
    result: dict[str, Any] = {}
    for entry in json.loads((folder / "plan.json").read_text()):
        started = time.perf_counter()
        with np.load(folder / entry["feeds"]) as data:
            feeds = dict(data)
        slots, timings = [], []
        for path in entry["models"]:
            levels = {opt: _Timing() for opt in LEVELS}
            timings.append(levels)
            if path is None:
                continue
            for opt, timing in levels.items():
                try:
                    sess = _timing_session(folder / path, optimize=opt == "on")
                    slot = _Slot(timing, sess, [sess.get_outputs()[0].name])
                    timing.calls_per_block = _calls_per_block(slot, feeds, block_ms / 1000)
                except Exception as exc:  # noqa: BLE001  (onnxruntime's errors: this level does not run)
                    timing.error = ort_reason(exc)
                    continue
                slots.append(slot)
        if slots:
            _time_rounds(slots, feeds, warmup, runs)
        result[entry["case"]] = [{opt: dataclasses.asdict(t) for opt, t in levels.items()} for levels in timings]
        print(f"norm_ops: {entry['case']}, {threads} thread(s): {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return result


# --- output -------------------------------------------------------------------------------


def table(results: dict[str, list[Row]], sizes: dict[str, Size]) -> str:
    """The rows of every case as a fixed-width table, with a legend."""
    all_rows = [row for rows in results.values() for row in rows]
    case_w = max(len("case"), *(len(r.case) for r in all_rows)) + 2
    spelling_w = max(len("spelling"), *(len(r.spelling) for r in all_rows)) + 2
    header = (f"{'case':<{case_w}}{'spelling':<{spelling_w}}{'opt':<5}{'threads':>7}{'median µs':>11}"
              f"{'p90 µs':>9}{'vs 1st':>9}{'max rel':>10}")
    lines = [header, "-" * len(header)]
    for rows in results.values():
        for r in rows:
            start = f"{r.case:<{case_w}}{r.spelling:<{spelling_w}}{r.opt:<5}{r.threads:>7}"
            if r.error is not None:
                lines.append(f"{start}  fails: {r.error}")
                continue
            rel = "-" if r.max_rel is None or r.spelling == rows[0].spelling else f"{r.max_rel:.1e}"
            ratio = "-" if r.vs_first is None else f"{r.vs_first:.2f}x"
            lines.append(f"{start}{r.median:>11.1f}{r.p90:>9.1f}{ratio:>9}{rel:>10}")
    lines.append("(float32 " + ", ".join(f"{name} {sizes[name].label()}" for name in results) + ";")
    lines.append(f" onnxruntime {ort.__version__}, CPU execution provider, sequential; opt off/on: "
                 "ORT_DISABLE_ALL/ORT_ENABLE_ALL; @N: the model's opset; ms.: com.microsoft;")
    lines.append(" 'vs 1st': this median / the case's first spelling's at the same opt and threads; "
                 "'max rel': against the first spelling, opt off)")
    return "\n".join(lines)


def _threads(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(","))
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"thread counts must be positive: {text}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=_threads, default=(1, 2), help="intra-op thread counts, comma-separated")
    parser.add_argument("--runs", type=int, default=25, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--block-ms", type=float, default=20.0, help="length of one timed block")
    parser.add_argument("--sizes", choices=("default", "small"), default="default")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--time-plan", type=Path, help=argparse.SUPPRESS)  # the timing process
    args = parser.parse_args(argv)
    if args.time_plan is not None:
        (threads,) = args.threads
        print(json.dumps(_time_plan(args.time_plan, threads, args.runs, args.warmup, args.block_ms)))
        return 0
    names = args.cases.split(",")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    sizes = {name: CASES[name].sizes[args.sizes] for name in names}
    started = time.perf_counter()
    results = measure([(CASES[name], sizes[name]) for name in names], threads=args.threads, runs=args.runs,
                      warmup=args.warmup, block_ms=args.block_ms)
    print(f"norm_ops: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(table(results, sizes))
    if args.json:
        rows = [
            {**dataclasses.asdict(row), "shape": list(sizes[row.case].shape),
             "median_us": row.median if row.times_us else None, "p90_us": row.p90 if row.times_us else None}
            for case_rows in results.values() for row in case_rows
        ]
        Path(args.json).write_text(json.dumps(
            {"onnxruntime": ort.__version__, "sizes": args.sizes, "threads": list(args.threads), "runs": args.runs,
             "warmup": args.warmup, "block_ms": args.block_ms, "rows": rows},
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
