"""fuse-norm on hand-built graphs: every exactness check has a case that must be refused, and
hypothesis draws shapes, axes, eps, dtypes and spellings for the ones that must be fused.

Graphs are written with ``onnx.helper`` the way exporters write them (default attributes
omitted, axes as attribute below opset 18 and as input from 18 on). Numbers go through
onnxruntime with optimizations off on both sides, and against a float64 numpy reference.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold import io, runtime
from normfold.passes import REGISTRY, PassOptions
from normfold.passes.fuse_norm import FuseNormPass


@dataclasses.dataclass
class Spec:
    """A decomposed normalization to build; defaults give a plain last-axis LayerNorm."""

    shape: tuple[int, ...] = (2, 3, 8)
    axes: tuple[int, ...] = (-1,)
    var_axes: tuple[int, ...] | None = None
    var_centre_axes: tuple[int, ...] | None = None  # centre the variance's input on other axes
    eps: float | None = 1e-5
    dtype: type = np.float32
    opset: int = 17
    kind: str = "layer"  # or "rms"
    square: str = "pow"  # or "mul"
    inverse: str = "div"  # "reciprocal", "one_div", "pow"
    keepdims: int | None = None  # None: attribute omitted (default 1)
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    eps_shape: tuple[int, ...] = ()
    eps_input: bool = False
    exponent: float = 2.0
    read_deviation: bool = False
    symbolic: tuple[int, ...] = ()
    upcast: int | None = None  # TensorProto dtype the input is cast from (half input)
    out_shape: tuple[int, ...] | None = None  # when the affine broadcasts the result up


def build(spec: Spec) -> onnx.ModelProto:
    np_type = np.dtype(spec.dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_type)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np_type), name))
        return name

    def reduce(source: str, out: str, axes: tuple[int, ...]) -> None:
        extra = {} if spec.keepdims is None else {"keepdims": spec.keepdims}
        if spec.opset >= 18:
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), out + "_axes"))
            nodes.append(helper.make_node("ReduceMean", [source, out + "_axes"], [out], name=out, **extra))
        else:
            nodes.append(helper.make_node("ReduceMean", [source], [out], name=out, axes=list(axes), **extra))

    x = "x"
    inputs = []
    if spec.upcast is not None:
        inputs.append(helper.make_tensor_value_info("x16", spec.upcast, _dims(spec)))
        nodes.append(helper.make_node("Cast", ["x16"], ["x"], name="upcast", to=elem))
    else:
        inputs.append(helper.make_tensor_value_info("x", elem, _dims(spec)))
    if spec.kind == "layer":
        reduce(x, "mean", spec.axes)
        nodes.append(helper.make_node("Sub", [x, "mean"], ["d"], name="centre"))
        centred = "d"
    else:
        centred = x
    deviation = centred
    if spec.var_centre_axes is not None:
        reduce(x, "mean2", spec.var_centre_axes)
        nodes.append(helper.make_node("Sub", [x, "mean2"], ["d2"], name="centre2"))
        deviation = "d2"
    if spec.square == "pow":
        nodes.append(helper.make_node("Pow", [deviation, const("exponent", spec.exponent)], ["sq"], name="square"))
    else:
        nodes.append(helper.make_node("Mul", [deviation, deviation], ["sq"], name="square"))
    reduce("sq", "var", spec.var_axes or spec.axes)
    var_eps = "var"
    if spec.eps is not None:
        if spec.eps_input:
            inputs.append(helper.make_tensor_value_info("eps", elem, []))
        else:
            const("eps", np.full(spec.eps_shape, spec.eps))
        nodes.append(helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"))
        var_eps = "var_eps"
    if spec.inverse == "pow":
        nodes.append(helper.make_node("Pow", [var_eps, const("mhalf", -0.5)], ["inv"], name="rsqrt"))
        nodes.append(helper.make_node("Mul", [centred, "inv"], ["n"], name="normalize"))
    else:
        nodes.append(helper.make_node("Sqrt", [var_eps], ["std"], name="sqrt"))
        if spec.inverse == "div":
            nodes.append(helper.make_node("Div", [centred, "std"], ["n"], name="normalize"))
        else:
            if spec.inverse == "reciprocal":
                nodes.append(helper.make_node("Reciprocal", ["std"], ["inv"], name="inverse"))
            else:
                nodes.append(helper.make_node("Div", [const("one", 1.0), "std"], ["inv"], name="inverse"))
            nodes.append(helper.make_node("Mul", [centred, "inv"], ["n"], name="normalize"))
    out = "n"
    if spec.scale is not None:
        nodes.append(helper.make_node("Mul", [out, const("scale", spec.scale)], ["scaled"], name="scale"))
        out = "scaled"
    if spec.bias is not None:
        nodes.append(helper.make_node("Add", [out, const("bias", spec.bias)], ["shifted"], name="shift"))
        out = "shifted"
    if spec.upcast is not None:
        nodes.append(helper.make_node("Cast", [out], ["y"], name="downcast", to=spec.upcast))
    else:
        nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    outputs = [helper.make_tensor_value_info("y", spec.upcast or elem, spec.out_shape or _dims(spec))]
    if spec.read_deviation:
        outputs.append(helper.make_tensor_value_info(centred, elem, _dims(spec)))
    graph = helper.make_graph(nodes, "norm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _dims(spec: Spec) -> list:
    return [f"d{i}" if i in spec.symbolic else size for i, size in enumerate(spec.shape)]


def reference(spec: Spec, x: np.ndarray) -> np.ndarray:
    """The normalization in float64."""
    x = x.astype(np.float64)
    axes = tuple(spec.axes)
    d = x - x.mean(axis=axes, keepdims=True) if spec.kind == "layer" else x
    var = (d * d).mean(axis=tuple(spec.var_axes or axes), keepdims=True)
    y = d / np.sqrt(var + (spec.eps or 0.0))
    if spec.scale is not None:
        y = y * spec.scale
    if spec.bias is not None:
        y = y + spec.bias
    return y


def fuse(model: onnx.ModelProto, skip_ops: bool = False, **options) -> tuple[onnx.ModelProto, FuseNormPass]:
    ir_model = ir.from_proto(model)
    fuse_pass = FuseNormPass(PassOptions(**options), skip_ops=skip_ops)
    fuse_pass(ir_model)
    io.check(ir_model, "fused", full_check=True)
    return ir.to_proto(ir_model), fuse_pass


def ops(model: onnx.ModelProto) -> Counter:
    """Op counts; the Identity that names the graph output is not counted (clean-up drops it)."""
    return Counter(node.op_type for node in model.graph.node if node.op_type != "Identity")


def feed(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=spec.shape) * 3 + 1
    x.reshape(-1, spec.shape[-1])[0] = 0.0  # an all-zero row
    if spec.upcast is not None:
        return {"x16": x.astype(helper.tensor_dtype_to_np_dtype(spec.upcast))}
    return {"x": x.astype(spec.dtype)}


def assert_refused(spec: Spec, fragment: str, **options) -> FuseNormPass:
    model = build(spec)
    fused, fuse_pass = fuse(model, **options)
    assert fuse_pass.record.applied == 0
    assert ops(fused) == ops(model)
    reasons = [r["reason"] for r in fuse_pass.record.refused]
    assert any(fragment in reason for reason in reasons), reasons
    return fuse_pass


def test_registered() -> None:
    assert REGISTRY["fuse-norm"] is FuseNormPass


# --- fused: hypothesis over shapes, axes, eps, dtypes and spellings --------------------------

EPS = st.sampled_from([1e-12, 1e-6, 1e-5, 0.25])


@st.composite
def norm_specs(draw) -> Spec:
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank - 1, max_size=rank - 1))) + (draw(st.integers(2, 6)),)
    if draw(st.booleans()):
        k = draw(st.integers(1, rank - 1))
        axes = tuple(range(-k, 0)) if draw(st.booleans()) else tuple(range(rank - k, rank))
    else:
        axes = (draw(st.integers(0, rank - 1)),)
    normalized = [shape[a] for a in axes]
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16]))
    eps = draw(EPS)
    if dtype is np.float64:
        eps = float(np.float32(eps))  # the epsilon attribute is a float32
    if dtype is np.float16:
        eps = max(eps, 1e-6)  # 1e-12 is 0 in float16: zero rows would be NaN in both graphs
    affine = draw(st.sampled_from(["none", "scale", "both"]))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    full = [1] * rank
    for a, n in zip(axes, normalized):
        full[a] = n
    scale = rng.uniform(0.5, 1.5, size=full) * rng.choice([-1, 1], size=full) if affine != "none" else None
    bias = rng.normal(size=full) if affine == "both" else None
    if scale is not None and min(axes) == rank - len(axes) and draw(st.booleans()):
        scale = scale.reshape(normalized)  # a trailing affine written as a plain vector
        bias = None if bias is None else bias.reshape(normalized)
    return Spec(
        shape=shape,
        axes=axes,
        eps=eps,
        dtype=dtype,
        opset=draw(st.sampled_from([13, 14, 17, 18, 21, 23])),
        kind=draw(st.sampled_from(["layer", "rms"])),
        square=draw(st.sampled_from(["pow", "mul"])),
        inverse=draw(st.sampled_from(["div", "reciprocal", "one_div", "pow"])),
        keepdims=draw(st.sampled_from([None, 1])),
        scale=scale,
        bias=bias,
        symbolic=tuple(i for i in range(rank) if i not in [a % rank for a in axes] and draw(st.booleans())),
    )


@settings(max_examples=40, deadline=None)
@given(norm_specs())
def test_every_exact_spelling_is_fused(spec: Spec) -> None:
    model = build(spec)
    fused, fuse_pass = fuse(model)
    op = "LayerNormalization" if spec.kind == "layer" else "RMSNormalization"
    counts = ops(fused)
    assert counts[op] == 1, fuse_pass.record.refused
    assert not {"ReduceMean", "Sqrt", "Pow", "Reciprocal", "Div"} & set(counts), counts
    has_bias = spec.bias is not None and spec.kind == "layer"
    assert counts["Mul"] == 0 and counts["Add"] == (1 if spec.bias is not None and not has_bias else 0)
    opset = fused.opset_import[0].version
    assert opset >= (17 if spec.kind == "layer" else 23)  # never LayerNormalization below 17
    rank = len(spec.shape)
    trailing = sorted(a % rank for a in spec.axes) == list(range(rank - len(spec.axes), rank))
    assert counts["Transpose"] == (0 if trailing else 2)
    feeds = feed(spec)
    got = runtime.run(fused, feeds)["y"]
    want = runtime.run(model, feeds)["y"]
    # float16: the fused op computes in float32 (stash_type=1), the decomposed graph in float16.
    tol = {np.float64: 1e-11, np.float32: 2e-4, np.float16: 2e-2}[spec.dtype]
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.astype(np.float64), reference(spec, feeds["x"]), rtol=tol, atol=tol)
    assert np.isfinite(got).all()


def test_axis1_normalization_is_not_a_last_axis_layernorm() -> None:
    """TRAPS: tools fused a normalization over axis 1 as a last-axis LayerNorm."""
    spec = Spec(shape=(2, 4, 3, 3), axes=(1,), scale=np.linspace(0.5, 2, 4).reshape(4, 1, 1), bias=np.ones((4, 1, 1)))
    fused, _ = fuse(build(spec))
    transposes = [n for n in fused.graph.node if n.op_type == "Transpose"]
    assert [list(t.attribute[0].ints) for t in transposes] == [[0, 2, 3, 1], [0, 3, 1, 2]]
    feeds = feed(spec)
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], reference(spec, feeds["x"]), rtol=1e-5, atol=1e-5)


def test_half_input_with_float32_upcast_fuses_to_a_half_op() -> None:
    spec = Spec(upcast=TensorProto.FLOAT16, scale=np.linspace(0.5, 2, 8), bias=None, eps=1e-5)
    # scale in float32 that float16 holds exactly: the downcast is absorbed as well
    spec.scale = spec.scale.astype(np.float16).astype(np.float32)
    model = build(spec)
    fused, _ = fuse(model)
    (node,) = [n for n in fused.graph.node if n.op_type != "Identity"]
    assert node.op_type == "LayerNormalization"
    assert fused.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert helper.get_attribute_value(node.attribute[[a.name for a in node.attribute].index("stash_type")]) == 1
    feeds = feed(spec)
    np.testing.assert_allclose(
        runtime.run(fused, feeds)["y"].astype(np.float32), runtime.run(model, feeds)["y"].astype(np.float32),
        rtol=2e-3, atol=2e-3,
    )


def test_bfloat16_upcast_fuses_to_a_bfloat16_op() -> None:
    """onnxruntime's CPU provider runs no bfloat16 arithmetic, so this checks the graph only."""
    spec = Spec(kind="rms", upcast=TensorProto.BFLOAT16, eps=1e-6)
    fused, _ = fuse(build(spec))
    (node,) = [n for n in fused.graph.node if n.op_type != "Identity"]
    assert node.op_type == "RMSNormalization"
    assert fused.graph.initializer[0].data_type == TensorProto.BFLOAT16
    assert fused.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16


