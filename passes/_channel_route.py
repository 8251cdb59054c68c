"""Where a tensor's channels go through a chain of shape ops (Flatten, Reshape, Transpose, …).

A per-channel affine map (a BatchNormalization) commutes with a shape op exactly when every
element keeps its channel: the folds through shape chains (``fold_bn_producer_route``, and the
consumer fold's Flatten/Reshape route) ask this module where channel ``c`` of an axis ends up.

The state is ``(axis, block)``: along ``axis`` the index is ``c·block + j`` with ``j < block``
(``block`` is 1 when the axis holds exactly the channels). Rules (the arithmetic is
:mod:`normfold.math.channel_route`), ``S`` the number of elements after channel ``c``
(``block`` times the sizes after ``axis``):

* **Transpose** moves the axis to its place in ``perm``; ``block`` stays.
* **Flatten, Reshape, Squeeze, Unsqueeze** keep the row-major order. The channel lands on output
  axis ``b`` when ``T = Π out[b+1:]`` divides ``S`` and ``out[b] = C·S/T``: then the index on
  ``b`` is ``c·(S/T) + j'``, and no other output axis depends on ``c`` (the elements before
  channel ``c`` fill the same prefix on both sides, as the totals are equal). The sizes after
  the channel axis, on both sides, and ``C`` must be static; sizes before it may be symbolic
  (the batch). Anything else — the channels split over several axes, merged with an axis before
  them, or sizes that are unknown — is refused with the reason.

Shapes come from the graph (``infer_shapes`` records them); a Reshape with a constant,
fully specified target shape needs none.
"""

from __future__ import annotations

__all__ = ["ROUTE_OPS", "Route", "follow"]

import dataclasses

import onnx_ir as ir

from normfold.math import channel_route as cr

from normfold.errors import Refusal
from normfold.passes._fold_graph import attribute, describe

ROUTE_OPS = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


@dataclasses.dataclass(frozen=True)
class Route:
    """Channel ``c`` sits at index ``c·block + j`` (``j < block``) of ``axis``."""

    axis: int
    block: int


def _dims(value: ir.Value) -> list[int | None] | None:
    """``value``'s sizes (None where symbolic), or None when even its rank is unknown."""
    if value.shape is not None:
        return [d if isinstance(d, int) else None for d in value.shape]
    node = value.producer()
    if node is not None and node.op_type == "Reshape" and node.inputs[1] is not None:
        target = node.inputs[1].const_value
        if target is not None:
            sizes = [int(d) for d in target.numpy().reshape(-1)]
            if all(d > 0 for d in sizes):
                return list(sizes)
    return None


def _step(node: ir.Node, route: Route, channels: int) -> Route:
    """Where the channels are after ``node`` (one of :data:`ROUTE_OPS`)."""
    source, result = node.inputs[0], node.outputs[0]
    ins = _dims(source)
    if node.op_type == "Transpose":
        perm = attribute(node, "perm", None)
        if perm is None:
            if ins is None:
                raise Refusal(f"the rank before {describe(node)} is unknown")
            perm = list(reversed(range(len(ins))))
        return Route(cr.transpose_route(perm, route.axis), route.block)
    outs = _dims(result)
    if node.op_type == "Flatten" and ins is not None:
        # Exporters often record Flatten's output sizes as symbolic: work them out.
        computed = cr.flatten_sizes(ins, attribute(node, "axis", 1))
        outs = computed if outs is None or len(outs) != 2 else [
            recorded if recorded is not None else mine for recorded, mine in zip(outs, computed)
        ]
    if ins is None or outs is None:
        raise Refusal(
            f"the shapes around {describe(node)} are unknown, so where the channels go is unknown"
        )
    try:
        return Route(*cr.reshape_route(ins, outs, route.axis, route.block, channels))
    except ValueError as error:
        raise Refusal(f"{describe(node)}: {error}") from None


def follow(nodes: list[ir.Node], route: Route, channels: int) -> Route:
    """The route of ``channels`` channels after ``nodes`` (in data-flow order), or Refusal."""
    for node in nodes:
        route = _step(node, route, channels)
    return route
