"""The linear ops a per-channel affine map folds into from behind (fold-bn and fold-affine).

A *producer site* is ``y = L(x)`` whose output channels carry their own weights and bias:

==============  ==============================  ============================  =================
producer        weight                          output channels               channel axis of y
==============  ==============================  ============================  =================
Conv            ``(C_out, C_in/g, k…)``         ``C_out``                     1
ConvTranspose   ``(C_in, C_out/g, k…)``         ``group·C_out/g``             1
Gemm            ``B``: ``(N, K)`` if transB     ``N``                         1 (last)
MatMul [+ Add]  2-D ``(K, N)`` second input     ``N``                         last
==============  ==============================  ============================  =================

:func:`producer_pattern` matches all of them as one ``OrValue`` (``MatMul`` followed by a bias
``Add`` in either operand order, or bare). :func:`read_producer` reads a matched site and refuses
(with a reason) when its weights are not constants, when the weight has an unsupported form, or
when another node (or the graph output) also reads the producer's output: that reader needs the
unscaled values. :func:`fold_into_producer` does the float64 arithmetic and refuses a fold the
weights' dtype cannot hold (overflow, underflow, float16/bfloat16 precision) and
:func:`emit_producer` writes the folded op with new initializers in the weights' dtype, keeping
the producer's name and attributes (a bare MatMul becomes MatMul + Add, Gemm's ``beta`` becomes 1).
"""

from __future__ import annotations

__all__ = [
    "ProducerFold",
    "ProducerFoldRule",
    "ProducerSite",
    "emit_producer",
    "fold_into_producer",
    "linear_node",
    "producer_pattern",
    "read_producer",
]

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as _pattern

from normfold.math import batchnorm as fm
from normfold.math import fold_precision as fp
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    FoldRule,
    Reads,
    attribute,
    describe,
    freeze,
    initializer,
    other_reader,
    rank_of,
    read_constant,
    require_castable,
    require_precise,
    tensor_dtype,
)


def producer_pattern(op: Any, x: Any, *, bare_matmul: bool = True) -> Any:
    """``OrValue`` of the producer forms reading ``x``; binds ``produced`` and the tag ``producer``.

    ``bare_matmul=False`` leaves out the MatMul without a bias Add: for an ``Add`` after it, that
    Add *is* its bias.
    """
    alternatives = {
        "Conv": op.Conv(x, _allow_other_inputs=True),
        "ConvTranspose": op.ConvTranspose(x, _allow_other_inputs=True),
        "Gemm": op.Gemm(x, _allow_other_inputs=True),
        "MatMul+Add": op.Add(op.MatMul(x, _allow_other_inputs=True), _pattern.ANY_VALUE),
        "Add+MatMul": op.Add(_pattern.ANY_VALUE, op.MatMul(x, _allow_other_inputs=True)),
    }
    if bare_matmul:
        alternatives["MatMul"] = op.MatMul(x, _allow_other_inputs=True)
    return _pattern.OrValue(
        list(alternatives.values()),
        name="produced",
        tag_var="producer",
        tag_values=list(alternatives),
    )


def linear_node(kind: str, produced: ir.Value) -> ir.Node:
    """The Conv/ConvTranspose/Gemm/MatMul of a site matched as ``kind`` (inside its bias Add)."""
    node = produced.producer()
    if kind == "MatMul+Add":
        return node.inputs[0].producer()
    if kind == "Add+MatMul":
        return node.inputs[1].producer()
    return node