def test_scale_not_exact_in_half_keeps_the_cast() -> None:
    spec = Spec(upcast=TensorProto.FLOAT16, scale=np.full(8, 0.1), eps=1e-5)  # 0.1 is no float16
    fused, fuse_pass = fuse(build(spec))
    assert ops(fused) == Counter({"Cast": 2, "LayerNormalization": 1})
    assert any("not exactly representable in FLOAT16" in r["reason"] for r in fuse_pass.record.refused)


# --- refused: one failing case per check -----------------------------------------------------


def test_keepdims_0_is_refused() -> None:
    """TRAPS (onnxruntime #30513): a keepdims=0 mean broadcasts along the wrong axis."""
    assert_refused(Spec(shape=(8, 8), keepdims=0), "keepdims=0")


def test_mean_and_variance_over_different_axes_are_refused() -> None:
    assert_refused(Spec(shape=(2, 4, 4), axes=(-1,), var_centre_axes=(-2,)), "reduce different axes")


def test_variance_over_other_axes_is_the_rms_norm_of_the_deviation() -> None:
    """(x - mean_A(x)) / sqrt(mean_B((x - mean_A(x))^2) + eps) is no LayerNorm, but exactly an
    RMSNorm over B of the deviation: that is what gets fused."""
    spec = Spec(shape=(2, 4, 4), axes=(-1,), var_axes=(-2,))
    model = build(spec)
    fused, _ = fuse(model)
    assert ops(fused)["LayerNormalization"] == 0 and ops(fused)["RMSNormalization"] == 1
    feeds = feed(spec)
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], reference(spec, feeds["x"]), rtol=1e-5, atol=1e-5)


