"""Shapes for the passes: onnx's shape inference, completed by onnxruntime's symbolic one.

The passes need the rank and the static sizes of intermediates, which TorchScript exports do
not record. :func:`infer_shapes` sets them on the model's values:

1. ``onnx.shape_inference`` with data propagation, as onnx_ir's ``ShapeInferencePass`` runs it
   (an inferred shape replaces the recorded one), but on :func:`normfold.io.weightless_proto`:
   no weight is read, and serializing is linear in the number of initializers (onnx_ir's
   ``call_onnx_api`` is quadratic in it: 0.43 s a call at 6808 initializers).
2. onnxruntime's ``SymbolicShapeInference`` (what onnxruntime's transformers optimizer relies
   on) then fills in what onnx could not — below opset 14 onnx infers nothing after a Reshape
   to a computed shape, which is every attention block of a TorchScript export at opset 13 —
   and names equal symbolic dims alike, so residual operands are provably the same shape. Its
   shape is taken where onnx has none, or where it has the same rank and agrees with every
   static size onnx knows; on any disagreement onnx's stays.

The declared shapes of the graph's inputs and outputs are its interface: inference only fills
them in where they are missing, never renames their symbolic dims.

Step 2 runs only when step 1 left a node output without a shape or with a dim it could not
name after the graph's inputs (onnx calls those ``unk__N``, a fresh name per value): when onnx
knows every shape, onnxruntime's inference has nothing to add. That is most CNN exports, and
it saves its run and its import.

Step 2 can also wait until something needs it (``infer_shapes(model, defer=True)``, what
``fuse-norm`` does): the returned :class:`Completion` holds onnx's inferred proto, and its
:meth:`~Completion.run` runs onnxruntime's inference on that proto — the model as it was then
— and merges the result into the model as it is now, by value name, exactly as an eager run
would have (values rewritten since have new names; an opset raise keeps names and shapes). A
``fuse-norm`` check that decided against a site after reading a shape onnx left incomplete
asks for it and is checked again (:class:`~normfold.passes._norm_rule.NormRule`); when no check
does — a TorchScript LLaMA whose only unknown dim is the sequence length, which no norm site
reads — onnxruntime's inference never runs (0.1 s and sympy's lazy imports on the 150 M
LLaMA). Only a proto where onnx gave every node output its element type and rank is deferred
(the rules read dtypes directly; what is left unknown is dims, which they read through
:func:`~normfold.passes._norm_checks.dims`); otherwise step 2 runs at once. Each run logs
``onnxruntime symbolic shape inference`` at DEBUG on this module's logger.

Either step failing leaves the shapes as the steps before it left them: a pass then refuses
the sites whose shapes stay unknown, it never guesses.

After an opset conversion (:func:`shape_after_conversion`) every value keeps its meaning, name
and shape (onnxscript's converter works on the values themselves; onnx's hands back the
``value_info`` it was given); only the ``Constant`` nodes it adds (a ReduceMean's axes moved to
an input) come without one. Those are shaped from their own value, and inference runs again only
when some other value is still unknown, so a raise does not pay for inference twice. With a
:class:`Completion` still pending, what is unknown was unknown before the raise: inference
waits for the completion, which runs it after its own merge if something is still unknown then
(the order an eager completion before the raise would have had).

The inferred shapes are read from the inferred proto's ``value_info`` by name when the model has
no subgraph (deserializing the whole proto again costs as much as the inference itself).
"""

from __future__ import annotations

__all__ = ["INVENTED_DIM", "Completion", "infer_shapes", "shape_after_conversion"]

import functools
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from normfold import io
from normfold.errors import first_line

logger = logging.getLogger(__name__)

# How onnx's shape inference names a dim it cannot name after the graph's inputs.
INVENTED_DIM = "unk__"


