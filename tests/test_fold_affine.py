"""fold-affine: constant per-channel Mul/Add/Sub/Div after Conv, ConvTranspose, Gemm, MatMul.

Every case runs the original and the folded model through onnxruntime with optimizations off.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold import io
from normfold.passes import PassOptions
from normfold.passes._fold_graph import FreshNames
from normfold.passes.fold_affine import FoldAffinePass
from tests._fold_helpers import array, feeds_for, make, op_types, run_pass
from tests.conftest import conv_bn_relu_model


def fold(
    proto: onnx.ModelProto, options: PassOptions | None = None, **kwargs
) -> tuple[ir.Model, dict]:
    return run_pass(proto, FoldAffinePass, options, **kwargs)


def producer(
    kind: str, rng: np.random.Generator, *, channels: int = 4, group: int = 1, bias: bool = True
) -> tuple[list, list, dict]:
    """Nodes, initializers and inputs of a producer whose output is ``p``."""
    if kind in ("Conv", "ConvTranspose"):
        c_in = 2 * group
        shape = (
            (channels, c_in // group, 3, 3) if kind == "Conv" else (c_in, channels // group, 3, 3)
        )
        inits = [array("w", rng.normal(size=shape))]
        inputs = ["x", "w"]
        if bias:
            inits.append(array("b", rng.normal(size=channels)))
            inputs.append("b")
        attrs = (
            {"group": group, "pads": [1, 0, 1, 0]}
            if kind == "Conv"
            else {"group": group, "strides": [2, 2], "output_padding": [1, 0]}
        )
        return (
            [helper.make_node(kind, inputs, ["p"], name="linear", **attrs)],
            inits,
            {"x": ("N", c_in, 5, 6)},
        )
    if kind == "Gemm":
        inits = [array("B", rng.normal(size=(channels, 3))), array("C", rng.normal(size=channels))]
        node = helper.make_node(
            "Gemm", ["x", "B", "C"], ["p"], name="linear", transB=1, alpha=0.5, beta=2.0
        )
        return [node], inits, {"x": (2, 3)}
    inits = [array("W", rng.normal(size=(3, channels)))]
    nodes = [
        helper.make_node(
            "MatMul", ["x", "W"], ["mm" if kind == "MatMul+Add" else "p"], name="linear"
        )
    ]
    if kind == "MatMul+Add":
        inits.append(array("bias", rng.normal(size=channels)))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["p"], name="bias_add"))
    return nodes, inits, {"x": ("N", 5, 3)}


def chain(
    kind: str, steps: list[tuple[str, tuple, bool]], *, seed: int = 0, **producer_args
) -> onnx.ModelProto:
    """``producer → op(·, c) → …`` with random constants of the given shapes (nonzero, for Div)."""
    rng = np.random.default_rng(seed)
    nodes, inits, inputs = producer(kind, rng, **producer_args)
    source = "p"
    for i, (op_type, shape, constant_first) in enumerate(steps):
        value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        inits.append(array(f"c{i}", value))
        operands = [f"c{i}", source] if constant_first else [source, f"c{i}"]
        nodes.append(helper.make_node(op_type, operands, [f"a{i}"], name=f"{op_type.lower()}{i}"))
        source = f"a{i}"
    return make(nodes, inits, inputs, [source])


@pytest.mark.parametrize(
    ("kind", "steps"),
    [
        ("Conv", [("Mul", (4, 1, 1), False), ("Add", (1, 4, 1, 1), False)]),
        ("Conv", [("Mul", (), True), ("Sub", (4, 1, 1), False), ("Div", (1, 4, 1, 1), False)]),
        ("Conv", [("Sub", (4, 1, 1), True)]),
        ("ConvTranspose", [("Mul", (4, 1, 1), False), ("Add", (4, 1, 1), True)]),
        ("Gemm", [("Mul", (4,), False), ("Add", (1, 4), False)]),
        ("MatMul", [("Mul", (4,), False), ("Div", (1, 1, 4), False)]),
        ("MatMul+Add", [("Mul", (1, 4), True), ("Sub", (4,), False)]),
    ],
    ids=[
        "conv-mul-add",
        "conv-scalar-sub-div",
        "conv-const-minus",
        "convT",
        "gemm",
        "matmul-rank3",
        "matmul-add",
    ],
)
def test_per_channel_chains_fold(kind: str, steps: list) -> None:
    model, record = fold(chain(kind, steps))
    assert [s["node"] for s in record["sites"]] == [
        f"{op.lower()}{i}" for i, (op, _, _) in enumerate(steps)
    ]
    assert all(s["into"] == "linear" for s in record["sites"]) and record["refused"] == []
    # A MatMul scaled without a shift needs no bias Add.
    expected_ops = {
        "Conv": ["Conv"],
        "ConvTranspose": ["ConvTranspose"],
        "Gemm": ["Gemm"],
        "MatMul": ["MatMul"],
    }
    assert op_types(model) == expected_ops.get(kind, ["MatMul", "Add"])


def test_grouped_conv_without_bias_gets_one() -> None:
    model, record = fold(chain("Conv", [("Add", (4, 1, 1), False)], group=2, bias=False))
    assert record["applied"] == 1 and op_types(model) == ["Conv"]
    assert len(model.graph.node(0).inputs) == 3


def test_scale_without_shift_adds_no_bias() -> None:
    model, _ = fold(chain("MatMul", [("Mul", (4,), False)]))
    assert op_types(model) == ["MatMul"]


def test_vector_on_the_last_spatial_axis_is_not_per_channel() -> None:
    """The trap: a [C] vector after a Conv whose output width equals C scales the width axis."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["p"], name="linear"),
        helper.make_node("Mul", ["p", "c"], ["y"], name="mul"),
    ]
    inits = [array("w", rng.normal(size=(4, 2, 1, 1))), array("c", rng.uniform(0.5, 2.0, 4))]
    proto = make(nodes, inits, {"x": ("N", 2, 3, 4)}, ["y"])
    model, record = fold(proto, tol=0)
    assert op_types(model) == ["Conv", "Mul"]
    assert record["refused"] == [
        {
            "node": "mul",
            "reason": "the constant of shape [4] varies along axis 3 of the rank-4 output, "
            "not only along the channel axis 1 of Conv linear",
        }
    ]


