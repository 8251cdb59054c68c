"""Rule: fold a BatchNormalization into the linear op that reads its output.

For ``z = L(s·x + t)`` (``s``, ``t`` the BN's per-channel scale and shift on axis 1 of ``x``)
with ``L`` one of:

* **Conv** (any ``group``): ``W'[o, i, k] = W[o, i, k]·s[i']`` and
  ``b'[o] = b[o] + Σ W[o, i, k]·t[i']`` with ``i'`` the input channel ``i`` of ``o``'s group.
  Exact when every output position sums the whole kernel window over real inputs: the Conv is
  unpadded (:func:`normfold.math.padding.conv_pads` all 0: ``pads`` 0, ``auto_pad`` VALID, or
  ``SAME_*`` with nothing to pad, e.g. a 1×1 kernel), or the shift is zero everywhere. A
  zero-padded Conv with a nonzero shift is refused: the padded border would see 0 where the
  original sees ``t``.
* **Gemm** (``transA=0``): ``B'`` scaled along ``K``, ``C' = beta·C + alpha·t·B'``, ``beta = 1``.
* **MatMul** with a constant 2-D weight: ``X·W' + t·W`` (MatMul + Add). The BN's axis 1 is the
  MatMul's reduction axis only for a rank-2 input, so higher ranks are refused.
* any of these reached through one or two Flatten/Reshape/Transpose/Squeeze/Unsqueeze nodes
  that carry the BN's channels onto the axis the op reduces (axis 1 of a Conv or Gemm input,
  the last axis of a MatMul input), each channel ``c`` as the features ``c·P … c·P + P − 1``
  (``P`` = 1, or the static sizes flattened after it: ``Flatten(axis=1)`` or a ``Reshape`` to
  ``(N, C·P)`` of ``(N, C, d…)``): ``s`` and ``t`` are repeated ``P`` times. Where the channels
  end up is worked out from the static shapes (``_channel_route``); other chains are refused
  (the channels are split or merged with another axis, or the sizes are unknown).

The folded weights must survive the cast to the weights' dtype (no overflow, no nonzero value
flushed to 0) and, in float16/bfloat16, stay as close to the unfolded site as its own rounding
(``normfold.math.fold_precision``); else the site is refused with the numbers.

The BN (and the shape ops) stay while anything else reads them; the site is refused when
the BN's output goes anywhere but ops of these kinds (the BN would stay anyway), when the BN is
not the inference form or its parameters or the consumer's weights are not constants (graph
inputs count as not constant unless ``freeze_initializer_inputs``). Refusals name the BN.
"""

from __future__ import annotations

__all__ = ["FoldBnIntoConsumer"]

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from normfold.math import batchnorm as fm
from normfold.math import fold_precision as fp
from normfold.errors import Refusal
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._channel_route import ROUTE_OPS, Route, follow
from normfold.passes._fold_graph import (
    FoldRule,
    Reads,
    any_op,
    attribute,
    batchnorm_statistics,
    conv_pads_of,
    describe,
    freeze,
    initializer,
    rank_of,
    read_constant,
    require_castable,
    require_precise,
    tensor_dtype,
)
from onnxscript.rewriter import pattern as _pattern
from onnxscript.rewriter._basics import MatchResult

_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class _Folded:
    """The float64 folded weight and bias, and the bias input they replace (None: none)."""

    weight: np.ndarray
    bias: np.ndarray
    bias_value: ir.Value | None


@dataclasses.dataclass(frozen=True)
class _ConsumerFold:
    """What the check hands the rewrite: ``bn`` folds into ``consumer``, which then reads ``x``
    through the shape ops ``chain`` (written again) with the ``folded`` weights."""

    bn: ir.Node
    consumer: ir.Node
    chain: list[ir.Node]
    x: ir.Value
    weight_value: ir.Value
    folded: _Folded
    reads: Reads


def _padded(conv: ir.Node, kernel: tuple[int, ...]) -> bool:
    """Whether ``conv`` zero-pads its input (taken as padded when that needs an unknown size)."""
    pads = conv_pads_of(conv, kernel)
    return pads is None or any(pads)


def _check_readers(normalized: ir.Value) -> None:
    if normalized.is_graph_output():
        raise Refusal("the BatchNormalization output is also a graph output")
    for user, _ in normalized.uses():
        if user.op_type not in _CONSUMERS | ROUTE_OPS:
            raise Refusal(
                f"the BatchNormalization output is also read by {describe(user)}, "
                "which nothing folds into"
            )