class Completion:
    """Step 2 (onnxruntime's symbolic inference) of :func:`infer_shapes`, deferred until asked.

    ``pending`` until :meth:`run` (or with nothing to complete: never). A raise of the model's
    opset while it is pending is told by :func:`shape_after_conversion`. :meth:`inferred_proto`
    hands out the proto onnx's inference returned while the model's shapes are what it says.
    """

    def __init__(self, model: ir.Model, inferred: onnx.ModelProto | None = None, *, pending: bool = False) -> None:
        self._model = model
        self._inferred = inferred
        self._pending = pending and inferred is not None
        # Whether the model is still what ``inferred`` describes (only shapes merged from it).
        self._current = inferred is not None
        self._converted = False

    @property
    def pending(self) -> bool:
        return self._pending

    def inferred_proto(self) -> onnx.ModelProto | None:
        """The model's weightless proto with onnx's inferred shapes, as :func:`infer_shapes` made
        it — the model serialized as it is, if nothing changed it since but passes that rewrite
        nothing (a survey); None once a completion or a conversion changed it."""
        return self._inferred if self._current else None

    def converted(self) -> None:
        """The model's opset was raised: if this is pending, after its merge what is still
        unknown is inferred again (as it would have been right after the raise)."""
        self._converted = True
        self._current = False

    def run(self) -> None:
        """Complete the shapes now (once): merge onnxruntime's inference of the proto onnx's
        inference returned; after an opset raise since, infer again if something is unknown."""
        if not self._pending:
            return
        self._pending, self._current = False, False
        _complete_with_onnxruntime(self._model, self._inferred)
        if self._converted and not _all_known(self._model):
            infer_shapes(self._model)


def infer_shapes(model: ir.Model, *, defer: bool = False) -> Completion:
    """Set the shapes and dtypes onnx (then onnxruntime) infer on ``model``'s values, in place.

    With ``defer``, onnxruntime's step is left to the returned :class:`Completion` when onnx's
    inference gave every node output its element type and rank; otherwise it has run when this
    returns.
    """
    proto = io.weightless_proto(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as error:
        logger.debug("onnx shape inference failed: %s", first_line(error))
    else:
        _merge(model, proto, replace=True)
        if _complete(proto):
            return Completion(model, proto)
        if defer and _typed(proto):
            return Completion(model, proto, pending=True)
    _complete_with_onnxruntime(model, proto)
    return Completion(model)


def _complete_with_onnxruntime(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Step 2: merge onnxruntime's symbolic inference of ``proto`` into ``model``."""
    logger.debug("onnxruntime symbolic shape inference: %d nodes", len(proto.graph.node))
    try:
        completed = _symbolic_shape_inference().infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception as error:  # noqa: BLE001  (its failures on ops it does not know have no common type)
        logger.debug("onnxruntime symbolic shape inference failed: %s", first_line(error))
        return
    if completed is not None:
        _merge(model, completed, replace=False)


def shape_after_conversion(model: ir.Model, completion: Completion | None = None) -> None:
    """Shape what an opset conversion left unshaped: its new ``Constant`` nodes from their
    values; anything else by :func:`infer_shapes` (only then; after ``completion`` when that is
    still pending)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.outputs[0].shape is None:
            value = node.attributes.get("value")
            if value is not None and value.type == ir.AttributeType.TENSOR:
                node.outputs[0].shape = ir.Shape(value.as_tensor().shape)
                node.outputs[0].dtype = value.as_tensor().dtype
    if completion is not None:
        completion.converted()
        if completion.pending:
            return
    if not _all_known(model):
        infer_shapes(model)


def _all_known(model: ir.Model) -> bool:
    """Whether every node output of every graph has a shape whose dims are all numbers or
    names (none that onnx had to invent, ``unk__N``, nor unnamed ones)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if not value.name:
                continue
            if value.shape is None:
                return False
            for dim in value.shape:
                if not isinstance(dim, int) and (dim.value is None or dim.value.startswith(INVENTED_DIM)):
                    return False
    return True


def _complete(proto: onnx.ModelProto) -> bool:
    """Whether onnx's inference gave every node output of the main graph a shape whose dims
    are all numbers or names it did not have to invent."""
    graph = proto.graph
    known = {info.name: info.type for info in (*graph.value_info, *graph.output, *graph.input)}
    for node in graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attribute in node.attribute):
            return False  # subgraph values: left to onnxruntime's inference as before
        for name in node.output:
            if not name:
                continue
            type_ = known.get(name)
            if type_ is None or not type_.HasField("tensor_type") or not type_.tensor_type.HasField("shape"):
                return False
            for dim in type_.tensor_type.shape.dim:
                if not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith(INVENTED_DIM)):
                    return False
    return True


