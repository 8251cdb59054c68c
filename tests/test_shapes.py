"""passes._shapes.infer_shapes: onnx's inference completed by onnxruntime's, interface kept."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

pytest.importorskip("torch")

from normfold import io  # noqa: E402
from normfold.models.export import cached_export  # noqa: E402
from normfold.opset import raise_opset  # noqa: E402
from normfold.passes._shapes import _inferred_types, infer_shapes, shape_after_conversion  # noqa: E402
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


def _shapes(model: ir.Model) -> dict[str, tuple]:
    return {v.name: (v.shape, v.dtype) for node in model.graph.all_nodes() for v in node.outputs}


@pytest.mark.parametrize(("name", "variant"), [("llama", "ts13"), ("bert", "ts13"), ("llama", "dynamo18")])
def test_shapes_after_a_raise_are_what_inference_gives(name: str, variant: str) -> None:
    # Both converters (onnx's below 18, onnxscript's from 18) keep every value's shape: shaping
    # only the Constants they add must leave what a full inference after the raise leaves.
    model = io.load(cached_export(name, variant))
    CleanupPass()(model)
    infer_shapes(model)
    raise_opset(model, 23)
    inferred = model.clone()
    infer_shapes(inferred)
    shape_after_conversion(model)
    assert not _unknown(model)
    assert _shapes(model) == _shapes(inferred)


def test_shape_after_conversion_infers_when_something_is_unknown() -> None:
    model = io.load(cached_export("llama", "ts13"))
    CleanupPass()(model)
    # Nothing inferred yet: the Constants alone cannot shape the attention blocks.
    assert _unknown(model)
    shape_after_conversion(model)
    assert not _unknown(model)


@pytest.mark.parametrize(("name", "variant"), [("llama", "ts13"), ("bert", "dynamo18")])
def test_inferred_types_read_from_value_info_match_the_deserialized_proto(name: str, variant: str) -> None:
    model = io.load(cached_export(name, variant))
    proto = onnx.shape_inference.infer_shapes(io.weightless_proto(model), data_prop=True)
    (fast,) = _inferred_types(model, proto)
    graph = ir.serde.deserialize_model(proto).graph
    slow = {n: (v.shape, v.dtype) for n, v in ir.convenience.create_value_mapping(graph).items() if v.shape is not None}
    assert {n: t for n, t in fast.items() if t[0] is not None} == slow
