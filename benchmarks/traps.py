"""The traps of ``TRAPS.md`` as small ONNX models, and what each tool writes for them.

    python -m benchmarks.traps [--tools normfold,onnxsim] [--traps ln-eps-1e-12@14,...] [--json out.json]

Each :class:`Trap` is a graph built in code with the inputs that expose it (all-zero padding
rows for BERT's eps 1e-12, small-magnitude rows where an eps on the wrong side matters, a
residual that broadcasts). The norm traps come at opset 14 (TorchScript's decomposed spelling,
axes as attribute) and at opset 23 (axes as input; onnxscript's ``onnx_fusions`` acts only at
23). Each tool (default: :data:`benchmarks.run.DEFAULT_TOOLS`) runs in its own process over all traps; each
output is then judged:

- ``fails``: the tool raised, or onnxruntime cannot load or run what it wrote;
- ``WRONG``: the outputs differ from the input model's on the trap's inputs beyond float32
  tolerance (:func:`normfold.verification.verify`, onnxruntime optimizations off; the cell shows
  the max abs error, or ``NaN`` where NaN appeared);
- ``iface``: the graph inputs or outputs changed name, type or order
  (:func:`benchmarks.run.interface_changes`; ``verify`` alone tolerates dropped
  initializer-inputs, which a user may feed);
- ``ok``: right, and the graph's ops changed; ``kept``: right, with the same ops as the input
  (the tool left the trap alone).

A ``†`` marks an output that fails ``onnx.checker`` (full check), with onnxruntime's
ONNX-domain contrib ops (LayerNormalization below opset 17, SimplifiedLayerNormalization; see
:mod:`normfold.ort_contrib`) checked as opaque ops: those are what a tool targeting onnxruntime
may write.
"""

from __future__ import annotations

__all__ = ["TRAPS", "Trap", "Verdict", "judge", "legend", "main", "summary", "table"]

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from benchmarks.run import DEFAULT_TOOLS, interface_changes
from normfold import io
from normfold.errors import InputError

Feeds = dict[str, np.ndarray]
Made = tuple[onnx.ModelProto, list[Feeds]]
# Ops whose presence says nothing about whether a tool rewrote the trap.
_NEUTRAL_OPS = frozenset({"Constant", "Identity"})
_TOOL_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Trap:
    """One trap: ``make()`` returns the model and the inputs that expose the trap."""

    name: str
    about: str
    make: Callable[[], Made]


@dataclasses.dataclass
class Verdict:
    """What a tool's output for one trap is (see the module docstring for ``status``)."""

    status: str  # ok | kept | WRONG | iface | fails
    detail: str = ""
    max_abs_error: float | None = None
    nan: bool = False
    checker: bool = True  # the output passes onnx.checker (full check)

    def cell(self) -> str:
        if self.status == "WRONG":
            text = "WRONG NaN" if self.nan else f"WRONG {self.max_abs_error:.2g}"
        else:
            text = self.status
        return text if self.checker or self.status == "fails" else f"{text}†"


# --- building graphs ----------------------------------------------------------------------


class _Builder:
    """Nodes and initializers of one graph at one opset, in the spelling exporters write."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value, stem: str = "c") -> str:
        name = self._name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def ints(self, value, stem: str = "shape") -> str:
        name = self._name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n_{out}", **attributes))
        return out

    def reduce(self, op_type: str, x: str, axes: tuple[int, ...], keepdims: int | None = None) -> str:
        # Axes became an input at opset 18 (ReduceSum at 13); exporters omit keepdims=1.
        extra = {} if keepdims is None else {"keepdims": keepdims}
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, x, self.ints(list(axes), "axes"), **extra)
        return self.op(op_type, x, axes=list(axes), **extra)

    def model(
        self,
        inputs: dict[str, list],
        outputs: list[str],
        *,
        initializers_as_inputs: bool = False,
    ) -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
        if initializers_as_inputs:
            values += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(
            self.nodes, "trap", values,
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
            self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        # Outputs get their shapes from inference; intermediates stay untyped, as exported.
        model = onnx.shape_inference.infer_shapes(model)
        del model.graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return model


def _layer_norm(
    b: _Builder,
    x: str,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float | np.ndarray = 1e-5,
    keepdims: int | None = None,
    unbiased_n: int | None = None,
    eps_on_std: bool = False,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> str:
    """(x - mean) / sqrt(var + eps) * scale + bias, written out as TorchScript does."""
    mean = b.reduce("ReduceMean", x, axes, keepdims)
    centred = b.op("Sub", x, mean)
    var = b.reduce("ReduceMean", b.op("Pow", centred, b.const(2.0)), axes, keepdims)
    if unbiased_n is not None:  # x.std(): Bessel's correction
        var = b.op("Mul", var, b.const(unbiased_n / (unbiased_n - 1)))
    if eps_on_std:
        std = b.op("Add", b.op("Sqrt", var), b.const(eps, "eps"))
    else:
        std = b.op("Sqrt", b.op("Add", var, b.const(eps, "eps")))
    y = b.op("Div", centred, std)
    if scale is not None:
        y = b.op("Mul", y, b.const(scale, "scale"))
    if bias is not None:
        y = b.op("Add", y, b.const(bias, "bias"))
    return y


def _param(*shape: int, low: float | None = None, high: float | None = None, seed: int = 0) -> np.ndarray:
    """A weight: uniform in [low, high) when given (scales away from 0), else normal."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape) if low is None else rng.uniform(low, high, size=shape)
    return values.astype(np.float32)


