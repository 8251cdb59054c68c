"""float16 folds: refused when the folded weights overflow, underflow or lose precision; and the
verification rule that fails such a fold when it is made anyway (TRAPS.md, issue 10 item 8)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold import low_precision, runtime
from normfold.math import fold_precision as fp

F16 = TensorProto.FLOAT16


def _conv_bn(weight, bias, gamma, beta, mean, var, *, dtype=np.float16, size: int = 6) -> onnx.ModelProto:
    """``BN(Conv(x))`` (padded Conv, epsilon 0) with every tensor stored in ``dtype``."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    c_out, c_in = weight.shape[:2]
    arrays = {"w": weight, "b": bias, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], epsilon=0.0, name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", elem, [1, c_in, size, size])],
        [helper.make_tensor_value_info("z", elem, [1, c_out, size, size])],
        [numpy_helper.from_array(np.asarray(a).astype(dtype), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _cancelling() -> onnx.ModelProto:
    """The fold that is 1.8–3.2% off: Conv bias = BN mean ≈ 1050 with tiny weights, BN scale ~7e3.

    The unfolded graph computes ``s·(y − μ)`` from a ``y`` rounded near 1050 (onnxruntime runs
    float16 Conv+BN in float32), so its output moves in steps of ``s·ulp(y)``; the folded Conv
    computes the smooth exact value. Against the float32 run the unfolded float16 graph is exact.
    """
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 3, 3)) * 4e-4
    mean = np.full(4, 1024.0) + rng.integers(0, 64, size=4)
    gamma = rng.uniform(1, 4, size=4) * 100
    return _conv_bn(weight, mean, gamma, rng.normal(size=4), mean, np.full(4, 1e-3))


def _overflowing() -> onnx.ModelProto:
    """BN scale 1000 on weights of 100: the folded weight 1e5 is inf in float16."""
    return _conv_bn(np.full((4, 3, 3, 3), 100.0), np.zeros(4), np.full(4, 10.0), np.zeros(4), np.zeros(4), np.full(4, 1e-4))