@dataclasses.dataclass
class ProducerSite:
    """A matched producer with its constants read in float64."""

    kind: str  # Conv | ConvTranspose | Gemm | MatMul
    node: ir.Node  # the linear op
    bias_node: ir.Node | None  # MatMul's bias Add
    data: ir.Value
    weight: np.ndarray
    weight_value: ir.Value
    bias: np.ndarray | None
    bias_value: ir.Value | None
    channels: int
    rank: int | None  # of ``output``
    channel_axis: int | None  # of ``output``

    @property
    def label(self) -> str:
        return describe(self.node)


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def read_producer(
    kind: str,
    produced: ir.Value,
    reader: ir.Node,
    reads: Reads,
    *,
    allowed: Collection[ir.Node] = (),
) -> ProducerSite:
    """Read the site matched as ``kind`` whose output ``produced`` only ``reader`` (and the nodes
    in ``allowed``: readers of its shape alone) may read."""
    node = linear_node(kind, produced)
    bias_node = bias_value = None
    if kind in ("MatMul+Add", "Add+MatMul"):
        bias_node = produced.producer()
        bias_value = bias_node.inputs[1 if kind == "MatMul+Add" else 0]
        if (seen_by := other_reader(node.outputs[0], {bias_node})) is not None:
            raise Refusal(
                f"{describe(node)} output '{node.outputs[0].name}' is also read by {seen_by}"
            )
    if (seen_by := other_reader(produced, {reader, *allowed})) is not None:
        raise Refusal(
            f"{describe(produced.producer())} output '{produced.name}' is also read by {seen_by}"
        )
    op_type = node.op_type
    weight_value = node.inputs[1]
    weight = read_constant(weight_value, f"{op_type} weight", reads)
    if kind in ("Conv", "ConvTranspose"):
        bias_value = _optional_input(node, 2)
        group = attribute(node, "group", 1)
        if weight.ndim < 3:
            raise Refusal(f"{describe(node)} has a weight of rank {weight.ndim}")
        if kind == "ConvTranspose" and weight.shape[0] % group:
            raise Refusal(
                f"{describe(node)} has {weight.shape[0]} input channels, "
                f"not divisible by group={group}"
            )
        channels = weight.shape[0] if kind == "Conv" else weight.shape[1] * group
        rank, axis = weight.ndim, 1
    elif kind == "Gemm":
        bias_value = _optional_input(node, 2)
        if weight.ndim != 2:
            raise Refusal(f"{describe(node)} has a B of rank {weight.ndim}")
        channels = weight.shape[0] if attribute(node, "transB", 0) else weight.shape[1]
        rank, axis = 2, 1
    else:
        if weight.ndim != 2:
            raise Refusal(
                f"{describe(node)} has a weight of rank {weight.ndim}: only a 2-D weight folds"
            )
        channels = weight.shape[1]
        rank = rank_of(produced)
        if rank is None and (data_rank := rank_of(node.inputs[0])) is not None:
            rank = max(data_rank, 2 if data_rank > 1 else 1)
        axis = None if rank is None else rank - 1
        kind = "MatMul"
    bias = None if bias_value is None else read_constant(bias_value, f"{op_type} bias", reads)
    if bias is not None and kind == "MatMul" and bias.ndim and bias.shape[-1] not in (1, channels):
        raise Refusal(f"the bias of {describe(node)} has shape {list(bias.shape)}")
    return ProducerSite(
        kind,
        node,
        bias_node,
        node.inputs[0],
        weight,
        weight_value,
        bias,
        bias_value,
        channels,
        rank,
        axis,
    )