def _fold_conv(
    conv: ir.Node, weight: np.ndarray, scale: np.ndarray, shift: np.ndarray, reads: Reads
) -> _Folded:
    group = attribute(conv, "group", 1)
    if weight.ndim < 3 or weight.shape[1] * group != scale.size:
        raise Refusal(
            f"{describe(conv)} reads {weight.shape[1] * group} channels, "
            f"the BatchNormalization has {scale.size}"
        )
    if np.any(shift != 0) and _padded(conv, weight.shape[2:]):
        raise Refusal(
            f"{describe(conv)} zero-pads its input: the padded border would see 0 where the "
            "original sees the BatchNormalization's shift (folding is exact for an unpadded "
            "Conv or a zero shift)"
        )
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = None if bias_value is None else read_constant(bias_value, "Conv bias", reads)
    return _Folded(*fm.fold_before_conv(weight, bias, scale, shift, group), bias_value)


def _fold_gemm(
    gemm: ir.Node, weight: np.ndarray, scale: np.ndarray, shift: np.ndarray, reads: Reads
) -> _Folded:
    if attribute(gemm, "transA", 0):
        raise Refusal(f"{describe(gemm)} transposes its input (transA=1): the channels become rows")
    trans_b = bool(attribute(gemm, "transB", 0))
    if weight.ndim != 2 or weight.shape[1 if trans_b else 0] != scale.size:
        raise Refusal(
            f"{describe(gemm)}'s B of shape {list(weight.shape)} "
            f"does not read {scale.size} features"
        )
    c_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = None if c_value is None else read_constant(c_value, "Gemm C", reads)
    new_b, new_c = fm.fold_before_gemm(
        weight,
        c,
        scale,
        shift,
        trans_b=trans_b,
        alpha=float(attribute(gemm, "alpha", 1.0)),
        beta=float(attribute(gemm, "beta", 1.0)),
    )
    return _Folded(new_b, new_c, c_value)


def _check_reduced_axis(consumer: ir.Node, features: ir.Value, where: Route) -> None:
    """The consumer must sum over the axis the BN's channels are on (see ``follow``)."""
    rank = rank_of(features)
    if consumer.op_type == "MatMul":
        if rank is None:
            raise Refusal(f"the rank of {describe(consumer)}'s input is unknown")
        reduced = rank - 1
    else:
        reduced = 1  # Conv's input channels; Gemm's K (transA is checked with its weights)
    if where.axis != reduced:
        raise Refusal(
            f"{describe(consumer)} reduces axis {reduced} of its rank-{rank} input, but the "
            f"BatchNormalization's channels are on axis {where.axis} there"
        )


