"""A fused normalization as data, and the nodes that compute it.

Every fusion rule of ``fuse-norm`` reduces a matched site to a :class:`FusedNorm`: which op,
which input, which axes it normalizes, eps, and scale/bias (constants as float64 arrays, or
run-time values). :func:`emit` turns that into nodes and tags the node that produces the
result with the spec (in ``node.meta``, not serialized), so that the later rules of the pass
(absorbing a Cast, a following scale or bias, a residual Add) can read the spec back with
:func:`fused_of`, change it and emit it again. The replaced nodes are left for dead-code
removal.

Layout: the standard ops normalize the trailing axes (``axis`` .. last). A site that
normalizes other axes (ConvNeXt's channels-first LayerNorm over axis 1) is emitted as
``Transpose -> op -> Transpose``, moving the normalized axes to the end and back; measured on
onnxruntime's CPU provider this is faster than the decomposed graph (see ``fuse_layer_norm``).
GroupNormalization normalizes each group of channels of an ``(N, C, ...)`` tensor; its scale and
bias are per channel. ``op_type="InstanceNormalization"`` is GroupNorm in the form onnxruntime's
CPU provider runs fastest: ``Reshape(x, (0, G, -1))``, InstanceNormalization with unit scale and
zero bias, ``Reshape`` back to ``Shape(x)``, then the per-channel scale and bias as Mul and Add
(every op valid from opset 13 on).

Arithmetic on constants (scale times a following multiplier, ...) is done in float64 by the
rules; :func:`emit` casts once, to the input's dtype.
"""

from __future__ import annotations

__all__ = ["META_KEY", "RMS_OPS", "FusedNorm", "emit", "fused_of"]

import dataclasses
from typing import Union

import numpy as np
import onnx_ir as ir

from normfold.passes._fold_graph import FreshNames, initializer

META_KEY = "normfold.fuse_norm"

# The ops an RMSNorm becomes: ONNX's, and onnxruntime's (ONNX domain, every opset).
RMS_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")


Operand = Union[np.ndarray, ir.Value, None]


@dataclasses.dataclass(frozen=True)
class FusedNorm:
    """What one fused normalization computes.

    ``axes``: the normalized axes of ``x`` (non-negative, sorted). ``affine_axes`` and
    ``affine_shape``: the axes scale and bias vary along and their static sizes (the normalized
    axes, or the channel axis for GroupNormalization). ``scale``/``bias``: None means ones /
    zeros (no bias input); arrays hold float64 values. ``out_dtype`` is the dtype of the result
    (that of ``x``). ``site`` names the node the fusion replaced, ``spelling`` says how the
    source graph wrote it.
    """

    op_type: str
    x: ir.Value
    axes: tuple[int, ...]
    affine_axes: tuple[int, ...]
    affine_shape: tuple[int, ...]
    epsilon: float
    scale: Operand = None
    bias: Operand = None
    stash_type: int = 1
    groups: int | None = None
    site: str = ""
    spelling: str = ""

    @property
    def rank(self) -> int:
        assert self.x.shape is not None
        return len(self.x.shape)

    @property
    def trailing(self) -> bool:
        """Whether the normalized axes are the last ones (no Transposes needed)."""
        k = len(self.axes)
        return self.axes == tuple(range(self.rank - k, self.rank))


def fused_of(value: ir.Value | None) -> FusedNorm | None:
    """The spec of the fused normalization that produces ``value``, if this pass emitted it."""
    node = None if value is None else value.producer()
    if node is None:
        return None
    spec = node.meta.get(META_KEY)
    return spec if isinstance(spec, FusedNorm) else None


def _operand(op, operand: Operand, spec: FusedNorm, fill: float, what: str, namer: FreshNames) -> ir.Value:
    if isinstance(operand, ir.Value):
        return operand
    values = np.full(spec.affine_shape, fill) if operand is None else operand
    assert spec.x.dtype is not None
    return initializer(op, values, spec.x.dtype, namer(f"{spec.site}_{what}"))


def _instance_form(op, spec: FusedNorm, namer: FreshNames) -> ir.Value:
    """GroupNorm as onnxruntime's CPU provider runs it fastest: Reshape, InstanceNorm, Reshape."""
    dtype = spec.x.dtype
    assert dtype is not None and spec.groups is not None
    groups, channels = spec.groups, spec.affine_shape[0]
    grouped = np.array([0, groups, -1], dtype=np.int64)
    shape_name = namer(f"{spec.site}_groups")
    view = op.Reshape(spec.x, op.initializer(ir.tensor(grouped, name=shape_name), shape_name))
    ones = initializer(op, np.ones(groups), dtype, namer(f"{spec.site}_ones"))
    zeros = initializer(op, np.zeros(groups), dtype, namer(f"{spec.site}_zeros"))
    result = op.Reshape(op.InstanceNormalization(view, ones, zeros, epsilon=spec.epsilon), op.Shape(spec.x))
    per_channel = (channels,) + (1,) * (spec.rank - 2)
    if spec.scale is not None:
        scale = np.asarray(spec.scale).reshape(per_channel)
        result = op.Mul(result, initializer(op, scale, dtype, namer(f"{spec.site}_scale")))
    if spec.bias is not None:
        bias = np.asarray(spec.bias).reshape(per_channel)
        result = op.Add(result, initializer(op, bias, dtype, namer(f"{spec.site}_bias")))
    return result


def emit(op, spec: FusedNorm, namer: FreshNames) -> ir.Value:
    """Build the nodes that compute ``spec`` with the rewriter's ``op``; returns the result.

    The returned value's producer is tagged with ``spec``; its type and shape are ``x``'s.
    """
    x = spec.x
    rank = spec.rank
    perm: list[int] | None = None
    source = x
    if spec.op_type != "GroupNormalization" and not spec.trailing:
        perm = [a for a in range(rank) if a not in spec.axes] + list(spec.axes)
        source = op.Transpose(x, perm=perm)
    scale = None if spec.op_type == "InstanceNormalization" else _operand(op, spec.scale, spec, 1.0, "scale", namer)
    k = len(spec.axes)
    if spec.op_type == "LayerNormalization":
        inputs = [source, scale]
        if spec.bias is not None:
            inputs.append(_operand(op, spec.bias, spec, 0.0, "bias", namer))
        result = op.LayerNormalization(*inputs, axis=-k, epsilon=spec.epsilon, stash_type=spec.stash_type)
    elif spec.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        result = op.op(spec.op_type, source, scale, axis=-k, epsilon=spec.epsilon, stash_type=spec.stash_type)
    elif spec.op_type == "GroupNormalization":
        bias = _operand(op, spec.bias, spec, 0.0, "bias", namer)
        result = op.GroupNormalization(
            source, scale, bias, num_groups=spec.groups, epsilon=spec.epsilon, stash_type=spec.stash_type
        )
    elif spec.op_type == "InstanceNormalization":
        result = _instance_form(op, spec, namer)
    else:
        raise ValueError(f"cannot emit {spec.op_type}")
    if perm is not None:
        inverse = [perm.index(a) for a in range(rank)]
        result = op.Transpose(result, perm=inverse)
    result.type = x.type
    result.shape = x.shape
    result.producer().meta[META_KEY] = spec
    return result
