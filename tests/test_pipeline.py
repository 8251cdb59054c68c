"""The optimize pipeline through the Python API, and the clean-up pass it always runs first."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold import runtime
from normfold.errors import InputError, VerificationError
from normfold.passes import REGISTRY, NormfoldPass
from normfold.passes.cleanup import CleanupPass
from tests.conftest import conv_bn_relu_model, run_cli


def _layer_norm_model(eps: float) -> onnx.ModelProto:
    """HF-BERT's decomposed LayerNorm over the last axis, eps as a Constant node."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var"], axes=[-1]),
        helper.make_node("Constant", [], ["eps"], value=numpy_helper.from_array(np.array(eps, np.float32))),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _zero_rows() -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    x[1] = 0.0  # a padding row: only eps keeps it finite
    return {"x": x}


def test_cleanup_keeps_a_1e12_epsilon() -> None:
    model = ir.serde.deserialize_model(_layer_norm_model(1e-12))
    CleanupPass()(model)
    y = runtime.run(ir.to_proto(model), _zero_rows())["y"]
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1], 0.0)
    constants = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert any(c.shape == () and c == np.float32(1e-12) for c in constants)


def test_onnxscript_default_rules_do_delete_it() -> None:
    """The trap normfold avoids (TRAPS.md): if onnxscript fixes this, the test tells us."""
    import onnxscript

    model = ir.serde.deserialize_model(_layer_norm_model(1e-12))
    onnxscript.optimizer.optimize(model)
    y = runtime.run(ir.to_proto(model), _zero_rows())["y"]
    assert np.isnan(y[1]).all()


def _identity_dropout_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b"], name="dropout"),
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Identity", ["x"], ["x_copy"]),
    ]
    graph = helper.make_graph(
        nodes, "id",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_cleanup_removes_identity_and_eval_dropout_but_keeps_the_interface() -> None:
    model = ir.serde.deserialize_model(_identity_dropout_model())
    CleanupPass()(model)
    ops = [node.op_type for node in model.graph]
    assert "Dropout" not in ops and ops.count("Identity") == 1  # input -> output Identity stays
    assert [o.name for o in model.graph.outputs] == ["y", "x_copy"]
    x = {"x": np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)}
    expected = runtime.run(_identity_dropout_model(), x)
    for name, value in runtime.run(ir.to_proto(model), x).items():
        np.testing.assert_array_equal(value, expected[name])


def test_cleanup_never_folds_initializers_that_are_graph_inputs() -> None:
    proto = conv_bn_relu_model()
    # An old exporter's graph: the BN mean is both an initializer and an input the user may feed.
    proto.graph.input.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [4]))
    proto.graph.node.insert(0, helper.make_node("Neg", ["mean"], ["neg_mean"]))
    proto.graph.node.insert(1, helper.make_node("Neg", ["neg_mean"], ["mean2"]))
    proto.graph.node[3].input[3] = "mean2"
    model = ir.serde.deserialize_model(proto)
    CleanupPass()(model)
    assert "mean" in [i.name for i in model.graph.inputs]
    assert [n.op_type for n in model.graph][:2] == ["Neg", "Neg"]


def test_optimize_accepts_path_proto_and_ir_model_and_leaves_them_alone(conv_bn_path: Path) -> None:
    digest = conv_bn_path.read_bytes()
    proto = onnx.load(conv_bn_path)
    user_model = ir.serde.deserialize_model(onnx.load(conv_bn_path))
    for source in (conv_bn_path, proto, user_model):
        result = normfold.optimize(source)
        assert result.verified
        assert result.report["nodes_after"] <= result.report["nodes_before"]
    assert conv_bn_path.read_bytes() == digest
    assert [n.op_type for n in user_model.graph] == ["Conv", "BatchNormalization", "Relu"]
    assert proto == onnx.load(conv_bn_path)


def test_result_save_and_report(tmp_path: Path, conv_bn_path: Path) -> None:
    result = normfold.optimize(conv_bn_path, passes=[])
    out = result.save(tmp_path / "out.onnx")
    assert result.report["output"] == str(out)
    assert [p["name"] for p in result.report["passes"]] == ["cleanup"]
    with pytest.raises(InputError, match="refusing to overwrite"):
        result.save(conv_bn_path)


class _BreakRelu(NormfoldPass):
    """A deliberately wrong pass: Relu becomes Abs. Verification must catch it."""

    name = "break-relu"
    summary = "test only"

    def apply(self, model: ir.Model) -> bool:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Abs"
                self.record.site(node.name)
        return True


