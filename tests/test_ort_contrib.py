"""onnxruntime's ONNX-domain contrib ops: loaded, checked, emitted for target onnxruntime.

onnxruntime runs ``SimplifiedLayerNormalization`` (every opset) and ``LayerNormalization`` below
opset 17 from the default domain; onnx.checker knows neither. normfold must accept such graphs
(onnxruntime's transformers optimizer writes them), still refuse truly unknown ops, and emit
them itself for target onnxruntime so that the model keeps its opset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normfold import io, ort_contrib, runtime
from normfold.errors import InputError
from tests.conftest import Cli


def _norm_model(op_type: str, opset: int, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    node = helper.make_node(op_type, ["x", "w"], ["y"], axis=-1, epsilon=1e-12)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", dtype, ["batch", 8])],
        [helper.make_tensor_value_info("y", dtype, ["batch", 8])],
        [onnx.numpy_helper.from_array(np.linspace(-1.5, 2.0, 8).astype(np_dtype), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _reference(op_type: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    if op_type == "LayerNormalization":
        x64 = x64 - x64.mean(-1, keepdims=True)
    return x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-12) * w.astype(np.float64)


@pytest.mark.parametrize(
    "op_type,opset",
    [("SimplifiedLayerNormalization", 13), ("SimplifiedLayerNormalization", 23), ("LayerNormalization", 13)],
)
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_loaded_checked_and_run(op_type: str, opset: int, dtype: int, tmp_path: Path) -> None:
    proto = _norm_model(op_type, opset, dtype)
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(proto)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for source in (path, proto):
        model = io.load(source)
        io.check(model, "m", full_check=True)
        # The check moved nothing for good.
        assert [(n.domain, n.op_type) for n in model.graph] == [("", op_type)]
        assert set(model.opset_imports) == {""}
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(helper.tensor_dtype_to_np_dtype(dtype))
    x[0] = 0.0  # a zero row: eps 1e-12 keeps it finite
    got = runtime.run(io.load(path), {"x": x})["y"]
    want = _reference(op_type, x, onnx.numpy_helper.to_array(proto.graph.initializer[0]))
    tolerance = 1e-5 if dtype == TensorProto.FLOAT else 3e-3
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tolerance, atol=tolerance)


def test_layer_normalization_from_17_is_onnx_own() -> None:
    model = ir.from_proto(_norm_model("LayerNormalization", 17))
    assert not ort_contrib.is_onnx_domain_contrib(next(iter(model.graph)), 17)
    with ort_contrib.checkable(model) as opaque:
        assert not opaque


@pytest.mark.parametrize("op_type", ["NoSuchNormalization", "SkipLayerNormalization"])
def test_unknown_default_domain_ops_still_refused(op_type: str, tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_norm_model(op_type, 17), path)
    with pytest.raises(InputError, match="fails onnx.checker: No Op registered for " + op_type):
        io.load(path)
    result = cli("inspect", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and op_type in result.stderr


def test_the_check_still_checks_the_rest() -> None:
    proto = _norm_model("SimplifiedLayerNormalization", 17)
    proto.graph.node.append(helper.make_node("Relu", ["undefined"], ["z"]))
    with pytest.raises(InputError, match="undefined"):
        io.load(proto)


def test_verify_accepts_onnxruntime_transformers_output(tmp_path: Path, cli: Cli) -> None:
    """A graph someone else fused with onnxruntime's own optimizer can be checked against its source."""
    pytest.importorskip("torch")
    from onnxruntime.transformers.optimizer import optimize_model

    from normfold.models.export import cached_export

    source = cached_export("llama", "ts13")
    fused = tmp_path / "fused.onnx"
    optimize_model(str(source), model_type="gpt2", opt_level=1, use_gpu=False).save_model_to_file(str(fused))
    ops = {(n.domain, n.op_type) for n in onnx.load(fused).graph.node}
    assert ("", "SimplifiedLayerNormalization") in ops or ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    result = cli("verify", str(source), str(fused), "--quiet")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "name,fused_op,count",
    [("bert", "LayerNormalization", 5), ("llama", "SimplifiedLayerNormalization", 5)],
)
def test_target_onnxruntime_fuses_at_the_models_opset(name: str, fused_op: str, count: int, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from normfold.models import build
    from normfold.models.export import cached_export
    from normfold.jobs.optimize import optimize

    source = cached_export(name, "ts13")
    expected = sum(type(m).__name__.endswith(("LayerNorm", "RMSNorm")) for m in build(name).module.modules())
    assert expected == count
    for max_opset in (None, 13):
        result = optimize(source, target="onnxruntime", max_opset=max_opset, passes=["fuse-norm"])
        assert result.verified, result.verification
        ops = [(n.domain, n.op_type) for n in result.model.graph]
        assert ops.count(("", fused_op)) == count, result.report
        assert result.model.opset_imports[""] == 13
        saved = io.load(result.save(tmp_path / f"{name}-{max_opset}.onnx"))
        assert saved.opset_imports[""] == 13
    # Target onnx raises the opset for the standard op, and refuses the sites when it may not.
    portable = optimize(source, target="onnx", max_opset=13, passes=["fuse-norm"])
    assert not any(n.op_type == fused_op for n in portable.model.graph)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_group_normalization_21_respelled_for_onnxruntime(dtype: int) -> None:
    from normfold.passes import PassOptions
    from normfold.passes.fuse_norm import FuseNormPass

    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(1)
    channels = 6
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3, epsilon=1e-5, name="gn")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", dtype, ["batch", channels, 5, 4])],
        [helper.make_tensor_value_info("y", dtype, ["batch", channels, 5, 4])],
        [
            onnx.numpy_helper.from_array(rng.uniform(-2, 2, channels).astype(np_dtype), "s"),
            onnx.numpy_helper.from_array(rng.uniform(-1, 1, channels).astype(np_dtype), "b"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = ir.from_proto(proto)
    fuse = FuseNormPass(PassOptions(target="onnxruntime"))
    fuse(model)
    io.check(model, "fused", full_check=True)
    ops = [n.op_type for n in model.graph]
    if dtype == TensorProto.FLOAT16:
        assert ops == ["GroupNormalization"]
        assert "stash_type" in fuse.record.refused[0]["reason"]
        return
    assert "GroupNormalization" not in ops and ops.count("InstanceNormalization") == 1
    x = rng.standard_normal((2, channels, 5, 4)).astype(np_dtype)
    want, got = runtime.run(proto, {"x": x})["y"], runtime.run(model, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
