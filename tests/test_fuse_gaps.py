"""Two fusion gaps the peers' own test suites showed: a residual sum with a bias before the norm
(``Norm((x + skip) + bias)``) uses the Skip op's bias input; a float16 affine left after a Cast
that stays is reported with its reason instead of silently."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold import runtime
from tests.test_fuse_norm_graphs import Spec, build, feed, fuse, ops


def _residual_bias_ln(*, bias_first: bool, sum_read: bool, beta: bool = True, hidden: int = 8) -> onnx.ModelProto:
    inner = helper.make_node("Add", ["a", "b"], ["s"], name="residual")
    outer = helper.make_node("Add", ["bias", "s"] if bias_first else ["s", "bias"], ["t"], name="add_bias")
    ln_inputs = ["t", "g", "beta"] if beta else ["t", "g"]
    nodes = [inner, outer, helper.make_node("LayerNormalization", ln_inputs, ["y"], name="ln", axis=-1, epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])]
    if sum_read:
        nodes.append(helper.make_node("Relu", ["t"], ["r"], name="reader"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", "seq", hidden]))
    inits = [
        numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "g"),
        numpy_helper.from_array(np.linspace(-3, 2, hidden).astype(np.float32), "bias"),
    ] + ([numpy_helper.from_array(np.linspace(-1, 1, hidden).astype(np.float32), "beta")] if beta else [])
    graph = helper.make_graph(
        nodes, "skip_bias",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", hidden]) for name in ("a", "b")],
        outputs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("sum_read", [False, True])
@pytest.mark.parametrize("beta", [True, False])
def test_residual_sum_with_bias_becomes_skip_layernorm_with_its_bias(bias_first: bool, sum_read: bool,
                                                                      beta: bool) -> None:
    model = _residual_bias_ln(bias_first=bias_first, sum_read=sum_read, beta=beta)
    fused, _ = fuse(model, target="onnxruntime", skip_ops=True)
    assert ops(fused) == Counter({"SkipLayerNormalization": 1, **({"Relu": 1} if sum_read else {})})
    skip = next(n for n in fused.graph.node if n.op_type == "SkipLayerNormalization")
    assert list(skip.input)[-1] == "bias" and len(skip.input) == 5
    rng = np.random.default_rng(0)
    feeds = {name: (rng.normal(size=(2, 3, 8)) * 4).astype(np.float32) for name in ("a", "b")}
    want, got = runtime.run(model, feeds), runtime.run(fused, feeds)  # optimizations off on both
    for name in want:
        # The kernel adds input + skip, then bias, as the graph does: the sum is bit-exact.
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-6)
    if sum_read:
        assert np.array_equal(got["r"], want["r"])


def test_residual_bias_sites_are_refused_as_slower_by_default() -> None:
    model = _residual_bias_ln(bias_first=False, sum_read=False)
    fused, fuse_pass = fuse(model, target="onnxruntime")
    assert ops(fused) == ops(model)
    assert any("SkipLayerNormalization measured" in r["reason"] for r in fuse_pass.record.refused)


def test_an_inner_sum_read_elsewhere_keeps_the_bias_apart() -> None:
    model = _residual_bias_ln(bias_first=False, sum_read=False)
    model.graph.node.append(helper.make_node("Relu", ["s"], ["r"], name="inner_reader"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", "seq", 8]))
    fused, _ = fuse(model, target="onnxruntime", skip_ops=True)
    assert "SkipLayerNormalization" not in ops(fused) or all(
        len(n.input) < 5 for n in fused.graph.node if n.op_type == "SkipLayerNormalization"
    )


def test_a_half_affine_after_a_cast_that_stays_is_reported() -> None:
    """x16 -> Cast(float) -> LayerNorm (scale 0.1: no float16) -> Cast(float16) -> * w16 + b16."""
    spec = Spec(upcast=TensorProto.FLOAT16, scale=np.full(8, 0.1), eps=1e-5)
    model = build(spec)
    graph = model.graph
    graph.node[-1].output[0] = "y16"
    graph.initializer.extend([
        numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float16), "w16"),
        numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float16), "b16"),
    ])
    graph.node.extend([
        helper.make_node("Mul", ["y16", "w16"], ["scaled16"], name="half_scale"),
        helper.make_node("Add", ["scaled16", "b16"], ["y"], name="half_shift"),
    ])
    fused, fuse_pass = fuse(model)
    assert ops(fused) == Counter({"Cast": 2, "LayerNormalization": 1, "Mul": 1, "Add": 1})
    reasons = {r["node"]: r["reason"] for r in fuse_pass.record.refused}
    assert "Cast to FLOAT16" in reasons["half_scale"] and "multiplier" in reasons["half_scale"]
    assert "Cast to FLOAT16" in reasons["half_shift"] and "addend" in reasons["half_shift"]
    np.testing.assert_allclose(
        runtime.run(fused, feed(spec))["y"].astype(np.float32), runtime.run(model, feed(spec))["y"].astype(np.float32),
        rtol=2e-2, atol=2e-2,
    )


def test_bias_added_before_the_residual_is_another_sum_and_keeps_its_add() -> None:
    """``(a + bias) + b``, a MatMul's bias then the residual (BERT's order), rounds differently
    from the kernel's ``(a + b) + bias``: the bias Add stays, the residual sum becomes the Skip op."""
    model = _residual_bias_ln(bias_first=False, sum_read=False)
    inner, outer = model.graph.node[0], model.graph.node[1]
    inner.input[:] = ["a", "bias"]
    outer.input[:] = ["s", "b"]
    fused, _ = fuse(model, target="onnxruntime", skip_ops=True)
    assert ops(fused) == Counter({"Add": 1, "SkipLayerNormalization": 1})
    skip = next(n for n in fused.graph.node if n.op_type == "SkipLayerNormalization")
    assert len(skip.input) == 4


@pytest.mark.parametrize("norm", ["RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_norm_and_float16_take_the_bias_input(norm: str, dtype: str) -> None:
    """``Norm((a + b) + bias)`` for each norm the Skip ops cover, float32 and float16: the bias is
    the op's last input, the residual sum read elsewhere is bit-exact, and verify passes (float16
    judged against the float32 run of the reference)."""
    import normfold

    model = _residual_bias_ln(bias_first=False, sum_read=True, beta=norm == "LayerNormalization")
    node = model.graph.node[2]
    node.op_type = norm
    if norm == "RMSNormalization":  # RMSNormalization is opset 23
        model.opset_import[0].version, model.ir_version = 23, 10
    if dtype == "float16":
        for tensor in model.graph.initializer:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    fused, fuse_pass = fuse(model, target="onnxruntime", skip_ops=True)
    skip_op = "SkipLayerNormalization" if norm == "LayerNormalization" else "SkipSimplifiedLayerNormalization"
    assert ops(fused) == Counter({skip_op: 1, "Relu": 1}) and not fuse_pass.record.refused
    skip = next(n for n in fused.graph.node if n.op_type == skip_op)
    assert list(skip.input)[-1] == "bias" and list(skip.input)[:2] == ["a", "b"]
    rng = np.random.default_rng(0)
    feeds = {name: (rng.normal(size=(2, 3, 8)) * 4).astype(dtype) for name in ("a", "b")}
    assert np.array_equal(runtime.run(fused, feeds)["r"], runtime.run(model, feeds)["r"])
    report = normfold.verify(model, fused)
    assert report.passed, report.format_table()
    assert report.reference == ("float32" if dtype == "float16" else "model")
