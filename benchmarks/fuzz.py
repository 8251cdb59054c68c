"""Property-based fuzzing: generated graphs through every pass, judged by onnxruntime.

    python -m benchmarks.fuzz --count 10000 --seed 0

Each case is a small graph (hypothesis draws its structure, a drawn seed its tensors) aimed at
one pass and the traps around it:

* ``fold-bn`` producer: Conv (1-D/2-D, groups, pads, strides, dilations), ConvTranspose, Gemm
  (``transB``, ``alpha``, ``beta``, ``C`` of every broadcast shape), MatMul with or without a
  bias Add, rank 2 or 3, then a BatchNormalization; the producer's or the BN's output
  sometimes also a graph output; BN opset forms with ``momentum`` written out;
* ``fold-bn`` consumer: BatchNormalization before a padded or unpadded Conv, a Gemm or MatMul
  directly or through Flatten/Reshape, sometimes read twice;
* ``fold-affine``: a linear op then Mul/Add/Sub/Div by a constant of any broadcast shape
  (``[C]`` on the last spatial axis included), either operand order (not ``Div(c, y)``: a
  reciprocal, no site, whose pole amplifies any rounding), chains of two;
* ``fuse-norm``: LayerNorm/RMSNorm written out (Pow or Mul, Sqrt then Div or Reciprocal then
  Mul, axes as attribute or input, ``keepdims`` omitted or written, trailing or axis-1
  reductions, scale and bias), GroupNorm through Reshape, a residual Add before, and the near
  misses (eps on the std, unbiased variance);
* ``fold-branches``: RepVGG/ACNet/DBB sums of k×k, 1×1, 1×k Convs, BNs, identities and
  average pools;
* ``cleanup``: constant subgraphs (a BatchNormalization of a constant with ``momentum``,
  Transpose/Cast/Reshape/Expand/Concat of constants, Shape→Gather chains, Identity, Dropout).

Every case draws its dtype (float32, float16), opset (13–23) and target (``onnx``,
``onnxruntime``), a quarter of them ``lower_standalone_bn``, and a quarter *extreme* parameters (BN variances of 1e-6, scales
of 1e3, a Conv bias equal to the BN mean, weights of 1e-4) that stress float16 folds.
``normfold.optimize(..., verify=False)`` runs the case's pass (``cleanup`` first, as always);
onnxruntime runs the input and the result with optimizations off on the same random input, and
:func:`normfold.verification.compare` judges them (float16 outputs against the input converted
to float32, by the low-precision rule). A violation is one of:

* ``crash``: normfold raised something other than its own errors;
* ``refused-valid-input``: normfold's :class:`~normfold.errors.InputError` on a graph
  onnxruntime runs;
* ``invalid-output``: the result fails ``onnx.checker`` or onnxruntime cannot run it;
* ``wrong-output``: the result computes something else (interface included).

Graphs onnxruntime cannot run as generated count as ``skipped`` (not violations). The command
prints the figures by pass, dtype and target, the violations by category with the first few
cases, and exits 1 on any violation.
"""

from __future__ import annotations

__all__ = ["Case", "Outcome", "cases", "judge", "main", "run"]

import argparse
import collections
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import hypothesis
import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import normfold
from normfold import runtime
from normfold.errors import InputError, NormfoldError
from normfold.verification import compare, float64_model

DTYPES = {"float32": np.float32, "float16": np.float16}
OPSETS = tuple(range(13, 24))
TARGETS = ("onnx", "onnxruntime")
_SAMPLES = 3  # normfold.verify's default


@dataclasses.dataclass
class Case:
    """One generated graph, the pass it is aimed at, and its input."""

    family: str
    passes: list[str]
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]  # samples, as many as verification draws by default
    dtype: str
    opset: int
    target: str
    extreme: bool
    lower_standalone_bn: bool = False

    def describe(self) -> str:
        ops = " ".join(node.op_type for node in self.model.graph.node)
        return (f"{self.family} {self.dtype} opset {self.opset} target {self.target}"
                f"{' extreme' if self.extreme else ''}{' lower-bn' if self.lower_standalone_bn else ''}: {ops}")