def _rows(shape: tuple[int, ...], seed: int, *, zero: int = 0, small: int = 0) -> np.ndarray:
    """Normal values; the last ``zero`` rows (over the last axis) all zero, then ``small`` rows
    scaled by 1e-3 (where an eps on the wrong side of the sqrt shows)."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    if zero:
        rows[-zero:] = 0.0
    if small:
        rows[-zero - small: len(rows) - zero] *= 1e-3
    return x


# --- the traps ----------------------------------------------------------------------------


def _norm_trap(opset: int, shape: tuple[int, ...], feeds_rows: dict, **norm) -> Made:
    b = _Builder(opset)
    y = _layer_norm(b, "x", **norm)
    model = b.model({"x": ["batch", *shape[1:]]}, [y])
    return model, [{"x": _rows(shape, seed, **feeds_rows)} for seed in (0, 1)]


def _ln_eps_1e12(opset: int) -> Made:
    hidden = 32
    return _norm_trap(
        opset, (2, 8, hidden), {"zero": 6}, eps=1e-12,
        scale=_param(hidden, low=0.5, high=1.5), bias=_param(hidden, seed=1),
    )


def _ln_axis_1(opset: int) -> Made:
    # Normalized over axis 1 of [N, 16, 16], with an affine over the last axis (also 16).
    return _norm_trap(opset, (2, 16, 16), {}, axes=(1,), scale=_param(16), bias=_param(16, seed=1))


def _ln_channels_first(opset: int) -> Made:
    # ConvNeXt's hand-written LayerNorm over the channels of NCHW.
    return _norm_trap(opset, (2, 8, 5, 5), {}, axes=(1,), scale=_param(8, 1, 1), bias=_param(8, 1, 1, seed=1), eps=1e-6)


def _ln_keepdims_0(opset: int) -> Made:
    # ORT #30513: with keepdims=0 the mean [8] broadcasts along the LAST axis of x[8, 8].
    b = _Builder(opset)
    y = _layer_norm(b, "x", keepdims=0, scale=_param(8, low=0.5, high=1.5), bias=_param(8, seed=1))
    model = b.model({"x": [8, 8]}, [y])
    return model, [{"x": _rows((8, 8), seed)} for seed in (0, 1)]


def _ln_scale_shape(opset: int) -> Made:
    # A per-position scale [S, H] is not a LayerNormalization scale over [H].
    return _norm_trap(opset, (2, 8, 8), {}, scale=_param(8, 8, low=0.5, high=1.5), bias=_param(8, seed=1))


def _ln_scale_1(opset: int) -> Made:
    # ORT #25855: a scale of shape [1] broadcasts in the graph; LayerNormalization needs [H].
    return _norm_trap(opset, (2, 8, 8), {}, scale=np.array([1.7], np.float32), bias=_param(8, seed=1))


def _rms_norm(b: _Builder, x: str, *, axes: tuple[int, ...] = (-1,), eps: float = 1e-6, scale: np.ndarray) -> str:
    """x / sqrt(mean(x^2) + eps) * scale, as TorchScript writes LLaMA's RMSNorm."""
    var = b.reduce("ReduceMean", b.op("Pow", x, b.const(2.0)), axes)
    return b.op("Mul", b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(eps, "eps")))), b.const(scale, "scale"))


