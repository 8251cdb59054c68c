"""The ONNX collapse pass and ``normfold collapse``, measured in onnxruntime (optimizations off)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from normfold.passes import DEFAULT_PASSES, REGISTRY, PassOptions
from normfold.passes.base import PassRecord, apply_rules
from normfold.passes._collapse_merge import ConvShortcut, MergeConvConv, MergeGemmGemm
from normfold.passes._fold_graph import FreshNames
from normfold.passes.cleanup import CleanupPass
from normfold.passes.collapse import CollapsePass
from onnx import TensorProto, helper, numpy_helper

from normfold import io, runtime
from normfold.jobs.collapse import collapse_onnx
from tests.conftest import Cli


def _bn(name: str, source: str, beta: np.ndarray, gamma: np.ndarray, rng) -> tuple[onnx.NodeProto, list]:
    channels = beta.size
    tensors = [
        numpy_helper.from_array(gamma.astype(np.float32), f"{name}_gamma"),
        numpy_helper.from_array(beta.astype(np.float32), f"{name}_beta"),
        numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"{name}_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), f"{name}_var"),
    ]
    node = helper.make_node(
        "BatchNormalization", [source] + [t.name for t in tensors], [f"{name}_out"], name=name, epsilon=1e-5
    )
    return node, tensors


def _tlc_model(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu(nearly linear)-Conv-BN-Relu(nonlinear)-GAP-Gemm-BN-Relu(nearly linear)-Gemm."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "wa"),
        numpy_helper.from_array(rng.normal(size=(4, 8, 3, 3)).astype(np.float32) * 0.3, "wb"),
        numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "g1"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "c1"),
        numpy_helper.from_array(rng.normal(size=(3, 3)).astype(np.float32), "g2"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "c2"),
    ]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1])]
    # Far from zero relative to |γ|: every channel stays on one side (E ≈ 0), on or off.
    signs = np.where(np.arange(8) % 4 == 3, -1.0, 1.0)
    bn, tensors = _bn("bn_a", "a", 6.0 * signs, np.full(8, 0.5), rng)
    nodes += [bn, helper.make_node("Relu", ["bn_a_out"], ["ra"], name="relu_a")]
    weights += tensors
    # Unpadded, so merging it needs no pad-first (which would change the border).
    nodes.append(helper.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b"))
    bn, tensors = _bn("bn_b", "b", np.zeros(4), np.ones(4), rng)  # centred: E = 0.5
    nodes += [bn, helper.make_node("Relu", ["bn_b_out"], ["rb"], name="relu_b")]
    weights += tensors
    nodes += [
        helper.make_node("GlobalAveragePool", ["rb"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "g1", "c1"], ["h"], name="gemm_1", transB=1),
    ]
    bn, tensors = _bn("bn_c", "h", np.full(3, 8.0), np.full(3, 0.5), rng)
    nodes += [bn, helper.make_node("Relu", ["bn_c_out"], ["rc"], name="relu_c")]
    weights += tensors
    nodes.append(helper.make_node("Gemm", ["rc", "g2", "c2"], ["y"], name="gemm_2", transB=1))
    graph = helper.make_graph(
        nodes, "tlc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _measured(reference, candidate, feeds) -> float:
    worst = 0.0
    for feed in feeds:
        want, got = runtime.run(reference, feed)["y"], runtime.run(candidate, feed)["y"]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def _collapsed(**settings) -> tuple[ir.Model, CollapsePass]:
    model = io.load(_tlc_model())
    CleanupPass()(model)
    collapse = CollapsePass(PassOptions(), **settings)
    collapse(model)
    onnx.checker.check_model(ir.to_proto(model))
    return model, collapse


def test_the_pass_is_registered_but_never_a_default():
    assert REGISTRY["collapse"] is CollapsePass and not CollapsePass.exact
    assert "collapse" not in DEFAULT_PASSES


def test_max_deviation_keeps_the_near_linear_sites_and_measures_them():
    feeds = _feeds()
    model, collapse = _collapsed(max_deviation=0.01, calibration=feeds)
    linearized = {s["node"] for s in collapse.record.sites if s.get("how") == "linearized"}
    assert linearized == {"relu_a", "relu_c"}
    refused = {r["node"]: r["reason"] for r in collapse.record.refused}
    assert "output deviation would be" in refused["relu_b"]
    assert _ops(model).count("Conv") == 1 and _ops(model).count("Gemm") == 1
    assert "Relu" in _ops(model)  # relu_b stays
    # The reported deviation is what onnxruntime measures between input and result.
    measured = _measured(_tlc_model(), model, feeds)
    assert collapse.deviation["max_rel_deviation"] == pytest.approx(measured, rel=1e-6)
    assert 0 < measured <= 0.01
    by_op = collapse.record.by_op
    assert by_op["Conv∘Conv"] == 1 and by_op["Gemm∘Gemm"] == 1 and by_op["Relu"] == 2


def test_remove_n_takes_the_lowest_scores_and_may_cost_accuracy():
    feeds = _feeds()
    model, collapse = _collapsed(remove=3, calibration=feeds)
    scores = [s["score"] for s in collapse.record.sites if s.get("how") == "linearized"]
    assert len(scores) == 3 and scores == sorted(scores)
    assert _ops(model) == ["Conv", "GlobalAveragePool", "Flatten"]
    assert collapse.deviation["max_rel_deviation"] == pytest.approx(_measured(_tlc_model(), model, feeds), rel=1e-6)
    assert collapse.deviation["max_rel_deviation"] > 0.01  # relu_b was far from linear


def test_a_relu_after_an_add_needs_calibration_data():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Add", ["c", "x"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
        ],
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [w, w2],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = io.load(proto)
    blind = CollapsePass(PassOptions(), remove=1)
    blind(model.clone())
    assert "no BatchNormalization feeds it" in blind.record.refused[0]["reason"]
    informed = CollapsePass(PassOptions(), remove=1, calibration=_feeds_like((2, 3, 4, 4)))
    result = model.clone()
    informed(result)
    (site,) = [s for s in informed.record.sites if s.get("how") == "linearized"]
    assert site["mode"] == "empirical"
    assert _ops(result).count("Conv") == 1  # shortcut folded, then merged with conv2


def _feeds_like(shape) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": (rng.normal(size=shape) + 1.0).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("form", ["conv-conv", "shortcut", "projection", "gemm"])
def test_each_onnx_merge_rule_is_exact(form):
    rng = np.random.default_rng(3)
    tensors = {
        "w1": rng.normal(size=(4, 2, 3, 3)), "b1": rng.normal(size=4),
        "w2": rng.normal(size=(4, 4, 3, 3)), "b2": rng.normal(size=4),
        "wp": rng.normal(size=(4, 4, 1, 1)), "g1": rng.normal(size=(5, 6)), "g2": rng.normal(size=(6, 3)),
        "c1": rng.normal(size=6), "c2": rng.normal(size=3),
    }
    shape = ["batch", 4, 9, 9]
    if form == "conv-conv":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1],
                                  group=2),
                 helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="c2", dilations=[2, 2])]
        shape, rule = ["batch", 4, 11, 11], MergeConvConv
    elif form == "shortcut":
        nodes = [helper.make_node("Conv", ["x", "w2", "b2"], ["h"], name="c", pads=[1, 1, 1, 1]),
                 helper.make_node("Add", ["x", "h"], ["y"], name="add")]
        rule = ConvShortcut
    elif form == "projection":
        nodes = [helper.make_node("Conv", ["x", "w2", "b2"], ["h"], name="c", pads=[1, 1, 1, 1], strides=[2, 2]),
                 helper.make_node("Conv", ["x", "wp"], ["p"], name="p", strides=[2, 2]),
                 helper.make_node("Add", ["h", "p"], ["y"], name="add")]
        rule = ConvShortcut
    else:
        nodes = [helper.make_node("Gemm", ["x", "g1", "c1"], ["h"], name="g1"),
                 helper.make_node("Gemm", ["h", "g2", "c2"], ["y"], name="g2", alpha=0.5, beta=2.0)]
        shape, rule = ["batch", 5], MergeGemmGemm
    if form == "conv-conv":
        tensors["w1"] = tensors["w1"][:, :1]  # 2 groups over 2 input channels
        shape = ["batch", 2, 11, 11]
    out_shape = ["batch", 3] if form == "gemm" else ["batch", 4, "h", "w"]
    graph = helper.make_graph(
        nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = io.load(proto)
    record = PassRecord("collapse")
    forms = {"shortcut": "conv-second", "projection": "projection"}
    args = (record, PassOptions(), FreshNames(model), 100.0)
    rules = [rule(*args, form=forms[form])] if rule is ConvShortcut else [rule(*args)]
    assert apply_rules(model, rules) == 1, record.refused
    layers = [n.op_type for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 1
    feed = {"x": np.random.default_rng(4).normal(size=[2] + shape[1:]).astype(np.float32)}
    np.testing.assert_allclose(runtime.run(model, feed)["y"], runtime.run(proto, feed)["y"], rtol=1e-4, atol=1e-4)


def test_cli_collapses_writes_and_reports(tmp_path: Path, cli: Cli):
    source = tmp_path / "in.onnx"
    onnx.save(_tlc_model(), source)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **_feeds(1)[0])
    done = cli("collapse", str(source), "-o", str(tmp_path / "out.onnx"), "--max-deviation", "0.01",
                   "--calibration", str(calibration), "--report", str(tmp_path / "r.json"), "-q")
    assert done.returncode == 0, done.stderr
    assert "deviation of y" in done.stdout and "approximate" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["collapse"]["removed"] == 2
    assert [p["name"] for p in report["passes"]][:2] == ["cleanup", "collapse"]
    measured = _measured(source, tmp_path / "out.onnx", _feeds(1))
    assert report["verification"]["max_rel_error"] == pytest.approx(measured, rel=1e-5, abs=1e-7)
    assert report["nodes_after"] < report["nodes_before"]


def test_cli_usage_errors_exit_2(tmp_path: Path, cli: Cli):
    source = tmp_path / "in.onnx"
    onnx.save(_tlc_model(), source)
    both = cli("collapse", str(source), "-o", str(tmp_path / "o.onnx"), "--remove", "1", "--max-deviation", "1")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    missing = cli("collapse", "-o", str(tmp_path / "o.onnx"))
    assert missing.returncode == 2 and "give an input model" in missing.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_remove_and_max_deviation_exclude_each_other():
    from normfold.errors import InputError

    with pytest.raises(InputError, match="either remove or max_deviation"):
        collapse_onnx(_tlc_model(), remove=3, max_deviation=0.01)
