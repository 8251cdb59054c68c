"""The exactness checks every normalization fusion runs before it rewrites anything.

Each helper answers one question about a matched site and, when the answer is "no", says why
in words a user can read: it raises :class:`~normfold.errors.Refusal` (or returns the reason,
for the caller to raise, where "no" is an answer and not yet a refusal):

- :func:`reduce_axes`: which axes a ReduceMean/ReduceSum reduces, whether they are given as an
  attribute (opset <= 17) or an input (>= 18), with the ONNX defaults for omitted attributes
  (``keepdims=1``, ``noop_with_empty_axes=0``), because exporters omit them;
- :func:`scalar` / :func:`constant`: constants read exactly, never with a tolerance;
- :func:`same_dim` / :func:`static_dims`: shapes compared dimension by dimension, symbolic dims
  by name; an unknown dim is never assumed to match;
- :func:`dims` is how a check reads a shape; inside :func:`watch_unknown_shapes` it notes
  reading one that is not fully known (no shape, an unnamed dim, or a dim onnx's inference had
  to invent, ``unk__N``), so that a check it decided against can be run again once the shapes
  are completed (:class:`~normfold.passes._norm_rule.NormRule`); :func:`rank` reads only the
  rank, which completing the shapes never changes, and notes only a missing shape;
- :func:`outside_reader`: an intermediate value of the site read by a node outside it;
- :func:`affine_operand`: whether a constant multiplied into (or added to) a normalized tensor
  varies only along the axes a fused op's scale/bias covers, and its values in that layout.
"""

from __future__ import annotations

__all__ = [
    "FLOAT_TYPES",
    "ShapeReads",
    "affine_operand",
    "constant",
    "dims",
    "float32_exact",
    "keepdims",
    "outside_reader",
    "rank",
    "reduce_axes",
    "same_dim",
    "scalar",
    "static_dims",
    "strip_noop_cast",
    "watch_unknown_shapes",
]

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Union

import numpy as np
import onnx_ir as ir

from normfold.errors import Refusal
from normfold.passes._fold_graph import fixed_tensor
from normfold.passes._shapes import INVENTED_DIM

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})

Dim = Union[int, str, None]