def test_eps_that_is_not_a_scalar_is_refused() -> None:
    assert_refused(Spec(eps_shape=(1, 1, 8)), "not a scalar")


def test_eps_computed_at_run_time_is_refused() -> None:
    assert_refused(Spec(eps_input=True), "computed at run time")


def test_eps_the_float_attribute_cannot_hold_is_refused() -> None:
    assert_refused(Spec(dtype=np.float64, eps=1e-12), "not exactly representable")


def test_intermediate_read_elsewhere_is_refused() -> None:
    assert_refused(Spec(read_deviation=True), "is also a graph output")


def test_unknown_normalized_size_is_refused() -> None:
    assert_refused(Spec(symbolic=(2,)), "no static sizes")


def test_other_power_is_refused() -> None:
    assert_refused(Spec(exponent=3.0), "power is 3.0")


def test_max_opset_below_the_fused_op_is_refused() -> None:
    fuse_pass = assert_refused(Spec(opset=14), "max_opset 16 forbids", max_opset=16)
    assert not fuse_pass.record.notes
    assert_refused(Spec(kind="rms", opset=18), "RMSNormalization needs opset 23", max_opset=22)


def test_opset_is_raised_for_the_fused_op() -> None:
    spec = Spec(opset=14, scale=np.linspace(-1, 1, 8), bias=np.linspace(0, 1, 8))
    fused, fuse_pass = fuse(build(spec))
    assert fused.opset_import[0].version == 17
    assert fuse_pass.record.notes == ["opset raised from 14 to 17 for the fused ops"]
    assert ops(fused) == Counter({"LayerNormalization": 1})