def _rms_trap(opset: int, shape: tuple[int, ...], **norm) -> Made:
    b = _Builder(opset)
    y = _rms_norm(b, "x", **norm)
    model = b.model({"x": ["batch", *shape[1:]]}, [y])
    return model, [{"x": _rows(shape, seed)} for seed in (0, 1)]


def _rms_axis_1(opset: int) -> Made:
    return _rms_trap(opset, (2, 16, 16), axes=(1,), scale=_param(16, low=0.5, high=1.5))


def _rms_scale_expands(opset: int) -> Made:
    # ORT #31980: Mul([N, 8, 1], [4]) expands the normalized tensor; the fused op cannot.
    return _rms_trap(opset, (2, 8, 1), scale=_param(4, low=0.5, high=1.5))


def _ln_last_two_axes(opset: int) -> Made:
    return _norm_trap(opset, (2, 4, 8), {}, axes=(-2, -1), scale=_param(4, 8), bias=_param(4, 8, seed=1))


def _ln_eps_vector(opset: int) -> Made:
    # An eps per position is not LayerNormalization's one scalar epsilon.
    return _norm_trap(opset, (2, 8, 16), {"small": 8}, eps=np.geomspace(1e-6, 1e-1, 16).astype(np.float32))


def _unbiased_std(opset: int) -> Made:
    return _norm_trap(opset, (2, 8, 8), {}, unbiased_n=8, scale=_param(8), bias=_param(8, seed=1))


def _eps_on_std(opset: int) -> Made:
    return _norm_trap(opset, (2, 8, 16), {"small": 8}, eps_on_std=True, scale=_param(16), bias=_param(16, seed=1))


def _normalize_sqrt_d(opset: int) -> Made:
    # F.normalize(x, dim=-1) * sqrt(d) * g: x / max(||x||, eps), not x / sqrt(mean(x^2) + eps).
    hidden = 16
    b = _Builder(opset)
    norm = b.op("Max", b.reduce("ReduceL2", "x", (-1,), 1), b.const(1e-6, "eps"))
    y = b.op("Mul", b.op("Mul", b.op("Div", "x", norm), b.const(math.sqrt(hidden))), b.const(_param(hidden), "g"))
    model = b.model({"x": ["batch", 8, hidden]}, [y])
    return model, [{"x": _rows((2, 8, hidden), seed, small=8)} for seed in (0, 1)]


def _group_norm(opset: int) -> Made:
    # TorchScript's GroupNorm: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add.
    channels, groups = 8, 4
    b = _Builder(opset)
    grouped = b.op("Reshape", "x", b.ints([0, groups, -1]))
    normed = b.op("InstanceNormalization", grouped, b.const(np.ones(groups)), b.const(np.zeros(groups)), epsilon=1e-5)
    back = b.op("Reshape", normed, b.op("Shape", "x"))
    y = b.op("Add", b.op("Mul", back, b.const(_param(channels, 1, 1), "gamma")), b.const(_param(channels, 1, 1, seed=1), "beta"))
    model = b.model({"x": ["batch", channels, 4, 4]}, [y])
    return model, [{"x": _rows((2, channels, 4, 4), seed)} for seed in (0, 1)]


def _skip_broadcast() -> Made:
    # Residual Add whose second operand broadcasts over the sequence: not a SkipLayerNorm.
    b = _Builder(17)
    s = b.op("Add", "a", "r")
    y = b.op("LayerNormalization", s, b.const(_param(16, low=0.5, high=1.5)), b.const(_param(16, seed=1)), axis=-1, epsilon=1e-5)
    model = b.model({"a": ["batch", 8, 16], "r": ["batch", 1, 16]}, [y])
    return model, [{"a": _rows((2, 8, 16), seed), "r": _rows((2, 1, 16), seed + 10)} for seed in (0, 1)]


def _bn(b: _Builder, x: str, channels: int, *, shift: bool = True, seed: int = 0) -> str:
    return b.op(
        "BatchNormalization", x,
        b.const(_param(channels, low=0.5, high=1.5, seed=seed), "gamma"),
        b.const(_param(channels, seed=seed + 1) if shift else np.zeros(channels), "beta"),
        b.const(_param(channels, seed=seed + 2), "mean"),
        b.const(_param(channels, low=0.5, high=2.0, seed=seed + 3), "var"),
        epsilon=1e-5,
    )


