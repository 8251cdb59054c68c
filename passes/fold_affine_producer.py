"""fold-affine's rule: a constant per-channel Mul/Add/Sub/Div after a linear op folds into its weights.

Rule:
  1. For ``z = op(y, c)`` or ``z = op(c, y)`` with ``c`` a constant, ``op`` one of Mul, Add, Sub
     and (``c`` second only) Div, ``z = s·y + t`` elementwise (``Div(y, c) = y·(1/c)``,
     ``Sub(c, y) = −y + c``).
  2. When ``y`` comes from a Conv, ConvTranspose, Gemm or MatMul [+ bias Add] with constant
     weights (``_producer_site``) and ``c`` is *per channel* for it, ``z = L'(x)`` with
     ``W' = W·s`` along the output channels and ``b' = b·s + t``. Per channel means: aligned
     to the output's last axes the way broadcasting aligns it, ``c`` is 1 everywhere except along
     the channel axis (axis 1 for Conv/ConvTranspose/Gemm, the last axis for MatMul), where it
     has one value or one per channel. A ``[C]`` vector after a rank-4 Conv lies on the last
     spatial axis (even when ``W == C``) and is refused. A chain of such ops folds one at a time.
  3. Refused, with the reason: a constant that is not per channel, non-finite ``s`` or ``t``
     (division by zero), weights that are graph inputs (unless ``freeze_initializer_inputs``).

Not sites, and not reported: an op whose other operand is not a constant, a linear op whose
weight is not a constant (attention's ``MatMul(q, k)/sqrt(d)``), a linear op whose output
something else also reads (GELU's ``Div(x, √2)`` beside its ``Mul(x, …)``), and an ``Add``/``Sub``
right after a bare MatMul, which is that MatMul's bias. Arithmetic in
float64, cast once to the weights' dtype; new tensors are new initializers. Sites are recorded
as ``{"node": the Mul/Add/…, "into": the linear op, "how": its op type}``.
"""

from __future__ import annotations

__all__ = ["FoldAffineIntoProducer"]

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern as _pattern
from onnxscript.rewriter._basics import MatchResult

from normfold.math import batchnorm as fm
from normfold.passes.base import PassOptions, PassRecord
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    Reads,
    any_op,
    other_reader,
    read_constant,
    require_graph,
)
from normfold.passes._producer_site import (
    ProducerFold,
    ProducerFoldRule,
    fold_into_producer,
    linear_node,
    producer_pattern,
    read_producer,
)


class FoldAffineIntoProducer(ProducerFoldRule):
    """``op(L(x), c)`` (or ``op(c, L(x))``) → ``L'(x)`` for per-channel constant ``c``."""

    def __init__(
        self,
        record: PassRecord,
        options: PassOptions,
        fresh: Callable[[str], str],
        *,
        ops: frozenset[str],
        constant_first: bool,
    ) -> None:
        super().__init__(record, options, fresh, remove_nodes=False)
        order = "first" if constant_first else "second"
        self.name = f"{type(self).__name__}[{'|'.join(sorted(ops))}, constant {order}]"
        self._ops = ops
        self._constant_first = constant_first

    def pattern(self, op: Any, x: Any) -> Any:
        # Add/Sub after a bare MatMul is that MatMul's bias, not a fold site.
        produced = producer_pattern(op, x, bare_matmul=not self._ops & {"Add", "Sub"})
        operands = (
            [_pattern.ANY_VALUE, produced]
            if self._constant_first
            else [produced, _pattern.ANY_VALUE]
        )
        return any_op(op, self._ops)(*operands, _outputs=["affine"])

    def check(
        self, context: Any, affine: ir.Value, produced: ir.Value, producer: str, **_: Any
    ) -> MatchResult:
        node = affine.producer()
        constant_value = node.inputs[0 if self._constant_first else 1]
        linear = linear_node(producer, produced)
        weight_value = linear.inputs[1]
        # A site is a constant applied to the only use of a linear op with a constant weight.
        # Attention's MatMul(q, k)/sqrt(d), a gate Mul(conv, x) or GELU's Div(x, √2) beside its
        # Mul(x, …) are other computations, not post-scales worth a refusal: no site at all.
        if not (
            constant_value.const_value is not None
            and weight_value is not None
            and weight_value.const_value is not None
            and other_reader(produced, {node}) is None
            and other_reader(linear.outputs[0], {produced.producer(), node}) is None
        ):
            return MatchResult().fail("not a constant per-channel map of a linear op's only output")
        reads = Reads(self.options.freeze_initializer_inputs)
        require_graph(context)
        constant = read_constant(constant_value, f"{node.op_type} constant", reads)
        site = read_producer(producer, produced, node, reads)
        rank, axis = site.rank, site.channel_axis
        if rank is None:
            if constant.ndim > 1:
                raise Refusal(f"the rank of {site.label}'s output is unknown")
            rank, axis = 1, 0  # a scalar or [N] lies on the last axis, MatMul's feature axis
        vector = fm.per_channel(constant, rank, axis, site.channels, of=site.label)
        scale, shift = fm.affine_of_binary(node.op_type, vector, self._constant_first)
        weight, bias = fold_into_producer(site, scale, shift)
        self._plan = ProducerFold(node, site, weight, bias, reads, how=node.op_type)
        return MatchResult()
