"""fold-bn on hand-built graphs, random graphs (hypothesis) and the zoo's exports.

Every test runs the original and the folded model through onnxruntime with optimizations off
(``normfold.runtime.run``) on the same inputs; refusals check that the BN stays, the reason is
recorded against it and the numbers are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold import io, runtime
from normfold.passes import PassOptions
from normfold.math import batchnorm as fm
from normfold.passes.fold_bn import FoldBatchNormPass
from tests._fold_helpers import (
    FLOAT,
    add_output,
    array,
    feeds_for,
    make,
    op_types,
    rel_error,
    run_pass,
)

# --- building and checking ---------------------------------------------------------------


def bn_node(
    x: str,
    y: str,
    channels: int,
    rng: np.random.Generator,
    *,
    name: str = "bn",
    var: str = "random",
    zero_shift: bool = False,
    dtype: type = np.float32,
    **attrs,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A BatchNormalization with random statistics (some scales negative) and its initializers."""
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    beta, mean = rng.normal(size=channels), rng.normal(size=channels)
    if zero_shift:
        beta, mean = np.zeros(channels), np.zeros(channels)
    variance = {
        "random": rng.uniform(0.5, 2.0, channels),
        "zero": np.zeros(channels),
        "tiny": np.full(channels, 1e-10),
    }[var]
    names = [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")]
    inits = [
        numpy_helper.from_array(a.astype(dtype), n)
        for a, n in zip((gamma, beta, mean, variance), names, strict=True)
    ]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=name, **attrs), inits


def fold(
    proto: onnx.ModelProto, options: PassOptions | None = None, **kwargs
) -> tuple[ir.Model, dict]:
    """Run (cleanup +) fold-bn and check the result in ORT (see ``run_pass``)."""
    return run_pass(proto, FoldBatchNormPass, options, **kwargs)


def assert_folded(
    model: ir.Model, record: dict, into: str, how: str = "producer", node: str = "bn"
) -> None:
    assert "BatchNormalization" not in op_types(model)
    assert record["sites"] == [{"node": node, "into": into, "how": how}]
    assert record["refused"] == []


def assert_refused(model: ir.Model, record: dict, reason: str, node: str = "bn") -> None:
    assert node in [n.name for n in model.graph if n.op_type == "BatchNormalization"]
    assert record["applied"] == 0
    [refusal] = [r for r in record["refused"] if r["node"] == node]
    assert reason in refusal["reason"], refusal["reason"]


# --- into the producer -------------------------------------------------------------------