def _hand_folded(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The fold made anyway: float64 arithmetic, cast once to float16 (what fold-bn would write)."""
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    scale = t["gamma"] / np.sqrt(t["var"])
    with np.errstate(over="ignore"):
        weight = (t["w"] * scale[:, None, None, None]).astype(np.float16)
        bias = (t["b"] * scale + t["beta"] - t["mean"] * scale).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1], name="conv")],
        "folded",
        list(proto.graph.input),
        list(proto.graph.output),
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _as_float32(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for init in copy.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for value in [*copy.graph.input, *copy.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy


def _relative_to_float32(proto: onnx.ModelProto, model: onnx.ModelProto) -> float:
    x = np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float16)
    truth = runtime.run(_as_float32(proto), {"x": x.astype(np.float32)})["z"].astype(np.float64)
    out = runtime.run(model, {"x": x})["z"].astype(np.float64)
    return float(np.abs(out - truth).max() / np.abs(truth).max())


def test_the_cancelling_fold_is_2_to_3_percent_off_while_the_unfolded_graph_is_not() -> None:
    proto = _cancelling()
    assert _relative_to_float32(proto, proto) <= 3e-4
    assert 0.018 <= _relative_to_float32(proto, _hand_folded(proto)) <= 0.032


def test_verification_fails_the_cancelling_fold() -> None:
    proto = _cancelling()
    report = normfold.verify(proto, _hand_folded(proto))
    assert not report.passed and report.reference == "float32"
    assert "reference's own error" in report.outputs["z"].problem
    assert normfold.verify(proto, proto).passed


def test_verification_fails_the_overflowing_fold() -> None:
    proto = _overflowing()
    x = np.full((1, 3, 6, 6), 0.02, np.float16)
    assert 5e4 <= float(np.abs(runtime.run(proto, {"x": x})["z"]).max()) <= 65504
    report = normfold.verify(proto, _hand_folded(proto), inputs={"x": x})
    assert not report.passed and report.outputs["z"].inf_mismatch + report.outputs["z"].nan_mismatch > 0


@pytest.mark.parametrize(
    ("proto", "reason"),
    [(_cancelling(), "away from the unfolded site"), (_overflowing(), "beyond float16's largest value 65504")],
    ids=["cancelling", "overflowing"],
)
def test_fold_bn_refuses_the_site(proto: onnx.ModelProto, reason: str) -> None:
    result = normfold.optimize(proto, passes=["fold-bn"], verify=False)
    assert [node.op_type for node in result.model.graph] == ["Conv", "BatchNormalization"]
    (refusal,) = next(p for p in result.report["passes"] if p["name"] == "fold-bn")["refused"]
    assert refusal["node"] == "bn" and reason in refusal["reason"]
    assert normfold.verify(proto, result.model).passed


def test_an_ordinary_fp16_fold_still_folds_and_verifies() -> None:
    rng = np.random.default_rng(3)
    proto = _conv_bn(
        rng.normal(size=(8, 3, 3, 3)) * 0.3, rng.normal(size=8), rng.uniform(0.5, 2, 8),
        rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 2, 8),
    )
    result = normfold.optimize(proto, passes=["fold-bn"])
    assert [node.op_type for node in result.model.graph] == ["Conv"] and result.verified


def test_consumer_fold_that_would_overflow_is_refused() -> None:
    """``Conv(BN(x))``, unpadded: the BN's scale 1e3 on weights of 100 would be inf."""
    elem = F16
    arrays = {
        "gamma": np.full(3, 10.0), "beta": np.zeros(3), "mean": np.zeros(3), "var": np.full(3, 1e-4),
        "w": np.full((2, 3, 1, 1), 100.0),
    }
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["n"], epsilon=0.0, name="bn"),
            helper.make_node("Conv", ["n", "w"], ["y"], name="conv"),
        ],
        "bn_conv",
        [helper.make_tensor_value_info("x", elem, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", elem, [1, 2, 4, 4])],
        [numpy_helper.from_array(a.astype(np.float16), n) for n, a in arrays.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    result = normfold.optimize(proto, passes=["fold-bn"], verify=False)
    (refusal,) = next(p for p in result.report["passes"] if p["name"] == "fold-bn")["refused"]
    assert "65504" in refusal["reason"]


def test_fold_affine_that_would_overflow_is_refused() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
            helper.make_node("Mul", ["y", "k"], ["z"], name="mul"),
        ],
        "conv_mul",
        [helper.make_tensor_value_info("x", F16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("z", F16, [1, 2, 4, 4])],
        [
            numpy_helper.from_array(np.full((2, 2, 1, 1), 300.0, np.float16), "w"),
            numpy_helper.from_array(np.full((2, 1, 1), 400.0, np.float16), "k"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    result = normfold.optimize(proto, passes=["fold-affine"], verify=False)
    assert [node.op_type for node in result.model.graph] == ["Conv", "Mul"]
    (refusal,) = next(p for p in result.report["passes"] if p["name"] == "fold-affine")["refused"]
    assert "65504" in refusal["reason"]


def test_cast_problem_names_overflow_and_underflow_and_passes_the_rest() -> None:
    assert "65504" in fp.cast_problem(np.array([1.0, 7e4]), np.float16, "weight")
    assert "round to 0" in fp.cast_problem(np.array([1.0, 1e-9]), np.float16, "weight")
    assert fp.cast_problem(np.array([0.0, 1e-7, 6e4]), np.float16, "weight") is None  # a subnormal is no 0
    assert fp.cast_problem(np.array([1e30]), np.float32, "weight") is None


def test_precision_rule_allows_rounding_and_refuses_more() -> None:
    reference = np.linspace(-1, 1, 101)
    dtype = np.float16
    assert fp.precision_problem(reference, low_precision.rounded(reference, dtype), dtype) is None
    off = reference + 1.5 * low_precision.floor(dtype)
    assert "away from the unfolded site" in fp.precision_problem(reference, off, dtype)
    # float32 folds: a tenth of verification's rtol.
    assert fp.precision_problem(reference, reference * (1 + 1e-7), np.float32) is None
    assert "float32" in fp.precision_problem(reference, reference + 1e-4, np.float32)


def test_output_rows_lay_out_each_output_channel() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 2, 2))  # ConvTranspose, group 2: C_in 4, C_out 6
    rows = fp.output_rows("ConvTranspose", w, group=2)
    assert rows.shape == (6, 2 * 4)
    np.testing.assert_array_equal(rows[4], w[2:4, 1].reshape(-1))  # group 1, column 1 = channel 4
    b = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(fp.output_rows("Gemm", b, trans_b=True), b)
    np.testing.assert_array_equal(fp.output_rows("MatMul", b), b.T)


def test_fold_branches_refuses_a_merged_kernel_that_overflows() -> None:
    """RepVGG's 3×3 + 1×1 branches, each within float16, whose merged centre tap (8e4) is not."""
    w3 = np.zeros((2, 2, 3, 3))
    w3[:, :, 1, 1] = 4e4
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1], name="conv3"),
            helper.make_node("Conv", ["x", "w1"], ["b"], name="conv1"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        "repvgg",
        [helper.make_tensor_value_info("x", F16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", F16, [1, 2, 4, 4])],
        [
            numpy_helper.from_array(w3.astype(np.float16), "w3"),
            numpy_helper.from_array(np.full((2, 2, 1, 1), 4e4, np.float16), "w1"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    result = normfold.optimize(proto, passes=["fold-branches"], verify=False)
    assert sorted(node.op_type for node in result.model.graph) == ["Add", "Conv", "Conv"]
    refused = next(p for p in result.report["passes"] if p["name"] == "fold-branches")["refused"]
    assert any("65504" in r["reason"] for r in refused)


def test_fuse_norm_keeps_a_multiplier_whose_absorbed_scale_would_overflow() -> None:
    """LayerNorm(x)·γ then ·k in float16 with γ·k = 1e5: absorbing k would make the scale inf."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "k"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", F16, [2, 4])],
        [helper.make_tensor_value_info("y", F16, [2, 4])],
        [
            numpy_helper.from_array(np.array(1e-5, np.float16), "eps"),
            numpy_helper.from_array(np.full(4, 400.0, np.float16), "gamma"),
            numpy_helper.from_array(np.full(4, 250.0, np.float16), "k"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = normfold.optimize(proto, passes=["fuse-norm"], verify=False)
    ops = [node.op_type for node in result.model.graph]
    assert "LayerNormalization" in ops and ops[-1] == "Mul"
    refused = next(p for p in result.report["passes"] if p["name"] == "fuse-norm")["refused"]
    assert any("65504" in r["reason"] for r in refused)


def test_torch_fold_refuses_what_float16_cannot_hold() -> None:
    """normfold.torch.fold_batchnorm applies the same rule: the overflowing float16 site stays."""
    torch = pytest.importorskip("torch")
    from normfold.torch.fold import fold_batchnorm_with_report

    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.fill_(100.0)
        bn.weight.fill_(10.0)
        bn.running_var.fill_(1e-4)
    module = torch.nn.Sequential(conv, bn).eval().half()
    folded, report = fold_batchnorm_with_report(module)
    assert not report.folded and "65504" in report.refused[0].reason


@pytest.mark.parametrize("channels", [4, 512])
def test_probe_products_agree_with_exact_sums_through_both_routes(channels: int) -> None:
    # Small products run in einsum's loop, large ones (8 x 512 x 4608) in single-threaded BLAS:
    # both must give the float64 product (summation order aside).
    rng = np.random.default_rng(1)
    x, rows = rng.standard_normal((8, 4608)), rng.standard_normal((channels, 4608))
    exact = np.array([[float(np.sum(xi * r, dtype=np.longdouble)) for r in rows] for xi in x])
    np.testing.assert_allclose(fp._probe_product(x, rows), exact, rtol=0, atol=1e-10)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=-1e-7, max_value=1e-7),
            st.floats(min_value=6e4, max_value=7e4),
            st.just(0.0),
        ),
        min_size=1,
        max_size=20,
    ),
    dtype=st.sampled_from([np.float16, np.float32]),
)
def test_cast_problem_says_none_exactly_when_no_value_overflows_or_flushes(values: list[float], dtype: type) -> None:
    # The one-cast fast path and the elementwise path must agree with the rule itself.
    folded = np.array(values, np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cast = folded.astype(dtype).astype(np.float64)
    lost = (np.isfinite(folded) & ~np.isfinite(cast)) | ((folded != 0) & (cast == 0))
    assert (fp.cast_problem(folded, dtype, "weight") is None) == (not lost.any())