def test_a_wrong_pass_fails_verification_and_nothing_is_saved(tmp_path: Path, conv_bn_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "break-relu", _BreakRelu)
    result = normfold.optimize(conv_bn_path, passes=["break-relu"])
    assert not result.verified
    assert result.report["verification"]["passed"] is False
    with pytest.raises(VerificationError):
        result.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_exit_1_when_verification_fails(tmp_path: Path, conv_bn_path: Path) -> None:
    out = tmp_path / "out.onnx"
    script = (
        "import sys; from normfold.passes import REGISTRY; from tests.test_pipeline import _BreakRelu; "
        "from normfold.catalog import BY_NAME, PassInfo; "
        "REGISTRY['break-relu'] = _BreakRelu; BY_NAME['break-relu'] = PassInfo('break-relu', 'test only'); "
        "from normfold.cli import main; "
        f"sys.exit(main(['optimize', {str(conv_bn_path)!r}, '-o', {str(out)!r}, '--passes', 'break-relu', "
        f"'--report', {str(tmp_path / 'r.json')!r}]))"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 1, result.stderr
    assert "FAILED" in result.stdout and "not written" in result.stderr
    assert not out.exists()


class _GcProbe(NormfoldPass):
    """Records, while it runs, whether Python's cyclic garbage collector is on."""

    name = "gc-probe"
    summary = "test only"
    seen: list[bool] = []

    def apply(self, model: ir.Model) -> bool:
        _GcProbe.seen.append(gc.isenabled())
        return False


def test_optimize_holds_the_cyclic_gc_off_and_gives_it_back(conv_bn_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "gc-probe", _GcProbe)
    monkeypatch.setattr(_GcProbe, "seen", [])
    assert gc.isenabled()
    normfold.optimize(conv_bn_path, passes=["gc-probe"], verify=False)
    assert _GcProbe.seen == [False] and gc.isenabled()
    with pytest.raises(InputError):
        normfold.optimize(conv_bn_path, passes=["gc-probe"], verify=False, max_opset=5)
    assert gc.isenabled()
    gc.disable()
    try:
        normfold.optimize(conv_bn_path, passes=["gc-probe"], verify=False)
        assert not gc.isenabled()  # a caller's choice stands
    finally:
        gc.enable()
    assert _GcProbe.seen == [False, False]


def test_max_opset_below_the_model_is_an_input_error(conv_bn_path: Path) -> None:
    with pytest.raises(InputError, match="above --max-opset 13"):
        normfold.optimize(conv_bn_path, max_opset=13)


def test_inspect_reports_without_writing(conv_bn_path: Path) -> None:
    report = normfold.inspect(conv_bn_path)
    assert report["model"] == str(conv_bn_path)
    assert "verification" not in report
    assert sorted(p.name for p in conv_bn_path.parent.iterdir()) == ["conv_bn.onnx"]


def test_cli_python_m_matches_console_script(conv_bn_path: Path) -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("normfold ")


def test_inspect_lists_collapse_candidates_and_refusals(conv_bn_path: Path) -> None:
    collapse = normfold.inspect(conv_bn_path)["collapse"]
    assert collapse["sites"] == []
    assert collapse["refused"] == [
        {"node": "relu", "reason": "it is a model output: there is no layer after it to merge"}
    ]


def test_inspect_skips_collapse_without_rectifiers(tmp_path: Path) -> None:
    path = tmp_path / "ln.onnx"
    onnx.save(_layer_norm_model(1e-5), path)
    collapse = normfold.inspect(path)["collapse"]
    assert collapse["sites"] == [] and "nothing to collapse" in collapse["notes"][0]


def test_skip_ops_needs_the_onnxruntime_target(conv_bn_path: Path) -> None:
    with pytest.raises(InputError, match="--target onnxruntime"):
        normfold.optimize(conv_bn_path, skip_ops=True)


def test_skip_ops_emits_skip_normalization_for_onnxruntime() -> None:
    pytest.importorskip("torch")
    from normfold.models.export import cached_export

    source = cached_export("llama", "dynamo18-noopt")
    plain = normfold.optimize(source, target="onnxruntime")
    skipped = normfold.optimize(source, target="onnxruntime", skip_ops=True)
    assert plain.verified and skipped.verified
    assert "com.microsoft::SkipSimplifiedLayerNormalization" not in plain.report["ops_after"]
    assert skipped.report["ops_after"].get("com.microsoft::SkipSimplifiedLayerNormalization", 0) >= 1