def _conv_mul_last_axis() -> Made:
    # Conv output [N, 4, 6, 4]: a [4] vector broadcasts over W (== C), not per channel.
    b = _Builder(13)
    conv = b.op("Conv", "x", b.const(_param(4, 3, 3, 3), "w"), b.const(_param(4, seed=1), "b"), pads=[1, 1, 1, 1])
    y = b.op("Add", b.op("Mul", conv, b.const(_param(4, low=0.5, high=2.0, seed=2), "m")), b.const(_param(4, seed=3), "a"))
    model = b.model({"x": ["batch", 3, 6, 4]}, [y])
    return model, [{"x": _rows((2, 3, 6, 4), seed)} for seed in (0, 1)]


def _bn_params_inputs() -> Made:
    # keep_initializers_as_inputs=True: every weight is a graph input the user may feed.
    b = _Builder(13)
    conv = b.op("Conv", "x", b.const(_param(4, 3, 3, 3), "w"), b.const(_param(4, seed=1), "b"), pads=[1, 1, 1, 1])
    y = b.op("Relu", _bn(b, conv, 4, seed=10))
    model = b.model({"x": ["batch", 3, 6, 6]}, [y], initializers_as_inputs=True)
    return model, [{"x": _rows((2, 3, 6, 6), seed)} for seed in (0, 1)]


def _bn_padded_conv() -> Made:
    # Zero padding is applied after the BN: its shift must not fold into the Conv.
    b = _Builder(13)
    y = b.op("Conv", _bn(b, "x", 4, seed=10), b.const(_param(5, 4, 3, 3), "w"), b.const(_param(5, seed=1), "b"), pads=[1, 1, 1, 1])
    model = b.model({"x": ["batch", 4, 6, 6]}, [y])
    return model, [{"x": _rows((2, 4, 6, 6), seed)} for seed in (0, 1)]


def _shared_conv_two_bns() -> Made:
    # One Conv weight at two sites, each with its own BN (torch fx.fuse's bug, pytorch#104593).
    b = _Builder(13)
    w, bias = b.const(_param(4, 3, 3, 3), "w"), b.const(_param(4, seed=1), "b")
    y1 = _bn(b, b.op("Conv", "x1", w, bias, pads=[1, 1, 1, 1]), 4, seed=10)
    y2 = _bn(b, b.op("Conv", "x2", w, bias, pads=[1, 1, 1, 1]), 4, seed=20)
    model = b.model({"x1": ["batch", 3, 6, 6], "x2": ["batch", 3, 6, 6]}, [y1, y2])
    return model, [{"x1": _rows((2, 3, 6, 6), seed), "x2": _rows((2, 3, 6, 6), seed + 10)} for seed in (0, 1)]


def _gemm_transb_bn() -> Made:
    # BN after Gemm(transB=1, alpha, beta): the fold and ORT's GemmTransposeFusion (#32228).
    b = _Builder(13)
    gemm = b.op("Gemm", "x", b.const(_param(5, 6), "w"), b.const(_param(5, seed=1), "c"), transB=1, alpha=0.7, beta=1.3)
    y = _bn(b, gemm, 5, seed=10)
    model = b.model({"x": ["batch", 6]}, [y])
    return model, [{"x": _rows((3, 6), seed)} for seed in (0, 1)]


def _norm_traps() -> list[Trap]:
    families = [
        ("ln-eps-1e-12", "BERT LayerNorm eps 1e-12 on zero (padding) rows: dropping the eps gives NaN", _ln_eps_1e12),
        ("ln-axis-1", "a LayerNorm look-alike over axis 1 of [N, C, L], affine over the last axis", _ln_axis_1),
        ("ln-channels-first", "ConvNeXt's LayerNorm over the channels of NCHW", _ln_channels_first),
        ("ln-keepdims-0", "ReduceMean keepdims=0: the mean broadcasts along the last axis (ORT #30513)", _ln_keepdims_0),
        ("ln-scale-shape", "a per-position scale [S, H] is not a LayerNormalization scale over [H]", _ln_scale_shape),
        ("ln-scale-1", "scale of shape [1] broadcasts in the graph, not in LayerNormalization (ORT #25855)", _ln_scale_1),
        ("rms-axis-1", "an RMSNorm look-alike over axis 1, affine over the last axis", _rms_axis_1),
        ("rms-scale-expands", "RMSNorm over a size-1 axis times a [4] scale: the Mul expands (ORT #31980)", _rms_scale_expands),
        ("ln-last-2-axes", "LayerNorm over the last two axes (axis=-2, not -1)", _ln_last_two_axes),
        ("ln-eps-vector", "an eps per position is not one scalar epsilon", _ln_eps_vector),
        ("unbiased-std", "near miss: x.std() (unbiased variance)", _unbiased_std),
        ("eps-on-std", "near miss: eps added to the std, not the variance", _eps_on_std),
        ("normalize-sqrt-d", "near miss: F.normalize(x) * sqrt(d) * g, not RMSNorm", _normalize_sqrt_d),
        ("group-norm", "TorchScript GroupNorm (com.microsoft.GroupNorm has no CPU kernel)", _group_norm),
    ]
    return [
        Trap(f"{name}@{opset}", about, lambda make=make, opset=opset: make(opset))
        for name, about, make in families
        for opset in (14, 23)
    ]