_LAYOUT_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of ``value`` when it is a constant, or None when it is computed at run time.

    Besides initializers and Constant outputs: a constant reshaped (Reshape/Squeeze/Unsqueeze/
    Flatten) or broadcast (Expand) to a fully static inferred shape — TorchScript reshapes a
    weight to ``(1, C, 1, 1)`` with a shape computed from the input's — and a constant cast
    (Cast, or CastLike to a value of known dtype, as dynamo writes it). Initializers that are
    also graph inputs follow :func:`~normfold.passes._fold_graph.fixed_tensor`'s rule; fuse-norm
    does not freeze them, so they are never constants here.
    """
    if value is None:
        return None
    tensor = fixed_tensor(value, None)
    if tensor is None and value.is_graph_input():
        return None
    if tensor is not None:
        try:
            return tensor.numpy()
        except (FileNotFoundError, ValueError):
            return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    source = constant(node.inputs[0])
    if source is None:
        return None
    if node.op_type in ("Cast", "CastLike"):
        dtype = value.dtype
        return None if dtype is None else source.astype(dtype.numpy())
    shape = dims(value)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    if node.op_type in _LAYOUT_OPS and source.size == np.prod(shape, dtype=np.int64):
        return source.reshape(shape)
    if node.op_type == "Expand":
        try:
            return np.broadcast_to(source, shape)
        except ValueError:
            return None
    return None


def scalar(value: ir.Value | None) -> float | None:
    """A one-element constant as a Python float (exact), else None."""
    array = constant(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


def float32_exact(number: float) -> bool:
    """Whether ``number`` survives a float attribute (ONNX stores float attributes as float32)."""
    return float(np.float32(number)) == number


@dataclasses.dataclass
class ShapeReads:
    """Whether :func:`dims` returned a shape that is not fully known inside the watch."""

    unknown: bool = False


_WATCH: contextvars.ContextVar[ShapeReads | None] = contextvars.ContextVar("normfold_shape_reads", default=None)


@contextlib.contextmanager
def watch_unknown_shapes() -> Iterator[ShapeReads]:
    """Note, for the block, whether any shape read through :func:`dims` was not fully known."""
    reads = ShapeReads()
    token = _WATCH.set(reads)
    try:
        yield reads
    finally:
        _WATCH.reset(token)


def dims(value: ir.Value) -> list[Dim] | None:
    """Static dims as ints, symbolic ones by name, unknown ones as None."""
    result: list[Dim] | None = None
    if value.shape is not None:
        result = []
        for dim in value.shape:
            if isinstance(dim, int):
                result.append(dim)
            else:
                result.append(dim.value if isinstance(dim, ir.SymbolicDim) else None)
    _note(result is None or any(d is None or (isinstance(d, str) and d.startswith(INVENTED_DIM)) for d in result))
    return result


def rank(value: ir.Value) -> int | None:
    """The rank of ``value``, None when it has no shape. A check that needs only the rank reads
    it here: completing the shapes keeps every rank onnx inferred (``_shapes`` merges only
    shapes of the same rank), so a decision on it is final even where dims are unknown."""
    _note(value.shape is None)
    return None if value.shape is None else len(value.shape)


def _note(unknown: bool) -> None:
    reads = _WATCH.get()
    if reads is not None and unknown:
        reads.unknown = True


def same_dim(a: Dim, b: Dim) -> bool:
    """Two dims are the same only when both are known: equal ints or the same symbol."""
    return a is not None and b is not None and a == b


def static_dims(value: ir.Value, axes: Iterable[int]) -> tuple[int, ...] | None:
    """The static sizes of ``value`` along ``axes``, or None when any is symbolic or unknown."""
    shape = dims(value)
    if shape is None:
        return None
    sizes = [shape[axis] for axis in axes]
    return tuple(sizes) if all(isinstance(s, int) for s in sizes) else None  # type: ignore[misc]


def keepdims(node: ir.Node) -> int:
    return node.attributes.get_int("keepdims", 1)


def reduce_axes(node: ir.Node, input_rank: int) -> tuple[int, ...]:
    """The sorted non-negative axes ``node`` reduces; :class:`Refusal` when they cannot be known."""
    attribute = node.attributes.get("axes")
    if attribute is not None:
        raw: Sequence[int] | None = list(attribute.as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant(node.inputs[1])
        if array is None:
            raise Refusal(f"{node.op_type} {node.name!r} takes its axes at run time")
        raw = [int(a) for a in array.reshape(-1)]
    else:
        raw = None
    if not raw:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            raise Refusal(f"{node.op_type} {node.name!r} reduces nothing (noop_with_empty_axes=1)")
        return tuple(range(input_rank))
    axes = sorted({a + input_rank if a < 0 else a for a in raw})
    if axes[0] < 0 or axes[-1] >= input_rank or len(axes) != len(raw):
        raise Refusal(f"{node.op_type} {node.name!r} has invalid axes {list(raw)} for rank {input_rank}")
    return tuple(axes)


def strip_noop_cast(value: ir.Value) -> ir.Value:
    """``value`` with Casts to the type it already has peeled off (exporters write them)."""
    while True:
        node = value.producer()
        if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return value
        source = node.inputs[0]
        if source is None or source.dtype is None or source.dtype != value.dtype:
            return value
        value = source


_SHAPE_OPS = frozenset({"Shape", "Size", "Reshape", "Concat", "Squeeze", "Unsqueeze", "Gather", "Slice", "Cast"})


def _feeds_only(node: ir.Node, inside: set[ir.Node]) -> bool:
    """Whether ``node`` is shape arithmetic whose results end only in ``inside`` nodes."""
    if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx"):
        return False
    for output in node.outputs:
        if output.is_graph_output():
            return False
        for consumer in output.consumers():
            if consumer not in inside and not _feeds_only(consumer, inside):
                return False
    return True


def outside_reader(nodes: Sequence[ir.Node], kept: Iterable[ir.Value]) -> str | None:
    """Why the site's nodes cannot all go: a value other than ``kept`` is read elsewhere.

    Reading only the shape of an intermediate (``Shape`` and the shape arithmetic after it)
    does not count when all of that ends in the site itself (dynamo's keepdims restoration).
    """
    inside = set(nodes)
    kept = set(kept)
    for node in nodes:
        for output in node.outputs:
            if output in kept:
                continue
            label = output.name or f"output of {node.op_type}"
            if output.is_graph_output():
                return f"intermediate {label!r} is also a graph output"
            for consumer in output.consumers():
                reads_shape_only = consumer.op_type in ("Shape", "Size") and _feeds_only(consumer, inside)
                if consumer not in inside and not reads_shape_only:
                    who = consumer.name or consumer.op_type
                    return f"intermediate {label!r} is also read by {who!r}"
    return None


def affine_operand(
    array: np.ndarray, x_dims: Sequence[Dim], axes: Sequence[int], what: str
) -> np.ndarray:
    """``array`` (a Mul/Add operand of a tensor shaped ``x_dims``) laid out along ``axes``.

    The operand must broadcast into the tensor without enlarging it and be constant along
    every axis not in ``axes``; then its values, broadcast to the tensor's sizes along
    ``axes``, are returned (shape ``[x_dims[a] for a in axes]``). Otherwise :class:`Refusal`,
    its reason starting with ``what`` (the operand's role).
    """
    x_rank = len(x_dims)
    if array.ndim > x_rank:
        raise Refusal(f"{what}: operand of shape {list(array.shape)} has a higher rank than the normalized tensor")
    full = array.reshape((1,) * (x_rank - array.ndim) + array.shape)
    target: list[int] = []
    for axis in range(x_rank):
        size = full.shape[axis]
        if axis not in axes:
            if size != 1:
                raise Refusal(
                    f"{what}: operand of shape {list(array.shape)} varies along axis {axis}, "
                    f"which the fused op's scale and bias do not cover"
                )
            continue
        dim = x_dims[axis]
        if not isinstance(dim, int):
            raise Refusal(f"{what}: normalized axis {axis} has no static size")
        if size not in (1, dim):
            raise Refusal(f"{what}: operand of shape {list(array.shape)} does not broadcast to axis {axis} of size {dim}")
        target.append(dim)
    squeezed = full.reshape([full.shape[a] for a in axes])
    return np.broadcast_to(squeezed, target)