def conv_bn(
    *,
    dims=2,
    group=1,
    c_in=3,
    c_out=4,
    kernel=3,
    strides=None,
    dilations=None,
    pads=None,
    bias=True,
    transpose=False,
    output_padding=None,
    seed=0,
    var="random",
    opset=17,
    bn_attrs=None,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    if transpose:
        w_shape = (c_in, c_out // group) + (kernel,) * dims
    else:
        w_shape = (c_out, c_in // group) + (kernel,) * dims
    attrs = {"group": group}
    for key, value in (
        ("strides", strides),
        ("dilations", dilations),
        ("pads", pads),
        ("output_padding", output_padding),
    ):
        if value is not None:
            attrs[key] = value
    inits = [array("w", rng.normal(size=w_shape))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(array("b", rng.normal(size=c_out)))
        conv_inputs.append("b")
    op = "ConvTranspose" if transpose else "Conv"
    bn, bn_inits = bn_node("conv_out", "y", c_out, rng, var=var, **(bn_attrs or {}))
    nodes = [helper.make_node(op, conv_inputs, ["conv_out"], name="conv", **attrs), bn]
    return make(nodes, inits + bn_inits, {"x": ("N", c_in) + (7,) * dims}, ["y"], opset=opset)


@pytest.mark.parametrize(
    "conv",
    [
        dict(dims=1, bias=False),
        dict(dims=2, pads=[0, 1, 2, 1], strides=[2, 1]),
        dict(dims=3, dilations=[2, 1, 2], kernel=2),
        dict(dims=2, group=2, c_in=4, c_out=6, pads=[1, 1, 1, 1]),
        dict(dims=2, group=4, c_in=4, c_out=4, bias=False),  # depthwise
        dict(dims=2, group=2, c_in=4, c_out=8, dilations=[2, 2], strides=[2, 2], pads=[2, 0, 0, 2]),
    ],
    ids=[
        "1d",
        "2d-asym-pads-strided",
        "3d-dilated",
        "grouped",
        "depthwise",
        "grouped-dilated-strided",
    ],
)
def test_bn_folds_into_conv(conv: dict) -> None:
    model, record = fold(conv_bn(**conv))
    assert_folded(model, record, "conv")
    assert op_types(model) == ["Conv"]


@pytest.mark.parametrize(
    "conv",
    [
        dict(dims=1, group=1, c_in=3, c_out=4, strides=[2], output_padding=[1]),
        dict(dims=2, group=2, c_in=4, c_out=6, strides=[2, 2], output_padding=[1, 0], bias=False),
        dict(
            dims=3,
            group=2,
            c_in=2,
            c_out=4,
            kernel=2,
            strides=[2, 1, 2],
            output_padding=[1, 0, 0],
            pads=[0, 0, 1, 1, 0, 0],
        ),
    ],
    ids=["1d", "2d-grouped", "3d-grouped"],
)
def test_bn_folds_into_conv_transpose(conv: dict) -> None:
    model, record = fold(conv_bn(transpose=True, **conv))
    assert_folded(model, record, "conv")
    assert op_types(model) == ["ConvTranspose"]


def gemm_bn(
    *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=("N",), m=2, k=5, n=3, seed=0
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [array("B", rng.normal(size=(n, k) if trans_b else (k, n)))]
    inputs = ["A", "B"]
    if c_shape is not None:
        inits.append(
            array("C", rng.normal(size=tuple({"M": m, "N": n}.get(d, d) for d in c_shape)))
        )
        inputs.append("C")
    bn, bn_inits = bn_node("gemm_out", "y", n, rng)
    gemm = helper.make_node(
        "Gemm",
        inputs,
        ["gemm_out"],
        name="gemm",
        transA=trans_a,
        transB=trans_b,
        alpha=alpha,
        beta=beta,
    )
    return make([gemm, bn], inits + bn_inits, {"A": (k, m) if trans_a else (m, k)}, ["y"])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("alpha", "beta", "c_shape"),
    [
        (1.0, 1.0, ("N",)),
        (0.5, 2.0, (1, "N")),
        (1.5, -1.0, ("M", "N")),
        (2.0, 0.5, ()),
        (1.0, 1.0, ("M", 1)),
        (0.7, 1.0, None),
    ],
)
def test_bn_folds_into_gemm(trans_a: int, trans_b: int, alpha: float, beta: float, c_shape) -> None:
    model, record = fold(
        gemm_bn(trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    )
    assert_folded(model, record, "gemm")
    [gemm] = model.graph
    assert gemm.op_type == "Gemm" and "beta" not in gemm.attributes


@pytest.mark.parametrize("form", ["MatMul+Add", "Add+MatMul", "MatMul"])
def test_bn_folds_into_matmul(form: str) -> None:
    rng = np.random.default_rng(3)
    inits = [array("W", rng.normal(size=(5, 3))), array("bias", rng.normal(size=3))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm")]
    produced = "mm"
    if form != "MatMul":
        operands = ["mm", "bias"] if form == "MatMul+Add" else ["bias", "mm"]
        nodes.append(helper.make_node("Add", operands, ["mm_bias"], name="add"))
        produced = "mm_bias"
    bn, bn_inits = bn_node(produced, "y", 3, rng)
    model, record = fold(make([*nodes, bn], inits + bn_inits, {"x": ("N", 5)}, ["y"]))
    assert_folded(model, record, "mm")
    assert op_types(model) == ["MatMul", "Add"]


def test_bn_after_rank3_matmul_is_refused() -> None:
    """BN normalizes axis 1; a MatMul's features are on the last axis."""
    rng = np.random.default_rng(4)
    bn, bn_inits = bn_node("mm", "y", 4, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), bn]
    proto = make(nodes, [array("W", rng.normal(size=(6, 4)))] + bn_inits, {"x": ("N", 4, 6)}, ["y"])
    model, record = fold(proto, tol=0)
    assert_refused(model, record, "features on axis 2 (rank 3)")


@st.composite
def producer_models(draw: st.DrawFn) -> onnx.ModelProto:
    kind = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm"]))
    seed = draw(st.integers(0, 2**16))
    var = draw(st.sampled_from(["random", "zero", "tiny"]))
    if kind == "Gemm":
        return gemm_bn(
            trans_a=draw(st.integers(0, 1)),
            trans_b=draw(st.integers(0, 1)),
            alpha=draw(st.sampled_from([1.0, 0.5])),
            beta=draw(st.sampled_from([1.0, 2.0])),
            c_shape=draw(st.sampled_from([None, ("N",), ("M", "N")])),
            m=draw(st.integers(1, 4)),
            k=draw(st.integers(1, 8)),
            n=draw(st.integers(1, 6)),
            seed=seed,
        )
    dims = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    conv = dict(
        dims=dims,
        group=group,
        c_in=group * draw(st.integers(1, 3)),
        c_out=group * draw(st.integers(1, 3)),
        kernel=draw(st.integers(1, 3)),
        strides=[stride] * dims,
        dilations=[dilation] * dims,
        bias=draw(st.booleans()),
        seed=seed,
        var=var,
    )
    if kind == "ConvTranspose":
        conv["output_padding"] = [draw(st.integers(0, stride - 1))] * dims  # ORT: below the stride
    else:
        conv["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * dims)]
    return conv_bn(transpose=kind == "ConvTranspose", **conv)


@settings(max_examples=40, deadline=None)
@given(producer_models())
def test_property_producer_fold_matches_in_float32(proto: onnx.ModelProto) -> None:
    model, record = fold(proto, tol=1e-6)
    assert record["applied"] == 1 and "BatchNormalization" not in op_types(model)


# --- into the consumer -------------------------------------------------------------------


def bn_conv(
    *,
    group=1,
    c_in=4,
    c_out=6,
    pads=None,
    auto_pad=None,
    zero_shift=False,
    strides=None,
    dilations=None,
    seed=0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    bn, bn_inits = bn_node("x", "normalized", c_in, rng, zero_shift=zero_shift)
    attrs = {"group": group}
    for key, value in (
        ("pads", pads),
        ("auto_pad", auto_pad),
        ("strides", strides),
        ("dilations", dilations),
    ):
        if value is not None:
            attrs[key] = value
    conv = helper.make_node("Conv", ["normalized", "w", "b"], ["y"], name="conv", **attrs)
    inits = [
        array("w", rng.normal(size=(c_out, c_in // group, 3, 3))),
        array("b", rng.normal(size=c_out)),
    ]
    return make([bn, conv], bn_inits + inits, {"x": ("N", c_in, 8, 9)}, ["y"])


@pytest.mark.parametrize(
    "conv",
    [
        dict(),
        dict(group=2),
        dict(group=4, c_in=4, c_out=4),
        dict(strides=[2, 1], dilations=[1, 2]),
        dict(pads=[0, 0, 0, 0], auto_pad="NOTSET"),
        dict(auto_pad="VALID"),
    ],
    ids=["plain", "grouped", "depthwise", "strided-dilated", "zero-pads", "valid"],
)
def test_bn_folds_into_unpadded_conv(conv: dict) -> None:
    model, record = fold(bn_conv(**conv))
    assert_folded(model, record, "conv", how="consumer")
    assert op_types(model) == ["Conv"]


@pytest.mark.parametrize(
    "padding", [dict(pads=[1, 1, 1, 1]), dict(auto_pad="SAME_UPPER")], ids=["pads", "same"]
)
def test_bn_folds_into_padded_conv_when_its_shift_is_zero(padding: dict) -> None:
    model, record = fold(bn_conv(zero_shift=True, group=2, **padding))
    assert_folded(model, record, "conv", how="consumer")


@pytest.mark.parametrize(
    "padding", [dict(pads=[1, 0, 0, 1]), dict(auto_pad="SAME_LOWER")], ids=["pads", "same"]
)
def test_bn_before_padded_conv_with_a_shift_is_refused(padding: dict) -> None:
    model, record = fold(bn_conv(**padding), tol=0)
    assert_refused(model, record, "zero-pads its input")


def bn_linear(
    *,
    op="Gemm",
    route=None,
    x_shape=("N", 4),
    shape=None,
    trans_a=0,
    trans_b=1,
    alpha=1.0,
    beta=1.0,
    bias=True,
    seed=0,
    flatten_axis=1,
    features=None,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    channels = x_shape[1]
    if features is None:
        features = (
            int(np.prod([channels, *x_shape[2:]])) if route else x_shape[0 if trans_a else -1]
        )
    bn, inits = bn_node("x", "normalized", channels, rng)
    nodes = [bn]
    source = "normalized"
    if route == "Flatten":
        nodes.append(
            helper.make_node("Flatten", [source], ["flat"], name="flatten", axis=flatten_axis)
        )
        source = "flat"
    elif route == "Reshape":
        inits.append(array("shape", np.array(shape), np.int64))
        nodes.append(helper.make_node("Reshape", [source, "shape"], ["flat"], name="reshape"))
        source = "flat"
    out = 3
    if op == "Gemm":
        inits.append(array("B", rng.normal(size=(out, features) if trans_b else (features, out))))
        inputs = [source, "B"]
        if bias:
            inits.append(array("C", rng.normal(size=out)))
            inputs.append("C")
        nodes.append(
            helper.make_node(
                "Gemm",
                inputs,
                ["y"],
                name="linear",
                transA=trans_a,
                transB=trans_b,
                alpha=alpha,
                beta=beta,
            )
        )
    else:
        inits.append(array("W", rng.normal(size=(features, out))))
        nodes.append(helper.make_node("MatMul", [source, "W"], ["y"], name="linear"))
    return make(nodes, inits, {"x": x_shape}, ["y"])


@pytest.mark.parametrize(
    "linear",
    [
        dict(),
        dict(trans_b=0, alpha=0.5, beta=2.0),
        dict(bias=False),
        dict(op="MatMul"),
        dict(route="Flatten", x_shape=("N", 3, 2, 2)),
        dict(route="Flatten", x_shape=("N", 3, 1, 1), op="MatMul"),
        dict(route="Flatten", x_shape=("N", 3, 2, 2), flatten_axis=-3),
        dict(route="Reshape", x_shape=("N", 3, 2, 2), shape=[0, -1]),
        dict(route="Reshape", x_shape=("N", 3, 2, 2), shape=[-1, 12]),
        dict(route="Reshape", x_shape=(2, 3, 2, 2), shape=[2, -1], op="MatMul"),
    ],
    ids=[
        "gemm",
        "gemm-alpha-beta",
        "gemm-no-bias",
        "matmul",
        "flatten-gemm",
        "flatten-1x1-matmul",
        "flatten-negative-axis",
        "reshape-0-1",
        "reshape-1-12",
        "reshape-static-batch",
    ],
)
def test_bn_folds_into_gemm_or_matmul_consumer(linear: dict) -> None:
    model, record = fold(bn_linear(**linear))
    assert_folded(model, record, "linear", how="consumer")


@pytest.mark.parametrize(
    ("linear", "reason"),
    [
        (dict(trans_a=1, x_shape=(3, 4)), "transA=1"),
        (dict(op="MatMul", x_shape=(2, 4, 4)), "rank-3 input"),
        (dict(route="Flatten", x_shape=("N", 3, 2, 2), flatten_axis=2, features=4),
         "merged with an axis before them"),
        (dict(route="Reshape", x_shape=(2, 3, 2, 2), shape=[6, -1], features=4),
         "merged with an axis before them"),
        (dict(route="Reshape", x_shape=("N", 3, 2, 2), shape=[-1, 4], features=4),
         "merged with an axis before them"),
        (dict(route="Reshape", x_shape=("N", 3, 2, "W"), shape=[0, -1], features=12), "not static"),
    ],
    ids=[
        "gemm-transA",
        "matmul-rank3",
        "flatten-axis2",
        "reshape-rows",
        "reshape-spatial",
        "reshape-dynamic",
    ],
)
def test_bn_consumer_refusals(linear: dict, reason: str) -> None:
    proto = bn_linear(**linear)
    feeds = feeds_for(proto)
    if "W" in linear["x_shape"]:
        feeds = {"x": np.random.default_rng(1).normal(size=(2, 3, 2, 2)).astype(np.float32)}
    model, record = fold(proto, tol=0, feeds=feeds)
    assert_refused(model, record, reason)


def test_bn_read_by_two_unpadded_convs_folds_into_both() -> None:
    rng = np.random.default_rng(5)
    bn, inits = bn_node("x", "normalized", 3, rng)
    nodes = [bn]
    for i in (1, 2):
        inits.append(array(f"w{i}", rng.normal(size=(2, 3, 1, 1))))
        nodes.append(helper.make_node("Conv", ["normalized", f"w{i}"], [f"y{i}"], name=f"conv{i}"))
    model, record = fold(make(nodes, inits, {"x": ("N", 3, 4, 4)}, ["y1", "y2"]))
    assert op_types(model) == ["Conv", "Conv"]
    assert [s["into"] for s in record["sites"]] == ["conv1", "conv2"] and record["refused"] == []


def test_bn_read_by_a_conv_and_a_relu_is_refused() -> None:
    rng = np.random.default_rng(6)
    bn, inits = bn_node("x", "normalized", 3, rng)
    nodes = [
        bn,
        helper.make_node("Conv", ["normalized", "w"], ["y1"], name="conv"),
        helper.make_node("Relu", ["normalized"], ["y2"], name="relu"),
    ]
    inits.append(array("w", rng.normal(size=(2, 3, 1, 1))))
    model, record = fold(make(nodes, inits, {"x": ("N", 3, 4, 4)}, ["y1", "y2"]), tol=0)
    assert_refused(model, record, "also read by Relu relu")


# --- dtypes and opsets -------------------------------------------------------------------


def _reference_conv_bn(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The fp16 model's function computed in float64 from its stored tensors (torch, float64)."""
    torch = pytest.importorskip("torch")
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(t["w"]),
        torch.from_numpy(t["b"]),
        padding=1,
    )
    scale, shift = fm.bn_scale_shift(t["bn.scale"], t["bn.bias"], t["bn.mean"], t["bn.var"], 1e-5)
    return y.numpy() * scale[:, None, None] + shift[:, None, None]


def _to_dtype(proto: onnx.ModelProto, np_dtype: type, elem: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for init in copy.graph.initializer:
        # Through onnx_ir: onnx before 1.19 cannot write an ml_dtypes bfloat16 array.
        array = numpy_helper.to_array(init).astype(np_dtype)
        init.CopyFrom(ir.serde.serialize_tensor(ir.tensor(array, name=init.name)))
    for value in list(copy.graph.input) + list(copy.graph.output):
        value.type.tensor_type.elem_type = elem
    return copy


def test_fp16_fold_is_float64_then_cast_once() -> None:
    proto = _to_dtype(
        conv_bn(c_in=8, c_out=16, pads=[1, 1, 1, 1], seed=7), np.float16, TensorProto.FLOAT16
    )
    x = np.random.default_rng(8).normal(size=(2, 8, 7, 7)).astype(np.float16)
    model, record = fold(proto, feeds={"x": x}, tol=5e-3)
    assert_folded(model, record, "conv")
    [conv] = model.graph
    w16, b16 = (conv.inputs[i].const_value.numpy() for i in (1, 2))
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    scale, shift = fm.bn_scale_shift(
        t["bn.scale"], t["bn.bias"], t["bn.mean"], t["bn.var"], np.float32(1e-5)
    )
    np.testing.assert_array_equal(w16, (t["w"] * scale[:, None, None, None]).astype(np.float16))
    np.testing.assert_array_equal(b16, (t["b"] * scale + shift).astype(np.float16))
    # Against float64, the fold is no worse than one folded in fp16 arithmetic (which rounds
    # at every step) and close to the unfolded fp16 model.
    h = {name: value.astype(np.float16) for name, value in t.items()}
    s16 = h["bn.scale"] / np.sqrt(h["bn.var"] + np.float16(1e-5))
    naive = ir.to_proto(model)
    for init in naive.graph.initializer:
        fp16_fold = (
            h["w"] * s16[:, None, None, None]
            if init.name == conv.inputs[1].name
            else (h["b"] - h["bn.mean"]) * s16 + h["bn.bias"]
        )
        init.CopyFrom(numpy_helper.from_array(fp16_fold.astype(np.float16), init.name))
    reference = _reference_conv_bn(proto, x)
    ours, fp16_error, unfolded = (
        np.abs(runtime.run(m, {"x": x})["y"] - reference).max() for m in (model, naive, proto)
    )
    assert ours <= fp16_error
    assert ours <= 2 * unfolded


def test_bf16_fold_casts_once_to_bf16() -> None:
    bf16 = ir.DataType.BFLOAT16.numpy()
    proto = _to_dtype(conv_bn(seed=9, opset=22), bf16, TensorProto.BFLOAT16)  # Conv-22 takes bf16
    model = io.load(proto)
    FoldBatchNormPass()(model)
    [conv] = model.graph
    t = {i.name: ir.serde.deserialize_tensor(i).numpy().astype(np.float64) for i in proto.graph.initializer}
    scale, _ = fm.bn_scale_shift(
        t["bn.scale"], t["bn.bias"], t["bn.mean"], t["bn.var"], np.float32(1e-5)
    )
    w = conv.inputs[1].const_value
    assert w.dtype == ir.DataType.BFLOAT16
    np.testing.assert_array_equal(
        w.numpy().astype(np.float64),
        (t["w"] * scale[:, None, None, None]).astype(bf16).astype(np.float64),
    )
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


@pytest.mark.parametrize(
    ("opset", "attrs"),
    [
        (7, {"spatial": 1, "momentum": 0.9}),
        (9, {"momentum": 0.9}),
        (14, {"training_mode": 0}),
        (15, {"momentum": 0.1}),
    ],
)
def test_bn_opsets(opset: int, attrs: dict) -> None:
    model, record = fold(conv_bn(opset=opset, bn_attrs=attrs))
    assert_folded(model, record, "conv")


@pytest.mark.parametrize("var", ["zero", "tiny"])
def test_degenerate_variances_fold(var: str) -> None:
    model, record = fold(conv_bn(var=var, bn_attrs={"epsilon": 1e-3}))
    assert_folded(model, record, "conv")


def test_affine_false_bn_folds() -> None:
    proto = conv_bn(seed=10)
    for init in proto.graph.initializer:
        if init.name in ("bn.scale", "bn.bias"):
            value = np.ones(4) if init.name == "bn.scale" else np.zeros(4)
            init.CopyFrom(array(init.name, value))
    model, record = fold(proto)
    assert_folded(model, record, "conv")


# --- refusals ----------------------------------------------------------------------------


def test_training_mode_is_refused() -> None:
    proto = conv_bn(opset=15)
    bn = proto.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    model = io.load(proto)
    fold_pass = FoldBatchNormPass()
    fold_pass(model)
    assert_refused(model, fold_pass.record.to_dict(), "training_mode=1")


def test_bn_with_training_outputs_is_refused() -> None:
    proto = conv_bn(opset=9)
    proto.graph.node[1].output.extend(["running_mean", "running_var", "saved_mean", "saved_var"])
    model, record = fold(proto, tol=0)
    assert_refused(model, record, "has 5 outputs")


def test_spatial_zero_is_refused() -> None:
    proto = conv_bn(opset=7, bn_attrs={"spatial": 0})
    model = io.load(proto)
    fold_pass = FoldBatchNormPass()
    fold_pass(model)
    assert_refused(model, fold_pass.record.to_dict(), "spatial=0")


def test_zero_variance_without_eps_is_refused() -> None:
    model, record = fold(conv_bn(var="zero", bn_attrs={"epsilon": 0.0}), tol=0)
    assert_refused(model, record, "not positive")


def test_conv_output_read_by_another_node_is_refused() -> None:
    proto = conv_bn()
    proto.graph.node.append(helper.make_node("Add", ["conv_out", "y"], ["z"], name="add_3"))
    model, record = fold(add_output(proto, "z"), tol=0)
    assert_refused(model, record, "Conv conv output 'conv_out' is also read by Add add_3")


def test_conv_output_that_is_a_graph_output_is_refused() -> None:
    model, record = fold(add_output(conv_bn(), "conv_out"), tol=0)
    assert_refused(model, record, "also read by the graph output")


def _with_graph_inputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    inits = {i.name: i for i in proto.graph.initializer}
    for name in names:
        proto.graph.input.append(
            helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims))
        )
    return proto


@pytest.mark.parametrize(
    ("names", "what"),
    [(["bn.mean"], "BatchNormalization mean 'bn.mean'"), (["w"], "Conv weight 'w'")],
)
def test_graph_input_constants_are_refused(names: list[str], what: str) -> None:
    proto = _with_graph_inputs(conv_bn(), names)
    feeds = feeds_for(conv_bn())
    model, record = fold(proto, feeds=feeds, tol=0)
    assert_refused(model, record, f"{what} is a graph input")
    assert [v.name for v in model.graph.inputs] == ["x", *names]


def test_freeze_initializer_inputs_folds_and_removes_them() -> None:
    names = ["w", "b", "bn.scale", "bn.bias", "bn.mean", "bn.var"]
    proto = _with_graph_inputs(conv_bn(), names)
    model, record = fold(
        proto, PassOptions(freeze_initializer_inputs=True), feeds=feeds_for(conv_bn())
    )
    assert_folded(model, record, "conv")
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert len(record["notes"]) == len(names) and all("frozen" in note for note in record["notes"])


def test_parameters_computed_at_run_time_are_refused() -> None:
    proto = conv_bn()
    proto.graph.input.append(helper.make_tensor_value_info("g", FLOAT, [4]))
    proto.graph.node.insert(0, helper.make_node("Abs", ["g"], ["abs_g"], name="abs"))
    proto.graph.node[2].input[1] = "abs_g"
    feeds = {**feeds_for(conv_bn()), "g": np.ones(4, np.float32)}
    model, record = fold(proto, feeds=feeds, tol=0)
    assert_refused(
        model, record, "BatchNormalization scale 'abs_g' is computed at run time by Abs abs"
    )


def test_parameter_graph_input_without_initializer_is_refused() -> None:
    proto = conv_bn()
    proto.graph.input.append(helper.make_tensor_value_info("g", FLOAT, [4]))
    proto.graph.node[1].input[1] = "g"
    feeds = {**feeds_for(conv_bn()), "g": np.ones(4, np.float32)}
    model, record = fold(proto, feeds=feeds, tol=0)
    assert_refused(model, record, "graph input with no initializer")


def test_bn_inside_a_model_function_is_refused() -> None:
    """A function cannot hold initializers; its BN is reported, not silently skipped."""
    rng = np.random.default_rng(13)
    bn, bn_inits = bn_node("c", "y", 4, rng)
    constants = [
        helper.make_node("Constant", [], [t.name], value=t)
        for t in [array("w", rng.normal(size=(4, 3, 1, 1))), *bn_inits]
    ]
    body = [*constants, helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn]
    function = helper.make_function(
        "local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 17)]
    )
    graph = helper.make_graph(
        [helper.make_node("ConvBn", ["x"], ["y"], domain="local", name="call")],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ("N", 3, 4, 4))],
        [helper.make_tensor_value_info("y", FLOAT, ("N", 4, 4, 4))],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    proto = helper.make_model(graph, opset_imports=opsets, functions=[function])
    proto.ir_version = 8
    model, record = fold(proto, cleanup=False, tol=0)
    assert record["applied"] == 0
    assert "inside the model function ConvBn" in record["refused"][0]["reason"]


def standalone(rank: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    bn, inits = bn_node("r", "y", 3, rng)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn,
        helper.make_node("Sigmoid", ["y"], ["z"], name="sig"),
    ]
    return make(nodes, inits, {"x": ("N", 3, 5, 4)[:rank]}, ["z"])


def test_standalone_bn_is_refused_with_its_neighbours() -> None:
    model, record = fold(standalone(), tol=0)
    assert_refused(
        model,
        record,
        "nothing to fold into: the producer is Relu relu, and its output goes to Sigmoid sig",
    )


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_standalone_bn_is_lowered_on_request(rank: int) -> None:
    model, record = fold(standalone(rank), PassOptions(lower_standalone_bn=True))
    assert op_types(model) == ["Relu", "Mul", "Add", "Sigmoid"]
    assert (
        record["sites"] == [{"node": "bn", "into": "bn/Mul", "how": "lowered"}]
        and record["refused"] == []
    )
    assert list(model.graph.node(1).inputs[1].const_value.shape) == [3] + [1] * (rank - 2)


def test_refused_bn_with_graph_input_parameters_is_not_lowered() -> None:
    proto = _with_graph_inputs(standalone(), ["bn.var"])
    model, record = fold(
        proto, PassOptions(lower_standalone_bn=True), feeds=feeds_for(standalone()), tol=0
    )
    assert_refused(model, record, "is a graph input")


# --- preconditions -----------------------------------------------------------------------


def test_constant_node_parameters_fold_without_cleanup_in_a_users_pass_manager() -> None:
    proto = conv_bn()
    constants = []
    for init in list(proto.graph.initializer):
        constants.append(
            helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}")
        )
    del proto.graph.initializer[:]
    nodes = constants + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    feeds = feeds_for(proto)
    model = io.load(proto)
    ir.passes.PassManager([FoldBatchNormPass()])(model)
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Conv"]
    assert rel_error(runtime.run(model, feeds), runtime.run(proto, feeds)) <= 1e-6


def test_weight_shared_with_another_conv_is_cloned() -> None:
    proto = conv_bn()
    proto.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["other"], name="other_conv"))
    proto = add_output(proto, "other")
    original_w = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    model, record = fold(proto)
    assert_folded(model, record, "conv")
    convs = {n.name: n for n in model.graph}
    np.testing.assert_array_equal(convs["other_conv"].inputs[1].const_value.numpy(), original_w)
    assert convs["conv"].inputs[1].name not in ("w", "b")


def test_graph_interface_is_kept() -> None:
    """The BN output keeps its name; declared symbolic dims stay symbolic (no inferred 5s)."""
    proto = conv_bn()
    for dim, name in zip(proto.graph.output[0].type.tensor_type.shape.dim, "NCHW", strict=True):
        dim.Clear()
        dim.dim_param = name
    model, _ = fold(proto)
    [output] = model.graph.outputs
    assert output.name == "y" and [str(d) for d in output.shape] == list("NCHW")


def test_chain_conv_bn_bn_conv() -> None:
    """The first BN folds back into the Conv; the second, now after that Conv, folds too."""
    rng = np.random.default_rng(12)
    bn1, i1 = bn_node("c1", "n1", 4, rng, name="bn1")
    bn2, i2 = bn_node("n1", "n2", 4, rng, name="bn2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn1,
        bn2,
        helper.make_node("Conv", ["n2", "w2"], ["y"], name="conv2"),
    ]
    inits = (
        [array("w1", rng.normal(size=(4, 3, 3, 3))), array("w2", rng.normal(size=(2, 4, 1, 1)))]
        + i1
        + i2
    )
    model, record = fold(make(nodes, inits, {"x": ("N", 3, 6, 6)}, ["y"]))
    assert op_types(model) == ["Conv", "Conv"]
    assert {s["node"] for s in record["sites"]} == {"bn1", "bn2"} and record["refused"] == []


# --- the zoo -----------------------------------------------------------------------------

ZOO_BN_MODELS = ("resnet", "mobilenetv2", "vgg", "yolo")
# A fold computed in float64 and rounded once to float16 differs from the unfolded float16
# graph (rounded after every op) by a few float16 ulps of the output scale.
FP16_REL_ERROR = 2e-3


@pytest.fixture(scope="session")
def zoo_feeds() -> dict[tuple[str, bool], dict[str, np.ndarray]]:
    pytest.importorskip("torch")
    from normfold.models import build

    built = {name: build(name) for name in ZOO_BN_MODELS}
    return {
        (name, half): (zoo.half() if half else zoo).feeds()
        for name, zoo in built.items()
        for half in (False, True)
    }


def _zoo_variants() -> list:
    """Every export variant; the default one and ts13-inputs (initializers as graph inputs) run
    by default, the rest of the matrix is slow (.ci/run)."""
    try:
        from normfold.models.export import DEFAULT_VARIANT, VARIANTS
    except ImportError:
        return []
    return [pytest.param(v, marks=[] if v in (DEFAULT_VARIANT, "ts13-inputs") else [pytest.mark.slow])
            for v in VARIANTS]


@pytest.mark.parametrize("variant", _zoo_variants())
@pytest.mark.parametrize("name", ZOO_BN_MODELS)
def test_zoo_exports_fold_every_bn(name: str, variant: str, zoo_feeds) -> None:
    from normfold.models.export import VARIANTS, cached_export
    from normfold.passes import create_passes

    half = VARIANTS[variant].half
    path = cached_export(name, variant)
    feeds = zoo_feeds[name, half]
    expected = runtime.run(path, feeds)
    for freeze in (False, True) if variant == "ts13-inputs" else (False,):
        model = io.load(path)
        passes = create_passes(
            ["fold-bn", "fold-affine"], PassOptions(freeze_initializer_inputs=freeze)
        )
        for each in passes:
            each(model)
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        assert rel_error(runtime.run(model, feeds), expected) <= (FP16_REL_ERROR if half else 1e-5)
        record = passes[1].record.to_dict()
        left = [n.name for n in model.graph.all_nodes() if n.op_type == "BatchNormalization"]
        reasons = {r["node"]: r["reason"] for r in record["refused"]}
        assert set(left) == set(reasons)
        if variant == "ts13-inputs" and not freeze:
            assert left and all("is a graph input" in reason for reason in reasons.values())
        else:
            assert left == []