def fold_into_producer(
    site: ProducerSite,
    scale: np.ndarray,
    shift: np.ndarray,
    statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 weight and bias of ``scale·site + shift`` (one value per output channel).

    Refuses (``Refusal``) when the weights' dtype cannot hold them: see ``require_castable`` and
    ``require_precise``; ``statistics`` (a BN's input mean and standard deviation per channel)
    put the probes where the BN's inputs lie.
    """
    group = attribute(site.node, "group", 1)
    trans_b = bool(attribute(site.node, "transB", 0))
    alpha, beta = float(attribute(site.node, "alpha", 1.0)), float(attribute(site.node, "beta", 1.0))
    if site.kind == "Conv":
        weight, bias = fm.fold_after_conv(site.weight, site.bias, scale, shift)
    elif site.kind == "ConvTranspose":
        weight, bias = fm.fold_after_conv_transpose(site.weight, site.bias, scale, shift, group)
    elif site.kind == "Gemm":
        weight, bias = fm.fold_after_gemm(site.weight, site.bias, scale, shift, trans_b=trans_b, beta=beta)
    else:
        weight, bias = fm.fold_after_matmul(site.weight, site.bias, scale, shift)
    dtype = tensor_dtype(site.weight_value)
    require_castable({"weight": weight, "bias": bias}, dtype)

    def probes(law: fp.Affine | None) -> tuple[np.ndarray, np.ndarray]:
        # Gemm computes alpha·A·B + beta·C: both sides carry alpha in their rows.
        factor = alpha if site.kind == "Gemm" else 1.0
        rows = fp.output_rows(site.kind, site.weight, group=group, trans_b=trans_b)
        folded_rows = fp.output_rows(site.kind, weight, group=group, trans_b=trans_b)
        if factor != 1.0:  # skips copying every weight for the common case
            rows, folded_rows = rows * factor, folded_rows * factor
        old_bias = None if site.bias is None else fp.channel_vector(site.bias, site.channels)
        if old_bias is not None and site.kind == "Gemm":
            old_bias = beta * old_bias
        return fp.site_outputs(
            rows, old_bias, folded_rows, fp.channel_vector(bias, site.channels), dtype.numpy(),
            after=fp.Affine(scale, shift), statistics=law,
        )

    # Standard-normal inputs (what verification feeds) and, for a BN in float16/bfloat16, the
    # inputs it was fitted to (float32 rounds too finely for them to matter).
    require_precise(lambda: probes(None), dtype)
    if statistics is not None and fp.is_low_precision(dtype.numpy()) and np.any(statistics[1] > 0):
        require_precise(lambda: probes(fp.Affine(statistics[1], statistics[0])), dtype)
    return weight, bias


def emit_producer(
    op: Any, site: ProducerSite, weight: np.ndarray, bias: np.ndarray, fresh: Callable[[str], str]
) -> ir.Value:
    """Write the folded producer; returns the value that replaces the affine map's output."""
    weight_dtype = tensor_dtype(site.weight_value)
    bias_dtype = weight_dtype if site.bias_value is None else tensor_dtype(site.bias_value)
    base = site.weight_value.name or site.node.name
    new_weight = initializer(op, weight, weight_dtype, fresh(f"{base}_folded"))
    # A fold that adds nothing (a scale without a shift, no bias before) needs no bias input.
    new_bias = (
        initializer(op, bias, bias_dtype, fresh(f"{base}_folded_bias"))
        if site.bias_value is not None or np.any(bias)
        else None
    )
    attributes = dict(site.node.attributes)
    if site.kind == "MatMul":
        product = op.MatMul(site.data, new_weight, _name=site.node.name)
        if new_bias is None:
            return product
        bias_name = site.bias_node.name if site.bias_node is not None else f"{site.node.name}/bias"
        return op.Add(product, new_bias, _name=bias_name)
    if site.kind == "Gemm":
        attributes.pop("beta", None)
    inputs = [site.data, new_weight] + ([] if new_bias is None else [new_bias])
    return op.op(site.kind, *inputs, _name=site.node.name, **attributes)


@dataclasses.dataclass(frozen=True)
class ProducerFold:
    """What a producer fold's check hands its rewrite: the affine ``node`` that disappears into
    ``site`` with the float64 ``weight`` and ``bias``, the graph inputs it ``reads`` (frozen on
    rewrite), and ``how`` the report names the fold."""

    node: ir.Node
    site: ProducerSite
    weight: np.ndarray
    bias: np.ndarray
    reads: Reads
    how: str


class ProducerFoldRule(FoldRule):
    """A fold into the producer of the matched node: ``check`` leaves a :class:`ProducerFold` in
    ``_plan``; ``rewrite`` freezes what was read, records the site and writes the folded
    producer."""

    _plan: ProducerFold

    def rewrite(self, op: Any, **_: Any) -> ir.Value:
        plan = self._plan
        freeze(plan.reads, self.record)
        self.record.site(plan.node.name, op=plan.site.kind, into=plan.site.node.name, how=plan.how)
        return emit_producer(op, plan.site, plan.weight, plan.bias, self._fresh)