def _fold_matmul(
    matmul: ir.Node, weight: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> _Folded:
    if weight.ndim != 2 or weight.shape[0] != scale.size:
        raise Refusal(
            f"{describe(matmul)}'s weight of shape {list(weight.shape)} "
            f"does not read {scale.size} features"
        )
    return _Folded(*fm.fold_before_matmul(weight, scale, shift), None)


def _require_representable(
    consumer: ir.Node,
    weight: np.ndarray,
    folded: _Folded,
    scale: np.ndarray,
    shift: np.ndarray,
    statistics: tuple[np.ndarray, np.ndarray],
    reads: Reads,
) -> None:
    """Refuse a fold the weights' dtype cannot hold (see ``require_castable``/``require_precise``);
    ``statistics`` are the BN's mean and standard deviation per feature, the probes' law."""
    new_weight, new_bias, bias_value = folded.weight, folded.bias, folded.bias_value
    dtype = tensor_dtype(consumer.inputs[1])
    require_castable({"weight": new_weight, "bias": new_bias}, dtype)

    def probes(follow_statistics: bool) -> tuple[np.ndarray, np.ndarray]:
        kind = consumer.op_type
        trans_b = bool(attribute(consumer, "transB", 0))
        rows, per_channel = fp.input_rows(kind, weight, trans_b=trans_b)
        folded_rows, _ = fp.input_rows(kind, new_weight, trans_b=trans_b)
        old_bias = None if bias_value is None else read_constant(bias_value, "bias", reads)
        if kind == "Gemm":  # alpha·A·B + beta·C before, alpha·A·B' + C' after
            alpha = float(attribute(consumer, "alpha", 1.0))
            rows, folded_rows = rows * alpha, folded_rows * alpha
            if old_bias is not None:
                old_bias = float(attribute(consumer, "beta", 1.0)) * old_bias
        groups = attribute(consumer, "group", 1) if kind == "Conv" else 1

        def columns(vector: np.ndarray) -> np.ndarray:
            return np.repeat(vector.reshape(groups, -1), per_channel, axis=1)

        channels = rows.shape[0]
        return fp.site_outputs(
            rows,
            None if old_bias is None else fp.channel_vector(old_bias, channels),
            folded_rows,
            fp.channel_vector(new_bias, channels),
            dtype.numpy(),
            before=fp.Affine(columns(scale), columns(shift)),
            probe=fp.Affine(columns(statistics[1]), columns(statistics[0])) if follow_statistics else None,
        )

    # Standard-normal inputs (what verification feeds) and, in float16/bfloat16, the inputs the
    # BN was fitted to (float32 rounds too finely for them to matter).
    require_precise(lambda: probes(False), dtype)
    if fp.is_low_precision(dtype.numpy()) and np.any(statistics[1] > 0):
        require_precise(lambda: probes(True), dtype)


class FoldBnIntoConsumer(FoldRule):
    """``L(BatchNormalization(x))`` → ``L'(x)`` for L in Conv, Gemm, MatMul (or after a Flatten)."""

    def __init__(
        self, record: PassRecord, options: PassOptions, fresh: Callable[[str], str]
    ) -> None:
        # The BN stays while other consumers read it: it must not count as consumed by the match.
        super().__init__(record, options, fresh, remove_nodes=False)

    def refused_node(self, context: Any, normalized: ir.Value, **_: Any) -> ir.Node:
        # The match is rooted at the consumer; the site refused is the BatchNormalization.
        return normalized.producer()

    def pattern(self, op: Any, x: Any) -> Any:
        normalized = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["normalized"])

        def shape_op(value: Any) -> Any:
            return any_op(op, ROUTE_OPS)(value, _allow_other_inputs=True)

        features = _pattern.OrValue(
            [normalized, shape_op(normalized), shape_op(shape_op(normalized))],
            name="features",
            tag_var="route",
            tag_values=[0, 1, 2],
        )
        consumer = any_op(op, _CONSUMERS)
        return consumer(features, _allow_other_inputs=True, _outputs=["consumed"])

    def check(
        self,
        context: Any,
        x: ir.Value,
        normalized: ir.Value,
        features: ir.Value,
        route: int,
        consumed: ir.Value,
        **_: Any,
    ) -> MatchResult:
        bn, consumer = normalized.producer(), consumed.producer()
        chain: list[ir.Node] = []
        for _hop in range(route):
            chain.insert(0, (chain[0].inputs[0] if chain else features).producer())
        scale, shift, reads = self.read_batchnorm(context, bn)
        _check_readers(normalized)
        where = follow(chain, Route(1, 1), scale.size)
        _check_reduced_axis(consumer, features if chain else x, where)
        scale = fm.repeat_channels(scale, where.block)
        shift = fm.repeat_channels(shift, where.block)
        weight_value = consumer.inputs[1]
        weight = read_constant(weight_value, f"{consumer.op_type} weight", reads)
        if consumer.op_type == "Conv":
            folded = _fold_conv(consumer, weight, scale, shift, reads)
        elif consumer.op_type == "Gemm":
            folded = _fold_gemm(consumer, weight, scale, shift, reads)
        else:
            folded = _fold_matmul(consumer, weight, scale, shift)
        # The BN's statistics describe its input: the probes follow them.
        mean, std = batchnorm_statistics(bn, reads)
        statistics = (fm.repeat_channels(mean, where.block), fm.repeat_channels(std, where.block))
        _require_representable(consumer, weight, folded, scale, shift, statistics, reads)
        self._plan = _ConsumerFold(bn, consumer, chain, x, weight_value, folded, reads)
        return MatchResult()

    def rewrite(self, op: Any, **_: Any) -> ir.Value:
        plan: _ConsumerFold = self._plan
        bn, consumer, chain, x = plan.bn, plan.consumer, plan.chain, plan.x
        weight_value = plan.weight_value
        weight, bias, bias_value = plan.folded.weight, plan.folded.bias, plan.folded.bias_value
        freeze(plan.reads, self.record)
        self.record.site(bn.name, op=consumer.op_type, into=consumer.name, how="consumer")
        features = x
        for node in chain:  # the shape ops again, on the BN's input
            features = op.op(
                node.op_type, features, *node.inputs[1:], _name=node.name, **dict(node.attributes)
            )
        weight_dtype = tensor_dtype(weight_value)
        base = weight_value.name or consumer.name
        new_weight = initializer(op, weight, weight_dtype, self._fresh(f"{base}_folded"))
        bias_dtype = weight_dtype if bias_value is None else tensor_dtype(bias_value)
        # An unbiased op folded with a zero shift stays unbiased.
        new_bias = (
            initializer(op, bias, bias_dtype, self._fresh(f"{base}_folded_bias"))
            if bias_value is not None or np.any(bias)
            else None
        )
        attributes = dict(consumer.attributes)
        if consumer.op_type == "MatMul":
            product = op.MatMul(features, new_weight, _name=consumer.name)
            if new_bias is None:
                return product
            return op.Add(product, new_bias, _name=f"{consumer.name}/bias")
        if consumer.op_type == "Gemm":
            attributes.pop("beta", None)
        inputs = [features, new_weight] + ([] if new_bias is None else [new_bias])
        return op.op(consumer.op_type, *inputs, _name=consumer.name, **attributes)