def _typed(proto: onnx.ModelProto) -> bool:
    """Whether onnx's inference gave every node output of the main graph a tensor type with
    its element type and a shape (a rank): what it left unknown are dims only. (The rules read
    dtypes without asking for a completion, and a dtype is merged only with a shape.)"""
    graph = proto.graph
    known = {info.name: info.type for info in (*graph.value_info, *graph.output, *graph.input)}
    for node in graph.node:
        for name in node.output:
            type_ = known.get(name) if name else None
            if name and (
                type_ is None
                or not type_.HasField("tensor_type")
                or not type_.tensor_type.elem_type
                or not type_.tensor_type.HasField("shape")
            ):
                return False
    return True


@functools.cache
def _symbolic_shape_inference() -> Any:
    """onnxruntime's ``SymbolicShapeInference`` class, loaded without ``onnxruntime.tools``.

    ``import onnxruntime.tools.symbolic_shape_infer`` first runs ``onnxruntime/tools/__init__``,
    which imports torch whenever it is installed (for an export helper nothing here uses): over
    a second and 200 MB on every run that infers shapes. The module itself needs only onnx,
    numpy, sympy and packaging, so it is loaded from its file (and onnxruntime itself is not
    imported by it).
    """
    loaded = sys.modules.get("onnxruntime.tools.symbolic_shape_infer")
    if loaded is not None:
        return loaded.SymbolicShapeInference
    package = importlib.util.find_spec("onnxruntime")
    if package is None or package.origin is None:
        raise ImportError("onnxruntime is not installed")
    path = Path(package.origin).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("normfold_ort_symbolic_shape_infer", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _refines(new: ir.Shape, old: ir.Shape | None) -> bool:
    """Whether ``new`` says all ``old`` says: the same rank and every static size."""
    if old is None:
        return True
    return len(new) == len(old) and all(not isinstance(o, int) or n == o for n, o in zip(new, old))


def _merge(model: ir.Model, inferred_proto: onnx.ModelProto, *, replace: bool) -> None:
    """Copy inferred shapes/dtypes onto ``model``: all of them with ``replace``, else refinements."""
    interface = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    for graph, found in zip(model.graphs(), _inferred_types(model, inferred_proto)):
        for name, value in ir.convenience.create_value_mapping(graph).items():
            inferred = found.get(name)
            if inferred is None:
                continue
            shape, dtype = inferred
            if shape is None:
                continue
            if value.shape is not None and (id(value) in interface or not (replace or _refines(shape, value.shape))):
                continue
            value.shape = shape
            if dtype is not None:
                value.dtype = dtype


def _inferred_types(
    model: ir.Model, inferred_proto: onnx.ModelProto
) -> list[dict[str, tuple[ir.Shape | None, ir.DataType | None]]]:
    """The inferred shape and dtype of each named value, per graph of ``model`` (in the order
    of ``model.graphs()``)."""
    if len(list(model.graphs())) > 1:
        # Subgraphs: their values are matched graph by graph on the deserialized proto.
        inferred = ir.serde.deserialize_model(inferred_proto)
        return [
            {name: (value.shape, value.dtype) for name, value in ir.convenience.create_value_mapping(graph).items()}
            for graph in inferred.graphs()
        ]
    graph = inferred_proto.graph
    found: dict[str, tuple[ir.Shape | None, ir.DataType | None]] = {
        tensor.name: (ir.Shape(tensor.dims), ir.DataType(tensor.data_type)) for tensor in graph.initializer
    }
    # Values share few types (277 for the 1909 values of a 150 M LLaMA): each distinct type is
    # deserialized once, and every value gets its own copy of the shape.
    types: dict[bytes, tuple[ir.Shape | None, ir.DataType | None]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if not info.name or not info.HasField("type"):
            continue
        key = info.type.SerializeToString()
        if key not in types:
            type_ = ir.serde.deserialize_type_proto_for_type(info.type)
            types[key] = (
                ir.serde.deserialize_type_proto_for_shape(info.type),
                type_.dtype if type_ is not None else None,
            )
        shape, dtype = types[key]
        found[info.name] = (None if shape is None else shape.copy(), dtype)
    return [found]
