"""What a collapse candidate costs: whole-model batch-1 onnxruntime latency, or MACs.

Used by :class:`normfold.passes.collapse.CollapsePass` under a budget and by the ``normfold
collapse`` job for its cost table; re-exported there (``CostMeter``, ``dense_form``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from normfold.errors import InputError
from normfold.latency import LatencyTable, Timing
from normfold.passes._fold_graph import attribute
from normfold.passes._shapes import infer_shapes
from normfold.passes.fold_affine import FoldAffinePass
from normfold.passes.fold_bn import FoldBatchNormPass

__all__ = ["CostMeter", "dense_form"]

_LAYERS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


class CostMeter:
    """The batch-1 cost of whole models like ``model``: onnxruntime latency, or MACs.

    The input is ``feed`` cut to one sample along every input whose first dim is symbolic.

    Latency is :func:`normfold.latency.measure` through a :class:`~normfold.latency.LatencyTable`
    keyed by the model's structure (ops, attributes, wiring, weight shapes) and the input
    shapes: a model of a structure already timed is not timed again. MACs count Conv,
    ConvTranspose, Gemm and MatMul on the shapes inferred for ``feeds``.
    """

    def __init__(self, model: ir.Model, feed: Mapping[str, np.ndarray], *, measure: bool = True, runs: int = 50,
                 repeats: int = 5) -> None:
        self.feeds = _batch_one(model, feed)
        self.measure = measure
        self.table = LatencyTable(runs=runs, repeats=repeats)

    def timing(self, model: ir.Model) -> Timing:
        shapes = tuple((name, array.shape) for name, array in sorted(self.feeds.items()))
        return self.table.get((_structure(model), shapes), lambda: (ir.to_proto(model), self.feeds))

    def macs(self, model: ir.Model) -> int:
        return _macs(model, self.feeds)

    def cost(self, model: ir.Model) -> float:
        """The measured median latency in ms, or the MACs when not measuring."""
        return self.timing(model).median if self.measure else float(self.macs(model))


def _batch_one(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` cut to one sample along every input whose first dim is symbolic (batch 1)."""
    result = {}
    for value in model.graph.inputs:
        if value.name not in feed:
            continue
        array = feed[value.name]
        symbolic = value.shape is not None and len(value.shape) > 0 and not isinstance(value.shape[0], int)
        result[value.name] = array[:1] if symbolic and array.ndim else array
    return result


def dense_form(model: ir.Model) -> ir.Model:
    """The budget's reference: ``model`` with its BatchNorms and affines folded, nothing linearized."""
    dense = model.clone()
    FoldBatchNormPass()(dense)
    FoldAffinePass()(dense)
    common.RemoveUnusedNodesPass()(dense)
    return dense


def _structure(model: ir.Model) -> tuple:
    """A hashable description of ``model`` without weight values: ops, attributes, wiring, shapes."""
    token: dict[int, Any] = {id(v): ("input", k) for k, v in enumerate(model.graph.inputs)}
    rows: list[Any] = [tuple((str(v.dtype), str(v.shape)) for v in model.graph.inputs)]
    for n, node in enumerate(model.graph):
        inputs = []
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                inputs.append(("weight", str(value.const_value.dtype), tuple(value.const_value.shape)))
            else:
                inputs.append(None if value is None else token.get(id(value)))
        attrs = tuple(sorted(
            (name, (str(a.type), str(a.value.dtype), tuple(a.value.shape)) if a.type == ir.AttributeType.TENSOR
             else repr(a.value)) for name, a in node.attributes.items()
        ))
        rows.append((node.domain, node.op_type, attrs, tuple(inputs)))
        for k, output in enumerate(node.outputs):
            token[id(output)] = (n, k)
    rows.append(tuple(token.get(id(v)) for v in model.graph.outputs))
    return tuple(rows)


def _macs(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> int:
    """Multiply-accumulates of the layers for inputs shaped as ``feeds`` (Refusal: a shape unknown)."""
    shaped = model.clone()
    for value in shaped.graph.inputs:
        if value.name in feeds:
            value.shape = ir.Shape(feeds[value.name].shape)
    for value in shaped.graph.outputs:
        value.shape = None  # the declared output shapes stay symbolic otherwise: infer them anew
    infer_shapes(shaped)
    total = 0
    for node in shaped.graph:
        if node.op_type not in _LAYERS or node.domain not in ("", "ai.onnx"):
            continue
        weight, output = node.inputs[1], node.outputs[0]
        shapes = [v.shape if v is not None else None for v in (node.inputs[0], weight, output)]
        if any(shape is None or not all(isinstance(d, int) for d in shape) for shape in shapes):
            raise InputError(f"collapse: the MACs of {node.op_type} {node.name!r} need static shapes; "
                             "measure latency instead")
        source, kernel, result = (tuple(shape) for shape in shapes)
        if node.op_type == "Conv":
            total += math.prod(result) * math.prod(kernel[1:])
        elif node.op_type == "ConvTranspose":
            total += math.prod(source) * math.prod(kernel[1:])
        elif node.op_type == "Gemm":
            inner = kernel[1] if attribute(node, "transB", 0) else kernel[0]
            total += math.prod(result) * inner
        else:
            total += math.prod(result) * source[-1]
    return total
