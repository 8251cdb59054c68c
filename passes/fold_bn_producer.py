"""Rule: fold a BatchNormalization into the linear op that produces its input.

For ``z = BatchNormalization(y, γ, β, μ, σ²)`` with ``y = L(x)`` and ``L`` one of Conv,
ConvTranspose, Gemm, MatMul + bias Add or bare MatMul (see ``_producer_site``):

    z = s·y + t,   s = γ/sqrt(σ² + ε),   t = β − μ·s     (per channel, axis 1 of y)
    ⇒ z = L'(x) with W' = W·s along L's output channels and b' = b·s + t

The rewrite is exact and emits ``L'`` with new initializers (float64 arithmetic, cast once to
the weights' dtype; the old tensors stay for any other reader). A bare MatMul becomes MatMul +
Add. The site is refused, with the reason recorded against the BN, when:

1. the BN is not the inference form: more than one output, ``training_mode=1``, opset-7
   ``spatial=0``, a statistic with ``var + eps <= 0``;
2. a BN parameter or the producer's weight/bias is not a constant, or is a graph input (unless
   ``freeze_initializer_inputs``: then the input is removed and a note says so);
3. another node or the graph output also reads ``y`` (it needs the unnormalized values);
4. the BN's channels are not the producer's output channels: a MatMul output of rank > 2 has
   its features on the last axis while BN normalizes axis 1; channel counts that differ.
"""

from __future__ import annotations

__all__ = ["FoldBnIntoProducer"]

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from normfold.passes.base import PassOptions, PassRecord
from normfold.errors import Refusal
from normfold.passes._fold_graph import batchnorm_statistics
from normfold.passes._producer_site import (
    ProducerFold,
    ProducerFoldRule,
    fold_into_producer,
    producer_pattern,
    read_producer,
)
from onnxscript.rewriter._basics import MatchResult


class FoldBnIntoProducer(ProducerFoldRule):
    """``BatchNormalization(L(x))`` → ``L'(x)`` for L in Conv, ConvTranspose, Gemm, MatMul."""

    def __init__(
        self, record: PassRecord, options: PassOptions, fresh: Callable[[str], str]
    ) -> None:
        # The matcher's own "intermediate value has other readers" test would refuse silently;
        # check() tests it and says which reader it is.
        super().__init__(record, options, fresh, remove_nodes=False)

    def pattern(self, op: Any, x: Any) -> Any:
        return op.BatchNormalization(
            producer_pattern(op, x), _allow_other_inputs=True, _outputs=["normalized"]
        )

    def check(
        self, context: Any, normalized: ir.Value, produced: ir.Value, producer: str, **_: Any
    ) -> MatchResult:
        bn = normalized.producer()
        scale, shift, reads = self.read_batchnorm(context, bn)
        site = read_producer(producer, produced, bn, reads)
        if site.channel_axis != 1:
            raise Refusal(
                f"{site.label} output has its features on axis {site.channel_axis} "
                f"(rank {site.rank}), but BatchNormalization normalizes axis 1"
                if site.rank is not None
                else f"the rank of {site.label}'s output is unknown"
            )
        if site.channels != scale.size:
            raise Refusal(
                f"the BatchNormalization has {scale.size} channels, "
                f"{site.label} produces {site.channels}"
            )
        weight, bias = fold_into_producer(site, scale, shift, batchnorm_statistics(bn, reads))
        self._plan = ProducerFold(bn, site, weight, bias, reads, how="producer")
        return MatchResult()