@dataclasses.dataclass
class Outcome:
    """How a case fared: ``category`` is ``ok``, ``skipped`` or a violation's name."""

    case: Case
    category: str
    detail: str = ""
    rewrites: int = 0  # sites the passes rewrote (cleanup's folds included)

    @property
    def violation(self) -> bool:
        return self.category not in ("ok", "skipped")


class _Graph:
    """A graph under construction: nodes, initializers, fresh names."""

    def __init__(self, rng: np.random.Generator, dtype: type, opset: int) -> None:
        self.rng, self.dtype, self.opset = rng, dtype, opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.extra_outputs: list[str] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}{self._count}"

    def const(self, array: Any, stem: str = "c", dtype: Any = None) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array).astype(dtype or self.dtype), name))
        return name

    def ints(self, values: list[int], stem: str = "shape") -> str:
        return self.const(np.asarray(values, np.int64), stem, np.int64)

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attributes: Any) -> str:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(f"{op_type}_"), **attributes))
        return names[0]

    def normal(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return self.rng.normal(size=shape) * scale

    def reduce_mean(self, x: str, axes: list[int], keepdims: bool | None) -> str:
        kwargs = {} if keepdims is None else {"keepdims": int(keepdims)}
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(axes, "axes")], **kwargs)
        return self.op("ReduceMean", [x], axes=axes, **kwargs)

    def model(self, inputs: dict[str, list[int]], outputs: list[str]) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = helper.make_graph(
            self.nodes,
            "fuzz",
            [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, elem, None) for n in outputs + self.extra_outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 17 else 10
        # Graph outputs need a shape: inference gives them theirs (and records nothing else).
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except onnx.shape_inference.InferenceError:
            return model  # judged invalid, and skipped
        del model.graph.value_info[:]
        return model


# --- the families ------------------------------------------------------------------------------


def _bn(g: _Graph, x: str, channels: int, extreme: bool, *, bias_like: np.ndarray | None = None) -> str:
    gamma = g.rng.uniform(0.5, 2.0, channels) * g.rng.choice([-1, 1], channels)
    var = g.rng.uniform(0.05, 2.0, channels)
    mean = g.normal(channels)
    if extreme:
        var = 10.0 ** g.rng.uniform(-7, -2, channels)
        gamma = gamma * 10.0 ** g.rng.uniform(0, 3, channels)
        if bias_like is not None and g.rng.random() < 0.5:
            mean = bias_like.copy()  # the cancellation: Conv bias == BN mean
    inputs = [x, g.const(gamma, "gamma"), g.const(g.normal(channels), "beta"), g.const(mean, "mean"), g.const(var, "var")]
    attributes: dict[str, Any] = {"epsilon": float(g.rng.choice([1e-5, 1e-3, 0.0 if not extreme else 1e-5]))}
    if g.opset < 14 and g.rng.random() < 0.5:
        attributes["momentum"] = 0.9  # TorchScript writes it; BN-9's reference kernel misreads it
    return g.op("BatchNormalization", inputs, **attributes)


@st.composite
def _producer_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    kind = draw(st.sampled_from(["Conv", "Conv", "Conv1d", "ConvTranspose", "Gemm", "MatMul", "MatMul+Add", "MatMul3"]))
    scale = 1e-4 if extreme and g.rng.random() < 0.5 else 1.0
    c_out = draw(st.integers(1, 6))
    outputs: list[str] = []
    if kind in ("Conv", "Conv1d", "ConvTranspose"):
        group = draw(st.sampled_from([1, 1, 2]))
        c_in = group * draw(st.integers(1, 3))
        c_out = group * draw(st.integers(1, 3))
        k = draw(st.sampled_from([1, 2, 3]))
        spatial = [draw(st.integers(k, k + 3))] * (1 if kind == "Conv1d" else 2)
        dims = len(spatial)
        x_shape = [draw(st.integers(1, 2)), c_in, *spatial]
        attributes: dict[str, Any] = {"group": group}
        if draw(st.booleans()):
            attributes["pads"] = [draw(st.integers(0, k - 1 if k > 1 else 0))] * (2 * dims)
        if draw(st.booleans()):
            attributes["strides"] = [draw(st.integers(1, 2))] * dims
        if kind == "ConvTranspose":
            weight = g.normal(c_in, c_out // group, *[k] * dims, scale=scale)
        else:
            weight = g.normal(c_out, c_in // group, *[k] * dims, scale=scale)
            if draw(st.booleans()) and k > 1:
                attributes["dilations"] = [1] * dims
        bias = g.normal(c_out) * (1000.0 if extreme else 1.0)
        inputs = ["x", g.const(weight, "w")] + ([g.const(bias, "b")] if draw(st.booleans()) else [])
        y = g.op("ConvTranspose" if kind == "ConvTranspose" else "Conv", inputs, **attributes)
    elif kind == "Gemm":
        k_in = draw(st.integers(1, 6))
        x_shape = [draw(st.integers(1, 3)), k_in]
        trans_b = draw(st.integers(0, 1))
        weight = g.normal(*((c_out, k_in) if trans_b else (k_in, c_out)), scale=scale)
        attributes = {"transB": trans_b}
        if draw(st.booleans()):
            attributes["alpha"] = float(draw(st.sampled_from([0.5, 2.0])))
        if draw(st.booleans()):
            attributes["beta"] = float(draw(st.sampled_from([0.5, 2.0])))
        c_shape = draw(st.sampled_from([None, (c_out,), (1, c_out), (1,)]))
        bias = g.normal(c_out) * (1000.0 if extreme else 1.0)
        inputs = ["x", g.const(weight, "w")]
        if c_shape is not None:
            inputs.append(g.const(np.resize(bias, c_shape), "c"))
        y = g.op("Gemm", inputs, **attributes)
    else:
        k_in = draw(st.integers(1, 6))
        x_shape = [draw(st.integers(1, 3)), k_in] if kind != "MatMul3" else [draw(st.integers(1, 2)), c_out, k_in]
        y = g.op("MatMul", ["x", g.const(g.normal(k_in, c_out, scale=scale), "w")])
        bias = g.normal(c_out) * (1000.0 if extreme else 1.0)
        if kind != "MatMul":
            operands = [y, g.const(bias, "b")]
            y = g.op("Add", operands[::-1] if draw(st.booleans()) else operands)
    if draw(st.integers(0, 5)) == 0:
        g.extra_outputs.append(y)  # another reader: the fold must leave it
    channels = c_out
    z = _bn(g, y, channels, extreme, bias_like=bias)
    if draw(st.booleans()):
        z = g.op("Relu", [z])
    outputs.append(z)
    return {"x": x_shape}, outputs


@st.composite
def _consumer_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    kind = draw(st.sampled_from(["Conv", "Conv", "Gemm", "MatMul", "Flatten+Gemm", "Reshape+MatMul"]))
    channels = draw(st.integers(1, 5))
    if kind == "Conv":
        x_shape = [draw(st.integers(1, 2)), channels, draw(st.integers(3, 5)), draw(st.integers(3, 5))]
    elif kind in ("Gemm", "MatMul"):
        x_shape = [draw(st.integers(1, 3)), channels]
    else:
        x_shape = [draw(st.integers(1, 2)), channels, draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    n = _bn(g, "x", channels, extreme)
    outputs = []
    for _ in range(draw(st.integers(1, 2))):
        c_out = draw(st.integers(1, 4))
        if kind == "Conv":
            group = channels if draw(st.integers(0, 3)) == 0 else 1
            k = draw(st.sampled_from([1, 3]))
            weight = g.normal(c_out * group, channels // group, k, k)
            attributes: dict[str, Any] = {"group": group}
            if k == 3 and draw(st.booleans()):
                attributes["pads"] = [1, 1, 1, 1]
            outputs.append(g.op("Conv", [n, g.const(weight, "w")], **attributes))
            continue
        features = channels if kind in ("Gemm", "MatMul") else channels * x_shape[2] * x_shape[3]
        source = n
        if kind == "Flatten+Gemm":
            source = g.op("Flatten", [n], axis=1)
        elif kind == "Reshape+MatMul":
            source = g.op("Reshape", [n, g.ints(draw(st.sampled_from([[0, -1], [-1, features], [x_shape[0], -1]])))])
        if kind.endswith("Gemm"):
            outputs.append(g.op("Gemm", [source, g.const(g.normal(features, c_out), "w"), g.const(g.normal(c_out), "c")]))
        else:
            outputs.append(g.op("MatMul", [source, g.const(g.normal(features, c_out), "w")]))
    if draw(st.integers(0, 5)) == 0:
        g.extra_outputs.append(n)
    return {"x": x_shape}, outputs


@st.composite
def _affine_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    kind = draw(st.sampled_from(["Conv", "Gemm", "MatMul"]))
    c_out = draw(st.integers(1, 5))
    if kind == "Conv":
        c_in, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        x_shape = [1, c_in, h, w]
        y = g.op("Conv", ["x", g.const(g.normal(c_out, c_in, 1, 1), "w"), g.const(g.normal(c_out), "b")])
        shapes = [(), (1,), (c_out,), (c_out, 1, 1), (1, c_out, 1, 1), (w,), (1, 1, h, w), (c_out, h, w)]
    else:
        k_in = draw(st.integers(1, 4))
        x_shape = [draw(st.integers(1, 3)), k_in]
        weight = g.const(g.normal(k_in, c_out), "w")
        y = g.op(kind, ["x", weight] + ([g.const(g.normal(c_out), "c")] if kind == "Gemm" else []))
        shapes = [(), (1,), (c_out,), (1, c_out), (x_shape[0], c_out), (x_shape[0], 1)]
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["Mul", "Add", "Sub", "Div"]))
        shape = draw(st.sampled_from(shapes))
        value = g.rng.uniform(0.5, 2.0, shape) * g.rng.choice([-1, 1], shape)
        if extreme:
            value = value * 10.0 ** g.rng.uniform(-4, 4)
        constant = g.const(value, "k")
        # Div(c, y) is no site (not affine in y) and a reciprocal near 0 amplifies any rounding;
        # tests/test_fold_affine.py holds that it is never folded.
        first = op != "Div" and draw(st.booleans())
        y = g.op(op, [constant, y] if first else [y, constant])
    return {"x": x_shape}, [y]


@st.composite
def _norm_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    kind = draw(st.sampled_from(["layer", "layer", "rms", "group", "eps-on-std", "unbiased"]))
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [draw(st.integers(2, 6))]
    if kind == "group":
        rank, groups = 4, draw(st.sampled_from([1, 2]))
        shape = [draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 3))]
    x = "x"
    if draw(st.integers(0, 3)) == 0:
        x = g.op("Add", ["x", g.const(g.normal(*shape[-1:]), "residual")])  # skip-norm shape
    eps = float(draw(st.sampled_from([1e-12, 1e-6, 1e-5, 0.1])))
    if g.dtype is np.float16:
        eps = max(eps, 1e-6)
    keepdims = draw(st.sampled_from([None, True]))
    if kind == "group":
        grouped = g.op("Reshape", [x, g.ints([0, groups, -1])])
        inner, axes = grouped, [-1]
    else:
        inner = x
        axes = list(range(-draw(st.integers(1, rank - 1)), 0)) if draw(st.integers(0, 3)) else [1]
    if kind == "rms":
        centred = inner
    else:
        centred = g.op("Sub", [inner, g.reduce_mean(inner, axes, keepdims)])
    square = g.op("Pow", [centred, g.const(2.0, "two")]) if draw(st.booleans()) else g.op("Mul", [centred, centred])
    var = g.reduce_mean(square, axes, keepdims)
    if kind == "unbiased":
        n = int(np.prod([shape[a] for a in axes]))
        var = g.op("Mul", [var, g.const(n / max(n - 1, 1), "bessel")])
    eps_name = g.const(eps, "eps")
    if kind == "eps-on-std":
        std = g.op("Add", [g.op("Sqrt", [var]), eps_name])
    else:
        std = g.op("Sqrt", [g.op("Add", [var, eps_name])])
    if draw(st.booleans()):
        y = g.op("Div", [centred, std])
    else:
        y = g.op("Mul", [centred, g.op("Reciprocal", [std])])
    if kind == "group":
        y = g.op("Reshape", [y, g.op("Shape", [x])])
        channel_shape = [shape[1], 1, 1]
        y = g.op("Mul", [y, g.const(g.normal(*channel_shape), "gamma")])
        y = g.op("Add", [y, g.const(g.normal(*channel_shape), "beta")])
    else:
        affine = draw(st.sampled_from(["none", "scale", "both"]))
        vector = [shape[a] for a in axes] if axes != [1] else [shape[1]] + [1] * (rank - 2)
        if affine != "none":
            y = g.op("Mul", [y, g.const(g.normal(*vector), "gamma")])
        if affine == "both":
            y = g.op("Add", [y, g.const(g.normal(*vector), "beta")])
    return {"x": shape}, [y]


@st.composite
def _branch_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    channels = draw(st.integers(1, 4))
    group = channels if channels > 1 and draw(st.integers(0, 3)) == 0 else 1
    k = draw(st.sampled_from([3, 5]))
    size = draw(st.integers(k, k + 2))
    stride = draw(st.sampled_from([1, 1, 2]))
    x_shape = [1, channels, size, size]
    leaves = []
    pad = k // 2
    for branch in draw(st.lists(st.sampled_from(["kxk", "1x1", "1xk", "bn", "pool", "1x1-kxk"]), min_size=2, max_size=4)):
        if branch in ("bn", "pool") and stride != 1:
            continue
        if branch == "bn":
            leaves.append(_bn(g, "x", channels, extreme))
            continue
        if branch == "pool":
            leaves.append(g.op("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1))
            continue
        kernel = {"kxk": (k, k), "1x1": (1, 1), "1xk": (1, k), "1x1-kxk": (k, k)}[branch]
        pads = [kernel[0] // 2, kernel[1] // 2] * 2
        source = "x"
        if branch == "1x1-kxk":
            source = g.op("Conv", ["x", g.const(g.normal(channels, channels // group, 1, 1), "w")], group=group)
        weight = g.normal(channels, channels // group, *kernel) * (1e3 if extreme else 1.0)
        leaf = g.op("Conv", [source, g.const(weight, "w"), g.const(g.normal(channels), "b")],
                    pads=pads, strides=[stride, stride], group=group)
        if draw(st.booleans()):
            leaf = _bn(g, leaf, channels, extreme)
        leaves.append(leaf)
    if len(leaves) < 2:
        leaves.append(g.op("Conv", ["x", g.const(g.normal(channels, channels // group, k, k), "w")],
                           pads=[pad] * 4, strides=[stride, stride], group=group))
    if draw(st.booleans()):
        total = g.op("Sum", leaves)
    else:
        total = leaves[0]
        for leaf in leaves[1:]:
            total = g.op("Add", [total, leaf])
    return {"x": x_shape}, [total]


@st.composite
def _cleanup_case(draw: Callable, g: _Graph, extreme: bool) -> tuple[dict, list[str]]:
    c = draw(st.integers(1, 4))
    x_shape = [draw(st.integers(1, 2)), c, draw(st.integers(1, 3))]
    terms = []
    for what in draw(st.lists(st.sampled_from(["bn", "transpose", "cast", "reshape", "expand", "concat", "shape"]), min_size=1, max_size=3)):
        if what == "bn":
            constant = g.const(g.normal(*x_shape), "k")
            terms.append(_bn(g, constant, c, extreme))
        elif what == "transpose":
            terms.append(g.op("Transpose", [g.const(g.normal(x_shape[2], c, x_shape[0]), "k")], perm=[2, 1, 0]))
        elif what == "cast":
            terms.append(g.op("Cast", [g.const(g.normal(*x_shape) * 100, "k", np.float64)],
                              to=helper.np_dtype_to_tensor_dtype(np.dtype(g.dtype))))
        elif what == "reshape":
            terms.append(g.op("Reshape", [g.const(g.normal(int(np.prod(x_shape))), "k"), g.ints(x_shape)]))
        elif what == "expand":
            terms.append(g.op("Expand", [g.const(g.normal(c, 1), "k"), g.ints(x_shape)]))
        elif what == "concat":
            parts = [g.const(g.normal(x_shape[0], 1, x_shape[2]), "k") for _ in range(c)]
            terms.append(g.op("Concat", parts, axis=1))
        else:
            width = g.op("Gather", [g.op("Shape", ["x"]), g.ints([2])], axis=0)
            terms.append(g.op("Cast", [width], to=helper.np_dtype_to_tensor_dtype(np.dtype(g.dtype))))
    y = "x"
    for term in terms:
        y = g.op(draw(st.sampled_from(["Add", "Mul"])), [y, term])
    if draw(st.booleans()):
        y = g.op("Identity", [y])
    if draw(st.booleans()):
        y = g.op("Dropout", [y])
    return {"x": x_shape}, [y]


FAMILIES: dict[str, tuple[list[str], Callable]] = {
    "fold-bn-producer": (["fold-bn"], _producer_case),
    "fold-bn-consumer": (["fold-bn"], _consumer_case),
    "fold-affine": (["fold-affine"], _affine_case),
    "fuse-norm": (["fuse-norm"], _norm_case),
    "fold-branches": (["fold-branches"], _branch_case),
    "cleanup": ([], _cleanup_case),
    "all-passes": (None, None),  # any family's graph through the default pass list
}


@st.composite
def cases(draw: Callable, families: tuple[str, ...] = tuple(FAMILIES)) -> Case:
    """A generated :class:`Case` (see the module doc) of one of ``families``."""
    family = draw(st.sampled_from(families))
    passes, builder = FAMILIES[family]
    if builder is None:
        builder = FAMILIES[draw(st.sampled_from([f for f, (_, b) in FAMILIES.items() if b is not None]))][1]
    dtype = draw(st.sampled_from(list(DTYPES)))
    opset = draw(st.sampled_from(OPSETS))
    extreme = draw(st.integers(0, 3)) == 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = _Graph(rng, DTYPES[dtype], opset)
    inputs, outputs = draw(builder(g, extreme))
    feeds = [
        {name: rng.normal(size=shape).astype(DTYPES[dtype]) for name, shape in inputs.items()}
        for _ in range(_SAMPLES)
    ]
    target = draw(st.sampled_from(TARGETS))
    lower = draw(st.integers(0, 3)) == 0  # --lower-standalone-bn: a BN nothing folds becomes Mul+Add
    return Case(family, passes, g.model(inputs, outputs), feeds, dtype, opset, target, extreme, lower)


def _runs(model: onnx.ModelProto | ir.Model, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    session = runtime.session(model)
    return [runtime.run(session, feeds) for feeds in samples]


def _truth(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The float32 run of a float16 model (``verification.float64_model`` widened to float32)."""
    wide = float64_model(ir.serde.deserialize_model(model), ir.DataType.FLOAT)
    return _runs(wide, [{name: array.astype(np.float32) for name, array in feeds.items()} for feeds in samples])


def judge(case: Case) -> Outcome:
    """Optimize the case's graph with its pass and judge the result (module doc)."""
    try:
        onnx.checker.check_model(case.model, full_check=True)
        expected = _runs(case.model, case.feeds)
        truth = _truth(case.model, case.feeds) if case.dtype == "float16" else None
    except (InputError, RuntimeError, ValueError, onnx.checker.ValidationError) as error:
        return Outcome(case, "skipped", str(error).splitlines()[0][:200])
    if truth is not None and not all(np.isfinite(a).all() for outputs in truth for a in outputs.values()):
        return Outcome(case, "skipped", "the float32 run overflows")
    try:
        result = normfold.optimize(case.model, passes=case.passes, target=case.target, verify=False,
                                   lower_standalone_bn=case.lower_standalone_bn)
    except InputError as error:
        return Outcome(case, "refused-valid-input", str(error))
    except NormfoldError as error:
        return Outcome(case, "crash", f"{type(error).__name__}: {error}")
    except Exception as error:  # the point of fuzzing: any other exception is a bug
        return Outcome(case, "crash", f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
    try:
        actual = _runs(result.model, case.feeds)
    except Exception as error:  # onnxruntime's own errors
        return Outcome(case, "invalid-output", str(error).splitlines()[0][:300])
    report = compare(expected, actual, truth=truth)
    rewrites = sum(p["applied"] for p in result.report["passes"])
    if not report.passed:
        problems = [f"{c.name}: {c.problem}" for c in report.outputs.values() if not c.passed] + report.problems
        passes = [(p["name"], p["applied"]) for p in result.report["passes"]]
        return Outcome(case, "wrong-output", f"{'; '.join(problems)} (passes {passes})", rewrites)
    return Outcome(case, "ok", rewrites=rewrites)


def run(
    count: int,
    seed: int,
    *,
    families: tuple[str, ...] = tuple(FAMILIES),
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Generate and judge ``count`` cases of ``families`` from ``seed`` (hypothesis, generation
    phase only)."""
    outcomes: list[Outcome] = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @hypothesis.seed(seed)
    @hypothesis.given(cases(families))
    def one(case: Case) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = judge(case)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    one()
    return outcomes


def summary(outcomes: list[Outcome], seconds: float, *, show: int = 3) -> str:
    """The figures: cases by pass family, dtype and target; violations by category, with examples."""
    lines = [f"{len(outcomes)} graphs in {seconds:.0f} s"]
    for label, key in (("family", lambda o: o.case.family), ("dtype", lambda o: o.case.dtype),
                       ("target", lambda o: o.case.target), ("outcome", lambda o: o.category)):
        counts = collections.Counter(key(o) for o in outcomes)
        lines.append(f"  by {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    opsets = collections.Counter(o.case.opset for o in outcomes)
    lines.append("  by opset: " + ", ".join(f"{k} {v}" for k, v in sorted(opsets.items())))
    rewritten = collections.Counter(o.case.family for o in outcomes if o.rewrites)
    lines.append("  rewritten (some site changed): " + ", ".join(f"{k} {v}" for k, v in sorted(rewritten.items())))
    violations = [o for o in outcomes if o.violation]
    by_category = collections.Counter(o.category for o in violations)
    lines.append(f"violations: {len(violations)}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(by_category.items())) + ")" if violations else ""))
    for category in sorted(by_category):
        for outcome in [o for o in violations if o.category == category][:show]:
            lines.append(f"  {category}: {outcome.case.describe()}\n    {outcome.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="graphs to generate (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--family", action="append", choices=list(FAMILIES),
                        help="only this family (repeatable; default: all)")
    parser.add_argument("--show", type=int, default=3, help="violations shown per category (default 3)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    start = time.perf_counter()
    outcomes = run(args.count, args.seed, families=tuple(args.family or FAMILIES))
    print(summary(outcomes, time.perf_counter() - start, show=args.show))
    return 1 if any(o.violation for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