TRAPS: list[Trap] = [
    *_norm_traps(),
    Trap("skip-ln-broadcast@17", "residual Add that broadcasts over the sequence: not SkipLayerNorm", _skip_broadcast),
    Trap("conv-mul-last-axis@13", "Conv -> Mul/Add by a [C] vector over the last axis (W == C)", _conv_mul_last_axis),
    Trap("bn-params-inputs@13", "BN parameters that are graph inputs: folding drops inputs", _bn_params_inputs),
    Trap("bn-padded-conv@13", "BN before a zero-padded Conv with a nonzero shift", _bn_padded_conv),
    Trap("shared-conv-2-bns@13", "one Conv weight at two sites with different BNs", _shared_conv_two_bns),
    Trap("gemm-transb-bn@13", "Gemm(transB=1, alpha, beta) -> BN", _gemm_transb_bn),
]


# --- judging a tool's output --------------------------------------------------------------


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" for n in model.graph.node if n.op_type not in _NEUTRAL_OPS)


def judge(source: Path, out: Path, feeds: list[Feeds]) -> Verdict:
    """The verdict on ``out``, a tool's output for the trap model at ``source``."""
    from normfold.errors import NormfoldError
    from normfold.verification import verify

    try:
        report = verify(source, out, inputs=feeds)
    except NormfoldError as error:
        return Verdict("fails", str(error)[:160])
    candidate = onnx.load(out, load_external_data=False)
    try:
        io.check(ir.from_proto(candidate), str(out), full_check=True)
        checker = True
    except InputError:
        checker = False
    run_problems = [p for p in report.problems if "fails to" in p]
    if run_problems:
        return Verdict("fails", run_problems[0][:160], checker=checker)
    changes = interface_changes(source, out)
    wrong = [c for c in report.outputs.values() if not c.passed and c.problem != "missing from the candidate's outputs"]
    if wrong:
        nan = any(c.nan_mismatch or c.inf_mismatch for c in wrong)
        error = max((c.max_abs_error for c in wrong if not math.isnan(c.max_abs_error)), default=math.nan)
        detail = "; ".join(f"{c.name}: {c.problem}" for c in wrong)
        return Verdict("WRONG", detail[:160], error, nan, checker)
    if changes or not report.passed:
        return Verdict("iface", "; ".join(changes or report.problems)[:160], checker=checker)
    same = _ops(onnx.load(source, load_external_data=False)) == _ops(candidate)
    return Verdict("kept" if same else "ok", checker=checker)


def _run_tool(tool: str, folder: Path, names: list[str]) -> dict[str, str | None]:
    """Run ``tool`` over the traps in one process; name -> error (None: written)."""
    results: dict[str, str | None] = {}
    remaining = list(names)
    while remaining:
        # A crash or hang loses only the trap it happened on: the rest run in a fresh process.
        try:
            process = subprocess.run(
                [sys.executable, "-m", "benchmarks.traps", "--worker", tool, str(folder), *remaining],
                check=False, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S,
                cwd=Path(__file__).resolve().parent.parent,
            )
            stdout, why = process.stdout, f"process died (exit {process.returncode})"
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            why = f"timed out after {_TOOL_TIMEOUT_S} s"
        for line in stdout.splitlines():
            if line.startswith('{"trap"'):
                row = json.loads(line)
                results[row["trap"]] = row.get("error")
        remaining = [name for name in remaining if name not in results]
        if remaining:
            results[remaining[0]] = why
            remaining = remaining[1:]
    return results