def _surveys(monkeypatch) -> list[bool]:
    """Record, for each request of fuse-norm's sweeps, whether it was the survey's."""
    from normfold.passes import rules

    asked: list[bool] = []
    sweeps = rules.sweeps

    def recording(*args, survey: bool = False, **kwargs):
        asked.append(survey)
        return sweeps(*args, survey=survey, **kwargs)

    monkeypatch.setattr(rules, "sweeps", recording)
    return asked


@pytest.mark.parametrize(("spec", "options"), [
    (Spec(kind="rms", opset=23), {}),  # already at the highest opset a fusion needs
    (Spec(opset=17), {"max_opset": 17}),  # no raise allowed
])
def test_no_survey_when_no_raise_can_follow(spec: Spec, options: dict, monkeypatch) -> None:
    asked = _surveys(monkeypatch)
    fused, fuse_pass = fuse(build(spec), **options)
    assert asked == [False]
    assert fused.opset_import[0].version == spec.opset and not fuse_pass.record.notes
    assert ops(fused) == Counter({"LayerNormalization" if spec.kind == "layer" else "RMSNormalization": 1})


def test_survey_when_a_raise_may_follow(monkeypatch) -> None:
    asked = _surveys(monkeypatch)
    fused, _ = fuse(build(Spec(kind="rms", opset=18)))
    assert asked == [True, False]
    assert fused.opset_import[0].version == 23


