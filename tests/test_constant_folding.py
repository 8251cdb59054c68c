"""cleanup's constant folding: values computed by onnxruntime, never by onnx.reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold import runtime
from normfold.passes.cleanup import CleanupPass


def _constant_bn_model(opset: int, dtype: type = np.float32) -> onnx.ModelProto:
    """``y = x + BN(c)`` with every BN input constant and ``momentum`` written out (TorchScript)."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    arrays = {
        "c": rng.normal(size=(2, 3, 4, 4)),
        "gamma": rng.normal(size=3),
        "beta": rng.normal(size=3),
        "mean": rng.normal(size=3),
        "var": rng.uniform(0.1, 2.0, size=3),
    }
    nodes = [
        helper.make_node(
            "BatchNormalization", list(arrays), ["bn"], epsilon=1e-3, momentum=0.9, name="bn"
        ),
        helper.make_node("Add", ["x", "bn"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_bn",
        [helper.make_tensor_value_info("x", elem, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", elem, [2, 3, 4, 4])],
        [numpy_helper.from_array(a.astype(dtype), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _folded(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    CleanupPass()(model)
    return model


@pytest.mark.parametrize("opset", [9, 13, 15])
def test_constant_batchnorm_folds_to_onnxruntime_values(opset: int) -> None:
    proto = _constant_bn_model(opset)
    model = _folded(proto)
    assert [node.op_type for node in model.graph] == ["Add"]
    feeds = {"x": np.zeros((2, 3, 4, 4), np.float32)}
    np.testing.assert_array_equal(runtime.run(ir.to_proto(model), feeds)["y"], runtime.run(proto, feeds)["y"])
    # And onnxruntime agrees with the BN formula in float64.
    arrays = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    shape = (1, 3, 1, 1)
    expected = (arrays["c"] - arrays["mean"].reshape(shape)) / np.sqrt(arrays["var"].reshape(shape) + 1e-3)
    expected = expected * arrays["gamma"].reshape(shape) + arrays["beta"].reshape(shape)
    folded = next(iter(model.graph)).inputs[1].const_value.numpy()
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-6)


def test_onnx_reference_batchnorm_is_the_trap() -> None:
    """TRAPS.md: onnx.reference's BN-9 uses batch statistics when momentum is written out. If
    onnx fixes it, this test says so (normfold never relies on it either way)."""
    from onnx.reference import ReferenceEvaluator

    proto = _constant_bn_model(13)
    feeds = {"x": np.zeros((2, 3, 4, 4), np.float32)}
    reference = ReferenceEvaluator(proto).run(None, feeds)[0]
    truth = runtime.run(proto, feeds)["y"]
    assert np.abs(reference - truth).max() / np.abs(truth).max() > 0.05


def test_fp16_constant_folding_matches_onnxruntime_bit_for_bit() -> None:
    proto = _constant_bn_model(15, np.float16)
    model = _folded(proto)
    feeds = {"x": np.zeros((2, 3, 4, 4), np.float16)}
    np.testing.assert_array_equal(runtime.run(ir.to_proto(model), feeds)["y"], runtime.run(proto, feeds)["y"])


def test_constant_chains_fold_through_shapes_and_keep_graph_outputs() -> None:
    """Shape of a static input → Gather → Mul of constants folds (symbolic step, then onnxruntime);
    a constant that is itself a graph output keeps its node."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "width_f"], ["y"]),
        helper.make_node("Neg", ["w"], ["neg_w"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("neg_w", TensorProto.FLOAT, [3]),
        ],
        [
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.arange(3, dtype=np.float32), "w"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _folded(proto)
    assert sorted(node.op_type for node in model.graph) == ["Mul", "Neg"]
    assert [o.name for o in model.graph.outputs] == ["y", "neg_w"]
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)}
    for name, value in runtime.run(ir.to_proto(model), feeds).items():
        np.testing.assert_array_equal(value, runtime.run(proto, feeds)[name])


def test_a_node_onnxruntime_cannot_run_is_left_alone() -> None:
    """An op onnxruntime has no kernel for (Erf in double) stays, with what it feeds; the
    constant beside it still folds."""
    nodes = [
        helper.make_node("Erf", ["a"], ["erf"]),
        helper.make_node("Cast", ["erf"], ["shifted_f"], to=TensorProto.FLOAT),
        helper.make_node("Neg", ["w"], ["neg_w"]),
        helper.make_node("Add", ["x", "shifted_f"], ["s"]),
        helper.make_node("Add", ["s", "neg_w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [
            numpy_helper.from_array(np.array([0.1, 0.2, 0.3]), "a"),
            numpy_helper.from_array(np.arange(3, dtype=np.float32), "w"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _folded(proto)
    ops = sorted(node.op_type for node in model.graph)
    assert "Neg" not in ops and "Erf" in ops
    # onnxruntime cannot run this model at all; what folded is -w, what stays reads a
    # constant: Erf(a) → Cast → Add(x, ·).
    erf = next(node for node in model.graph if node.op_type == "Erf")
    assert erf.inputs[0].name == "a" and erf.outputs[0].uses()
    folded = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name == "neg_w"]
    np.testing.assert_array_equal(folded[0], -np.arange(3, dtype=np.float32))


def test_float16_constants_come_from_the_float32_run() -> None:
    """onnxruntime keeps float32 between float16 ops: ``(c·1e3)·1e-2`` never overflows when the
    graph runs, so its intermediate ``c·1e3`` (past 65504 in float16) must not be folded alone;
    and a Cast of float32 weights to float16 stays (the running graph elides that rounding)."""
    nodes = [
        helper.make_node("Mul", ["c", "big"], ["scaled"]),
        helper.make_node("Mul", ["x", "scaled"], ["a"]),
        helper.make_node("Mul", ["a", "small"], ["b"]),
        helper.make_node("Cast", ["w32"], ["w"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["b", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3])],
        [
            numpy_helper.from_array(np.array([100.0, 200.0, 1.0], np.float16), "c"),
            numpy_helper.from_array(np.array(1e3, np.float16), "big"),
            numpy_helper.from_array(np.array(1e-2, np.float16), "small"),
            numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "w32"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _folded(proto)
    ops = sorted(node.op_type for node in model.graph)
    assert ops.count("Mul") == 3 and "Cast" in ops  # nothing folded that float16 cannot hold
    feeds = {"x": np.ones(3, np.float16)}
    np.testing.assert_array_equal(runtime.run(ir.to_proto(model), feeds)["y"], runtime.run(proto, feeds)["y"])