@pytest.mark.parametrize(
    ("kind", "shape", "reason"),
    [
        ("Gemm", (2, 1), "varies along axis 0 of the rank-2 output"),
        ("Conv", (1, 1, 4, 1, 1), "more axes than the rank-4 output"),
        ("Conv", (4, 5, 1), "varies along axis 2 of the rank-4 output"),
    ],
)
def test_constants_that_are_not_per_channel_are_refused(
    kind: str, shape: tuple, reason: str
) -> None:
    model, record = fold(chain(kind, [("Mul", shape, False)]), tol=0)
    assert record["applied"] == 0 and reason in record["refused"][0]["reason"]


def test_division_by_zero_is_refused() -> None:
    proto = chain("Conv", [("Div", (4, 1, 1), False)])
    value = numpy_helper.to_array(proto.graph.initializer[-1]).copy()
    value[2] = 0.0
    proto.graph.initializer[-1].CopyFrom(array("c0", value))
    model, record = fold(proto, tol=0)
    assert record["refused"][0]["node"] == "div0" and "non-finite" in record["refused"][0]["reason"]


def test_non_sites_are_neither_folded_nor_reported() -> None:
    """A product of activations, a bias Add after a bare MatMul, Div(c, y), a scale of a shared
    output (GELU's Div beside its Mul): nothing to fold, nothing to report."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["biased"], name="bias"),
        helper.make_node("Transpose", ["x"], ["xt"], name="transpose"),
        helper.make_node("MatMul", ["x", "xt"], ["scores"], name="scores"),
        helper.make_node("Div", ["scores", "d"], ["scaled"], name="scale"),
        helper.make_node("Div", ["one", "mm"], ["inverse"], name="inverse"),
        helper.make_node("Conv", ["img", "w"], ["conv"], name="conv"),
        helper.make_node("Mul", ["conv", "img"], ["gated"], name="gate"),
        helper.make_node("Div", ["biased", "d"], ["half"], name="gelu_div"),
        helper.make_node("Mul", ["biased", "half"], ["gelu"], name="gelu_mul"),
    ]
    inits = [
        array("W", rng.normal(size=(3, 3))),
        array("bias", rng.normal(size=3)),
        array("d", np.float32(2.0)),
        array("one", np.float32(1.0)),
        array("w", rng.normal(size=(2, 2, 1, 1))),
    ]
    proto = make(
        nodes, inits, {"x": (2, 3), "img": ("N", 2, 3, 3)}, ["scaled", "inverse", "gated", "gelu"]
    )
    model, record = fold(proto, tol=0)
    assert record["applied"] == 0 and record["refused"] == []


def test_weight_graph_input_refused_unless_frozen() -> None:
    proto = chain("Conv", [("Mul", (4, 1, 1), False)])
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 3, 3]))
    feeds = {"x": feeds_for(proto)["x"]}
    _, record = fold(proto, tol=0, feeds=feeds)
    assert "Conv weight 'w' is a graph input" in record["refused"][0]["reason"]
    model, record = fold(proto, PassOptions(freeze_initializer_inputs=True), feeds=feeds)
    assert record["applied"] == 1 and [v.name for v in model.graph.inputs] == ["x"]
    assert record["notes"] == [
        "graph input 'w' was frozen to its initializer and is no longer a model input "
        "(--freeze-initializer-inputs)"
    ]


def test_fp16_fold_casts_once() -> None:
    proto = chain("Conv", [("Mul", (4, 1, 1), False)], seed=3)
    original = {
        i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer
    }
    for init in proto.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        )
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    model, record = fold(proto, tol=5e-3)
    assert record["applied"] == 1
    h = {k: v.astype(np.float16).astype(np.float64) for k, v in original.items()}
    weight = model.graph.node(0).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(weight, (h["w"] * h["c0"].reshape(4, 1, 1, 1)).astype(np.float16))


@st.composite
def affine_models(draw: st.DrawFn) -> onnx.ModelProto:
    kind = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul", "MatMul+Add"]))
    shapes = {
        "Conv": [(), (4, 1, 1), (1, 4, 1, 1)],
        "ConvTranspose": [(), (4, 1, 1), (1, 4, 1, 1)],
        "Gemm": [(), (4,), (1, 4)],
        "MatMul": [(), (4,), (1, 4), (1, 1, 4)],
        "MatMul+Add": [(), (4,), (1, 1, 4)],
    }[kind]
    ops = st.tuples(
        st.sampled_from(["Mul", "Add", "Sub", "Div"]), st.sampled_from(shapes), st.booleans()
    )
    steps = [
        (op, shape, first and op != "Div")
        for op, shape, first in draw(st.lists(ops, min_size=1, max_size=3))
    ]
    group = draw(st.sampled_from([1, 2])) if kind.startswith("Conv") else 1
    return chain(
        kind, steps, seed=draw(st.integers(0, 2**16)), group=group, bias=draw(st.booleans())
    )


@settings(max_examples=40, deadline=None)
@given(affine_models())
def test_property_affine_chains_fold_within_float32(proto: onnx.ModelProto) -> None:
    model, record = fold(proto, tol=1e-6)
    assert record["refused"] == []
    linear = proto.graph.node[0].op_type
    if linear != "MatMul":
        assert op_types(model) == [linear]
    else:  # after a bare MatMul an Add/Sub is its bias: the chain folds up to it
        assert op_types(model)[1:2] in ([], ["Add"], ["Sub"])


def test_fresh_names_are_fresh_when_asked_for() -> None:
    # The model's names are read at the first name asked for: a value added after the namer
    # was made (a rewrite that named its own output) is never handed out again.
    model = io.load(conv_bn_relu_model())
    fresh = FreshNames(model)
    node = model.graph.node(0)
    node.outputs[0].name = "bias_scaled"
    assert fresh("bias scaled") == "bias_scaled_2"
    assert fresh("bias scaled") == "bias_scaled_3"
    assert fresh("w") == "w_2"  # an initializer
