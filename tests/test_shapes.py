"""passes._shapes.infer_shapes: onnx's inference completed by onnxruntime's, interface kept."""

from __future__ import annotations

import logging
from collections import Counter

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

pytest.importorskip("torch")

from normfold import io  # noqa: E402
from normfold.models.export import cached_export  # noqa: E402
from normfold.models import build  # noqa: E402
from normfold.opset import raise_opset  # noqa: E402
from normfold.passes import PassOptions  # noqa: E402
from normfold.passes._shapes import INVENTED_DIM, _inferred_types, infer_shapes, shape_after_conversion  # noqa: E402
from normfold.passes import _norm_checks as checks  # noqa: E402
from normfold.passes.cleanup import CleanupPass  # noqa: E402
from normfold.passes.fuse_norm import FuseNormPass  # noqa: E402


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
    shapes = [shape for shape, _ in fast.values() if shape is not None]
    assert len({id(shape) for shape in shapes}) == len(shapes), "values must not share a Shape object"


# What passes._shapes logs (DEBUG) each time it runs onnxruntime's symbolic inference.
_SYMBOLIC = "onnxruntime symbolic shape inference: "


def _cleaned(name: str, variant: str) -> ir.Model:
    model = io.load(cached_export(name, variant))
    CleanupPass()(model)
    return model


def _modules(name: str, suffix: str) -> int:
    return sum(type(module).__name__.endswith(suffix) for module in build(name).module.modules())


def _fuse(model: ir.Model, caplog: pytest.LogCaptureFixture, **options) -> tuple[FuseNormPass, int]:
    """Run fuse-norm; return it and how many times onnxruntime's symbolic inference ran."""
    caplog.clear()
    fuse = FuseNormPass(PassOptions(**options))
    with caplog.at_level(logging.DEBUG, logger="normfold.passes._shapes"):
        fuse(model)
    return fuse, sum(record.getMessage().startswith(_SYMBOLIC) for record in caplog.records)


def _invented(model: ir.Model) -> bool:
    return any(
        isinstance(dim, ir.SymbolicDim) and (dim.value or "").startswith(INVENTED_DIM)
        for node in model.graph for value in node.outputs if value.shape is not None for dim in value.shape
    )


def test_fuse_norm_does_not_complete_shapes_no_site_needs(caplog: pytest.LogCaptureFixture) -> None:
    # A TorchScript LLaMA at opset 17: onnx's inference leaves the sequence dim of the attention
    # blocks unnamed, which no RMSNorm site reads. onnxruntime's inference is not run, and every
    # RMSNorm is fused all the same.
    model = _cleaned("llama", "ts17")
    fuse, runs = _fuse(model, caplog, target="onnx")
    assert runs == 0
    assert _invented(model), "onnx's inference named every dim: this model no longer tests the deferral"
    assert fuse.record.by_op == {"RMSNormalization": _modules("llama", "RMSNorm")}
    assert fuse.record.refused == []


def test_a_decision_on_the_rank_alone_does_not_complete_shapes(caplog: pytest.LogCaptureFixture) -> None:
    # A TorchScript BERT at opset 14 spells LayerNorm out; its embeddings' sum has dims onnx
    # had to invent (unk__N). The RMSNorm rule sees each site too and declines it as
    # mean-centred, a decision on the rank alone, which completing the shapes cannot change:
    # onnxruntime's inference is not run, and every LayerNorm is fused.
    model = _cleaned("bert", "ts14")
    fuse, runs = _fuse(model, caplog, target="onnx")
    assert _invented(model), "onnx's inference named every dim: this model no longer tests the rank reads"
    assert runs == 0
    assert fuse.record.by_op == {"LayerNormalization": _modules("bert", "LayerNorm")}
    assert fuse.record.refused == []


def test_a_rank_read_notes_only_a_missing_shape() -> None:
    invented = ir.Value(name="x", shape=ir.Shape([f"{INVENTED_DIM}1", 4]))
    shapeless = ir.Value(name="y")
    for read, value, unknown in (
        (checks.rank, invented, False), (checks.dims, invented, True), (checks.rank, shapeless, True),
    ):
        with checks.watch_unknown_shapes() as reads:
            read(value)
        assert reads.unknown is unknown, (read.__name__, value.name)


def test_fuse_norm_completes_shapes_when_a_site_needs_them(caplog: pytest.LogCaptureFixture) -> None:
    # The Skip ops need the residual operands provably of one shape: onnx's inference names
    # their sequence dims apart (unk__N), onnxruntime's names them alike. The first such check
    # completes the shapes, once, and every residual LayerNorm (all but the embeddings'; torch
    # exports LayerNormalization itself at opset 17) becomes a Skip op.
    model = _cleaned("bert", "ts17")
    fuse, runs = _fuse(model, caplog, target="onnxruntime", skip_ops=True)
    assert runs == 1
    assert fuse.record.by_op == {"SkipLayerNormalization": _modules("bert", "LayerNorm") - 1}


def test_a_deferred_completion_gives_the_shapes_an_eager_one_gives() -> None:
    eager, deferred = _cleaned("llama", "ts17"), _cleaned("llama", "ts17")
    infer_shapes(eager)
    completion = infer_shapes(deferred, defer=True)
    assert completion.pending
    assert _shapes(deferred) != _shapes(eager)
    completion.run()
    assert not completion.pending
    assert _shapes(deferred) == _shapes(eager)


def test_an_onnx_complete_model_has_nothing_to_defer(caplog: pytest.LogCaptureFixture) -> None:
    model = _cleaned("llama", "dynamo18")
    with caplog.at_level(logging.DEBUG, logger="normfold.passes._shapes"):
        completion = infer_shapes(model, defer=True)
    assert not completion.pending
    assert not any(record.getMessage().startswith(_SYMBOLIC) for record in caplog.records)


@pytest.mark.parametrize(("name", "variant"), [("llama", "ts17"), ("bert", "ts14"), ("unet", "ts14")])
def test_a_raise_from_the_inferred_proto_equals_one_from_the_model(name: str, variant: str) -> None:
    # fuse-norm hands onnx's converter the proto shape inference serialized instead of
    # serializing the model again: it must describe the model exactly.
    handed, serialized = _cleaned(name, variant), _cleaned(name, variant)
    completion = infer_shapes(handed, defer=True)
    infer_shapes(serialized, defer=True)
    proto = completion.inferred_proto()
    assert proto is not None
    raise_opset(handed, 23, proto=proto)
    raise_opset(serialized, 23)
    assert io.weightless_proto(handed) == io.weightless_proto(serialized)
    shape_after_conversion(handed, completion)
    assert completion.inferred_proto() is None  # the model changed: the proto no longer describes it


def test_a_completed_model_has_no_inferred_proto_to_hand_out() -> None:
    model = _cleaned("llama", "ts17")
    completion = infer_shapes(model, defer=True)
    assert completion.inferred_proto() is not None
    completion.run()
    assert completion.inferred_proto() is None
    assert infer_shapes(_cleaned("bert", "ts13")).inferred_proto() is None  # completed at once
