"""Rule: fold a BatchNormalization into the linear op before it, through a chain of shape ops.

For ``z = BatchNormalization(R(y))`` with ``y = L(x)`` (``L`` a Conv, ConvTranspose, Gemm,
MatMul + bias Add or bare MatMul, as in ``fold_bn_producer``) and ``R`` a chain of Flatten,
Reshape, Transpose, Squeeze and Unsqueeze nodes: when ``R`` carries ``L``'s output channels,
unmerged, onto axis 1 (the BN's channel axis; see ``_channel_route``), the BN's per-channel
``s·v + t`` is the same map on ``y``'s channels, so

    z = R(L'(x))   with L' = L folded with (s, t)    (W' = W·s, b' = b·s + t)

exactly. This is timm LeViT's ``LinearNorm`` — ``bn(linear(x).flatten(0, 1)).reshape_as(...)``,
exported as ``MatMul → Flatten(axis=2) | Reshape(-1, C) → BatchNormalization`` — and every
"BN on tokens" block. The rewrite emits ``L'`` with new initializers (float64, cast once) and a
copy of the chain on it; the original nodes stay while anything else reads them.

Refused, with the reason recorded against the BN: the chain does not carry the channels to
axis 1 exactly (they are merged with other axes, split, or the sizes after them are not
static), the BN is not the inference form or a parameter is not a constant, or a value of the
chain is read by another node. A ``Shape`` (or ``Size``) node may read ``y`` and the chain's
values — TorchScript's ``reshape_as(y)`` does — since the fold keeps every shape; after the
rules run, :meth:`FoldBnThroughShapes.after_sweep` points those readers at the new
values, so the original ``L`` is not kept alive just for its shape.
"""

from __future__ import annotations

__all__ = ["FoldBnThroughShapes"]

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter._basics import MatchResult

from normfold.passes._channel_route import ROUTE_OPS, Route, follow
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    any_op,
    batchnorm_statistics,
    describe,
    freeze,
)
from normfold.passes._producer_site import (
    ProducerFold,
    ProducerFoldRule,
    emit_producer,
    fold_into_producer,
    read_producer,
)
from normfold.passes.base import PassOptions, PassRecord

_SHAPE_READERS = frozenset({"Shape", "Size"})
_LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _shape_readers(value: ir.Value) -> set[ir.Node]:
    return {user for user, _ in value.uses() if user.op_type in _SHAPE_READERS}


def _kind(node: ir.Node | None) -> str | None:
    """The producer form (``_producer_site`` kinds) that ``node``'s output is, or None."""
    if node is None or node.domain != "":
        return None
    if node.op_type in _LINEAR:
        return node.op_type
    if node.op_type == "Add":
        for index, kind in ((0, "MatMul+Add"), (1, "Add+MatMul")):
            inner = node.inputs[index].producer() if node.inputs[index] is not None else None
            if inner is not None and inner.op_type == "MatMul" and inner.domain == "":
                return kind
    return None


@dataclasses.dataclass(frozen=True)
class _RoutedFold(ProducerFold):
    """A producer fold through the shape ops ``chain``, which read the producer's ``produced``."""

    chain: list[ir.Node]
    produced: ir.Value


class FoldBnThroughShapes(ProducerFoldRule):
    """``BatchNormalization(R(L(x)))`` → ``R(L'(x))`` for a channel-keeping shape chain ``R``."""

    def __init__(
        self, record: PassRecord, options: PassOptions, fresh: Callable[[str], str]
    ) -> None:
        super().__init__(record, options, fresh, remove_nodes=False)
        # (old producer output, new one): their Shape readers are moved after the rules run.
        self._moved: list[tuple[ir.Value, ir.Value]] = []

    def pattern(self, op: Any, x: Any) -> Any:
        routed = any_op(op, ROUTE_OPS)(x, _allow_other_inputs=True, _outputs=["routed"])
        return op.BatchNormalization(routed, _allow_other_inputs=True, _outputs=["normalized"])

    def check(self, context: Any, normalized: ir.Value, routed: ir.Value, **_: Any) -> MatchResult:
        bn = normalized.producer()
        scale, shift, reads = self.read_batchnorm(context, bn)
        chain, produced = self._chain(routed, bn)
        kind = _kind(produced.producer())
        if kind is None:
            raise Refusal(
                f"nothing to fold into: the shape ops {', '.join(describe(n) for n in chain)} "
                f"read {describe(produced.producer()) if produced.producer() else 'a graph input'}, "
                "not a Conv, ConvTranspose, Gemm or MatMul"
            )
        site = read_producer(kind, produced, chain[0], reads,
                             allowed=_shape_readers(produced))
        if site.channel_axis is None:
            raise Refusal(f"the rank of {site.label}'s output is unknown")
        route = follow(chain, Route(site.channel_axis, 1), site.channels)
        if route != Route(1, 1):
            raise Refusal(
                f"the shape ops carry {site.label}'s channels to axis {route.axis}"
                + (f" (each repeated over {route.block} features)" if route.block != 1 else "")
                + ", but BatchNormalization normalizes axis 1"
            )
        if site.channels != scale.size:
            raise Refusal(
                f"the BatchNormalization has {scale.size} channels, "
                f"{site.label} produces {site.channels}"
            )
        weight, bias = fold_into_producer(site, scale, shift, batchnorm_statistics(bn, reads))
        self._plan = _RoutedFold(bn, site, weight, bias, reads, "producer-route", chain, produced)
        return MatchResult()

    @staticmethod
    def _chain(routed: ir.Value, bn: ir.Node) -> tuple[list[ir.Node], ir.Value]:
        """The shape ops from the producer's output to ``routed`` (data-flow order) and that
        output; each value on the way may be read only by the next op (and shape readers)."""
        chain: list[ir.Node] = []
        value, reader = routed, bn
        while (node := value.producer()) is not None and node.op_type in ROUTE_OPS \
                and node.domain == "":
            others = [u for u, _ in value.uses() if u is not reader and u.op_type not in _SHAPE_READERS]
            if value.is_graph_output() or others:
                who = "the graph output" if value.is_graph_output() else describe(others[0])
                raise Refusal(f"{describe(node)} output '{value.name}' is also read by {who}")
            chain.insert(0, node)
            value, reader = node.inputs[0], node
        return chain, value

    def rewrite(self, op: Any, **_: Any) -> ir.Value:
        plan = self._plan
        freeze(plan.reads, self.record)
        self.record.site(plan.node.name, op=plan.site.kind, into=plan.site.node.name, how=plan.how,
                         through=[n.op_type for n in plan.chain])
        value = emit_producer(op, plan.site, plan.weight, plan.bias, self._fresh)
        self._moved.append((plan.produced, value))
        for node in plan.chain:
            old = node.outputs[0]
            value = op.op(node.op_type, value, *node.inputs[1:], _name=node.name,
                          **dict(node.attributes))
            self._moved.append((old, value))
        return value

    def after_sweep(self, model: ir.Model) -> None:
        """Point the Shape/Size readers of replaced values at their replacements, drop the
        originals nobody reads any more, and re-sort (a Shape node may come before the new
        nodes)."""
        moved, self._moved = self._moved, []
        if not moved:
            return
        for old, new in moved:
            for user, index in list(old.uses()):
                if user.op_type in _SHAPE_READERS:
                    user.replace_input_with(index, new)
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
