"""passes._shapes.infer_shapes: onnx's inference completed by onnxruntime's, interface kept."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

pytest.importorskip("torch")

from normfold import io  # noqa: E402
from normfold.models.export import cached_export  # noqa: E402
from normfold.passes._shapes import infer_shapes  # noqa: E402
from normfold.passes.cleanup import CleanupPass  # noqa: E402


def _unknown(model: ir.Model) -> list[str]:
    return [v.name for node in model.graph for v in node.outputs if v.shape is None]


def _interface(model: ir.Model) -> list:
    return [(v.name, v.shape) for v in (*model.graph.inputs, *model.graph.outputs)]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_opset_13_attention_blocks_get_shapes(name: str) -> None:
    model = io.load(cached_export(name, "ts13"))
    CleanupPass()(model)
    onnx_only = model.clone()
    common.ShapeInferencePass(check_type=False, strict_mode=False)(onnx_only)
    # onnx alone cannot see through a Reshape to a computed shape at opset 13.
    assert _unknown(onnx_only)
    interface = _interface(model)
    infer_shapes(model)
    assert not _unknown(model)
    assert _interface(model) == interface


def test_residual_operands_get_one_symbolic_shape() -> None:
    model = io.load(cached_export("bert", "ts13"))
    CleanupPass()(model)
    infer_shapes(model)
    adds = [n for n in model.graph if n.op_type == "Add" and "attention_output" in (n.name or "")]
    residual = [n for n in adds if all(v.producer() is not None for v in n.inputs)]
    assert residual
    for node in residual:
        a, b = (v.shape for v in node.inputs)
        assert a == b, node.name