def _worker(tool: str, folder: Path, names: list[str]) -> int:
    from benchmarks.tools import TOOLS

    for name in names:
        source, out = folder / f"{name}.onnx", folder / f"{name}.{tool}.onnx"
        try:
            TOOLS[tool](source, out)
            error = None if out.exists() else "no output written"
        except Exception as exc:  # any tool failure is a result
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        print(json.dumps({"trap": name, "error": error}), flush=True)
    return 0


def run(traps: list[Trap], tools: list[str], folder: Path) -> dict[tuple[str, str], Verdict]:
    feeds: dict[str, list[Feeds]] = {}
    for trap in traps:
        model, feeds[trap.name] = trap.make()
        onnx.save(model, folder / f"{trap.name}.onnx")
    verdicts: dict[tuple[str, str], Verdict] = {}
    for tool in tools:
        print(f"traps: {tool}", file=sys.stderr)
        errors = _run_tool(tool, folder, [trap.name for trap in traps])
        for trap in traps:
            error = errors.get(trap.name)
            source, out = folder / f"{trap.name}.onnx", folder / f"{trap.name}.{tool}.onnx"
            verdicts[trap.name, tool] = Verdict("fails", error) if error else judge(source, out, feeds[trap.name])
    return verdicts


def table(traps: list[Trap], tools: list[str], verdicts: dict[tuple[str, str], Verdict]) -> str:
    width = max(len(trap.name) for trap in traps) + 2
    cells = {key: verdict.cell() for key, verdict in verdicts.items()}
    widths = [max(len(tool), *(len(cells[t.name, tool]) for t in traps)) + 2 for tool in tools]
    lines = ["trap".ljust(width) + "".join(tool.ljust(w) for tool, w in zip(tools, widths))]
    lines.append("-" * len(lines[0]))
    for trap in traps:
        lines.append(trap.name.ljust(width) + "".join(cells[trap.name, tool].ljust(w) for tool, w in zip(tools, widths)))
    return "\n".join(line.rstrip() for line in lines)


def summary(traps: list[Trap], tools: list[str], verdicts: dict[tuple[str, str], Verdict]) -> str:
    lines = []
    for tool in tools:
        counts = Counter(verdicts[trap.name, tool].status for trap in traps)
        invalid = sum(not verdicts[trap.name, tool].checker for trap in traps if verdicts[trap.name, tool].status != "fails")
        bad = [trap.name for trap in traps if verdicts[trap.name, tool].status in ("WRONG", "iface", "fails")]
        lines.append(
            f"{tool:<20} {counts['ok'] + counts['kept']:>2}/{len(traps)} right ({counts['ok']} rewritten, "
            f"{counts['kept']} left), {counts['WRONG']} wrong, {counts['iface']} interface changed, "
            f"{counts['fails']} fail, {invalid} not valid ONNX" + (f"  [{', '.join(bad)}]" if bad else "")
        )
    return "\n".join(lines)


def legend(traps: list[Trap]) -> str:
    """What each trap exposes, once per family (the ``@opset`` variants share it)."""
    seen: dict[str, str] = {}
    for trap in traps:
        seen.setdefault(trap.name.split("@")[0], trap.about)
    width = max(map(len, seen)) + 2
    return "\n".join(f"{name:<{width}}{about}" for name, about in seen.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], Path(argv[2]), argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    parser.add_argument("--traps", help="comma-separated trap names (default: all)")
    parser.add_argument("--json", help="write every verdict here")
    args = parser.parse_args(argv)
    tools = args.tools.split(",")
    traps = TRAPS if not args.traps else [t for t in TRAPS if t.name in args.traps.split(",")]
    with tempfile.TemporaryDirectory(prefix="normfold-traps-") as folder:
        verdicts = run(traps, tools, Path(folder))
    print(table(traps, tools, verdicts))
    print("(ok: right and rewritten; kept: right, left as it was; WRONG: max abs error; "
          "iface: inputs/outputs changed; †: fails onnx.checker)")
    print()
    print(summary(traps, tools, verdicts))
    print()
    print(legend(traps))
    for trap in traps:
        for tool in tools:
            verdict = verdicts[trap.name, tool]
            if verdict.detail:
                print(f"  {trap.name} / {tool}: {verdict.detail}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"{trap}|{tool}": dataclasses.asdict(v) for (trap, tool), v in verdicts.items()}, indent=2
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