def test_constant_affine_over_a_non_normalized_axis_stays_apart() -> None:
    """The scale must broadcast to X.shape[axis:]: a per-row scale is not a LayerNorm scale."""
    per_row = np.linspace(0.5, 2, 3).reshape(3, 1)
    spec = Spec(shape=(2, 3, 8), scale=per_row)
    model = build(spec)
    fused, fuse_pass = fuse(model)
    assert ops(fused)["LayerNormalization"] == 1 and ops(fused)["Mul"] == 1
    assert any("varies along axis 1" in r["reason"] for r in fuse_pass.record.refused)
    feeds = feed(spec)
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], reference(spec, feeds["x"]), rtol=1e-5, atol=1e-5)


def test_affine_that_would_enlarge_the_result_stays_apart() -> None:
    spec = Spec(shape=(2, 1, 3), axes=(-2,), scale=np.linspace(1, 2, 4).reshape(4, 1), out_shape=(2, 4, 3))
    fused, fuse_pass = fuse(build(spec))
    assert ops(fused)["Mul"] == 1
    assert any("does not broadcast to axis 1 of size 1" in r["reason"] for r in fuse_pass.record.refused)
    feeds = feed(spec)
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], reference(spec, feeds["x"]), rtol=1e-5, atol=1e-5)


def test_rms_norm_with_an_affine_only_along_other_axes_is_refused() -> None:
    """Normalized over the last axis, scaled per row (axis 1 only): Filter Response Norm-like,
    which no standard op computes; the graph stays as it is and computes what it did."""
    spec = Spec(kind="rms", opset=23, scale=np.linspace(0.5, 2, 3).reshape(3, 1))
    model = build(spec)
    fused, fuse_pass = fuse(model)
    assert ops(fused) == ops(model)
    assert any("varies along axes [1] only" in r["reason"] for r in fuse_pass.record.refused)
    feeds = feed(spec)
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], reference(spec, feeds["x"]), rtol=1e-5, atol=1e-5)


def test_bias_after_rms_norm_stays_an_add() -> None:
    spec = Spec(kind="rms", opset=23, bias=np.linspace(0, 1, 8))
    fused, fuse_pass = fuse(build(spec))
    assert ops(fused) == Counter({"RMSNormalization": 1, "Add": 1})
    assert any("no bias input" in r["reason"] for r in fuse_pass.record.refused)


