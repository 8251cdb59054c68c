"""Segments: what removing a run of activation sites turns into, and what that costs.

A *segment* is the connected part of the graph that is linear once a run of sites is removed:
starting from the run's sites, every neighbour (input or reader) that merging sees through or
merges (Conv, Linear, BatchNorm, linearized activations, Identity/Dropout, a residual Add, a
global average pool, flatten) joins it; every other op (an activation that stays, a MaxPool, the
model's input or output) bounds it, and so does a value several ops read (the residual stream
between blocks), which no merge can absorb: it is the segment's input or output. Removing the run merges the segment into as few ops as the
rules of :mod:`.rewrite` allow — an inverted residual ``pw → dw → pw (+ x)`` into one dense k×k
conv, a residual block ``conv → conv + shortcut`` into one conv — so a candidate is judged by the
cost of that *final* form against the segment as it is now (its sites still nonlinear), never by
its first pairwise merge (a 1×1 expansion merged into a depthwise conv alone grows ×6; with the
projection after it the block shrinks).

:func:`segment` finds the nodes; :func:`extract` copies them into a GraphModule of their own
(external inputs become placeholders, values read outside become outputs), which is merged,
counted and timed on its own: the merges of a segment never reach outside it, so its cost before
and after is the model's cost difference. :func:`signature` keys the latency table: segments of
the same structure and shapes are timed once.
"""

from __future__ import annotations

__all__ = ["Form", "Segment", "extract", "merges_through", "segment", "signature", "timing"]

import copy
import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import torch
from torch import fx

from normfold.latency import LatencyTable, Timing
from normfold.torch.layer_collapse.cost import onnx_of
from normfold.torch.layer_collapse.graph import (
    is_add,
    is_conv,
    is_elementwise_linear,
    is_flatten,
    is_global_pool,
    is_linear,
    module_of,
)
from normfold.torch.layer_collapse.rewrite import shape_of


@dataclasses.dataclass(frozen=True)
class Form:
    """A segment merged as far as the rules go: its Conv/Linear calls, MACs per sample, latency."""

    layers: int
    macs: int
    latency: Timing | None = None

    def to_dict(self) -> dict[str, object]:
        return {"layers": self.layers, "macs": self.macs,
                "latency": None if self.latency is None else self.latency.to_dict()}


@dataclasses.dataclass(frozen=True)
class Segment:
    """A segment's nodes (graph order), merged as it is now (``before``) and after the removal."""

    nodes: list[str]
    before: Form
    after: Form

    @property
    def growth(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else float("inf")

    @property
    def saving_ms(self) -> float | None:
        if self.before.latency is None or self.after.latency is None:
            return None
        return self.before.latency.median - self.after.latency.median

    @property
    def shrinks(self) -> bool:
        """Whether the removal loses layers or MACs."""
        return self.after.layers < self.before.layers or self.after.macs < self.before.macs

    def to_dict(self) -> dict[str, object]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}


def merges_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an op a segment extends through (merged, folded or seen through)."""
    return (
        is_conv(gm, node) or is_linear(gm, node) or is_elementwise_linear(gm, node) or is_add(node)
        or is_global_pool(gm, node) or is_flatten(gm, node)
    )


def segment(gm: fx.GraphModule, sites: Iterable[str], *, start: str | None = None) -> list[fx.Node]:
    """The nodes of the segment around ``sites`` (taken as linear), in graph order.

    With ``start``, only the part reached from that one site (to check that a run is connected).
    """
    removed = set(sites)
    by_name = {n.name: n for n in gm.graph.nodes}
    inside: set[fx.Node] = set()
    stack = [by_name[name] for name in ([start] if start is not None else removed)]
    while stack:
        node = stack.pop()
        if node in inside:
            continue
        inside.add(node)
        site = node.name in removed
        # A value several ops read (a residual stream) is an input of the segment, never merged:
        # the segment stops there, except at its own sites.
        inputs = [a for a in node.all_input_nodes if site or len(a.users) == 1 or a.name in removed]
        readers = [u for u in node.users if site or len(node.users) == 1 or u.name in removed]
        for other in inputs + readers:
            if other not in inside and (other.name in removed or merges_through(gm, other)):
                stack.append(other)
    return [n for n in gm.graph.nodes if n in inside]


def extract(gm: fx.GraphModule, names: Sequence[str]) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The nodes ``names`` of ``gm`` as a GraphModule of their own, and batch-1 inputs for it.

    Shapes come from the last :func:`.rewrite.record_shapes` run on ``gm`` (batch dimension set to 1).
    """
    wanted = set(names)
    nodes = [n for n in gm.graph.nodes if n.name in wanted]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[torch.Tensor] = []
    like = next((p for p in gm.parameters() if p.is_floating_point()), torch.zeros(()))
    for node in nodes:
        for source in node.all_input_nodes:
            if source not in env and source.name not in wanted:
                placeholder = graph.placeholder(f"in_{source.name}")
                placeholder.meta.update(source.meta)
                env[source] = placeholder
                shape = (1,) + tuple(shape_of(source)[1:])
                inputs.append(torch.randn(shape, dtype=like.dtype, device=like.device))
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [env[n] for n in nodes if any(u.name not in wanted for u in n.users)]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    module = fx.GraphModule(gm, graph, "Segment")
    return module, tuple(inputs)


def signature(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> tuple:
    """What a segment's latency depends on: its ops with their shapes and settings, its input shapes."""
    parts: list[tuple] = [tuple(tuple(x.shape) for x in inputs)]
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if module is None:
            target = getattr(node.target, "__name__", str(node.target))
            parts.append((node.op, target, tuple(a.name if isinstance(a, fx.Node) else repr(a) for a in node.args)))
            continue
        settings = tuple(
            (key, tuple(value) if isinstance(value, list) else value)
            for key in ("stride", "padding", "dilation", "groups", "axis")
            if isinstance(value := getattr(module, key, None), (int, tuple, list, str))
        )
        shapes = tuple(tuple(p.shape) for p in module.parameters(recurse=False))
        parts.append((type(module).__name__, shapes, settings,
                      tuple(a.name if isinstance(a, fx.Node) else repr(a) for a in node.args)))
    return tuple(parts)


def timing(table: LatencyTable, module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Timing:
    """The batch-1 onnxruntime latency of ``module`` on ``inputs``, from ``table`` or measured into it."""
    inputs = tuple(x.float() if x.is_floating_point() else x for x in inputs)

    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        model = onnx_of(copy.deepcopy(module).float(), inputs)
        names = [i.name for i in model.graph.input]
        return model, {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}

    return table.get(signature(module, inputs), build)