# --- Skip (target onnxruntime) -----------------------------------------------------------------


def _residual_ln(a_shape: list, b_shape: list, hidden: int = 8) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="residual"),
        helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], name="ln", axis=-1, epsilon=1e-5),
    ]
    inits = [
        numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "g"),
        numpy_helper.from_array(np.linspace(-1, 1, hidden).astype(np.float32), "beta"),
    ]
    graph = helper.make_graph(
        nodes, "skip",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, a_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_existing_layernorm_after_residual_becomes_skip_layernorm() -> None:
    model = _residual_ln(["batch", "seq", 8], ["batch", "seq", 8])
    fused, _ = fuse(model, target="onnxruntime", skip_ops=True)
    assert ops(fused) == Counter({"SkipLayerNormalization": 1})
    rng = np.random.default_rng(0)
    feeds = {"a": rng.normal(size=(2, 3, 8)).astype(np.float32), "b": rng.normal(size=(2, 3, 8)).astype(np.float32)}
    np.testing.assert_allclose(runtime.run(fused, feeds)["y"], runtime.run(model, feeds)["y"], rtol=1e-5, atol=1e-5)
    assert ops(fuse(model, target="onnx")[0]) == ops(model)


@pytest.mark.parametrize(
    "a_shape,b_shape,fragment",
    [
        ([2, 2, 3, 8], [2, 2, 3, 8], "2-D or 3-D"),
        (["batch", "seq", 8], [1, 1, 8], "not provably the same"),
        (["batch", "seq", 8], ["batch", "other", 8], "not provably the same"),
    ],
)
def test_skip_shape_rules_are_checked(a_shape: list, b_shape: list, fragment: str) -> None:
    model = _residual_ln(a_shape, b_shape)
    fused, fuse_pass = fuse(model, target="onnxruntime", skip_ops=True)
    assert ops(fused) == ops(model)
    assert any(fragment in r["reason"] for r in fuse_pass.record.refused), fuse_pass.record.refused


# --- GroupNorm ---------------------------------------------------------------------------------


def _group_norm(groups_shape: list[int], back: str = "shape", spatial: tuple[int, int] = (4, 5)) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Reshape", ["x", "groups"], ["v"], name="view"),
        helper.make_node("InstanceNormalization", ["v", "s", "b"], ["n"], name="inorm", epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Reshape", ["n", "x_shape" if back == "shape" else "other"], ["y"], name="back"),
    ]
    groups = groups_shape[1]
    inits = [
        numpy_helper.from_array(np.array(groups_shape, np.int64), "groups"),
        numpy_helper.from_array(np.array([0, 8, spatial[0] * spatial[1]], np.int64), "other"),
        numpy_helper.from_array(np.linspace(0.5, 1.5, groups).astype(np.float32), "s"),
        numpy_helper.from_array(np.linspace(-1, 1, groups).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, *spatial] if back == "shape" else None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    return model


def test_instance_norm_with_per_group_affine_becomes_group_norm() -> None:
    model = _group_norm([0, 4, -1])
    fused, _ = fuse(model)
    assert ops(fused) == Counter({"GroupNormalization": 1})
    assert fused.opset_import[0].version == 21
    x = np.random.default_rng(0).normal(size=(2, 8, 4, 5)).astype(np.float32)
    want = runtime.run(model, {"x": x})["y"]
    np.testing.assert_allclose(runtime.run(fused, {"x": x})["y"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "groups_shape,back,spatial,fragment",
    [
        ([0, 3, -1], "shape", (3, 5), "does not split 8 channels"),
        ([-1, 4, 10], "shape", (4, 5), "keeps the batch dim"),
        ([0, 4, -1], "other", (4, 5), "gives back the input's shape"),
    ],
)
def test_group_norm_checks(groups_shape: list[int], back: str, spatial: tuple[int, int], fragment: str) -> None:
    model = _group_norm(groups_shape, back, spatial)
    fused, fuse_pass = fuse(model)
    assert "GroupNormalization" not in ops(fused)
    assert any(fragment in r["reason"] for r in fuse_pass.record.refused), fuse_pass.record.refused
