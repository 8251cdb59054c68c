"""Rewrite normalizations written inline in a torch.fx graph into one ``F.layer_norm`` /
``F.rms_norm`` / ``F.group_norm`` call each.

The rule, for a module ``M`` (deep-copied and traced with ``torch.fx.symbolic_trace``; a
``GraphModule`` is deep-copied as it is; ``M`` itself is never changed):

1. The sites are the inline LayerNorm, RMSNorm and GroupNorm computations that
   :func:`normfold.torch._norm_patterns.find_sites` finds with torch.fx's ``SubgraphMatcher``
   (its docstring lists the spellings) and checks: literal dims that are the trailing dims
   counted from the end (GroupNorm: the last dim of ``x.view(n, groups, -1)``), ``keepdim=True``,
   a biased variance, a non-negative literal eps, no intermediate read elsewhere. Near misses
   (unbiased variance, eps on the standard deviation, a channels-first norm over dim 1, ...)
   are refused with the reason.
2. An affine ``y * w (+ b)`` after a site joins it when ``w`` and ``b`` evaluate, from
   parameters and literals alone, to tensors of the normalized shape (GroupNorm: ``[C]``,
   viewed as ``(1, C, 1, ...)``). A bare parameter is reused; an expression (Gemma's ``1 + w``)
   is evaluated once, as the model evaluates it on every call, into a new parameter
   ``<name>_folded``. An affine that does not join stays in the graph after the fused call and
   the report says why (``kept``); a GroupNorm needs its affine (without a ``[C]`` weight the
   channel count, which F.group_norm needs divisible by the groups, is unknown).
3. The site's output becomes ``F.op(x, shape, weight=..., bias=..., eps=eps)``, eps carried
   over exactly, ``shape`` the weight's shape or, without a weight, ``x.shape[-k:]``; for
   GroupNorm ``F.group_norm(x, groups, ...)``. When the site casts to float32 inside (a half
   precision model's upcast), the call may instead run on ``x.to(torch.float32)``, cast back to
   ``x.dtype`` or not: the first of the forms plain, float32, float32-and-back that passes 4 is
   used.
4. A rewrite is made only if it computes what the site computes: the site's subgraph
   (everything its output is computed from, up to x) and the replacement run on the probes of
   :mod:`normfold.torch._norm_probes`, in float64 and in the model's dtype (the dtype of the
   site's parameters, else of the module's). A site no form of which passes is refused with the
   reason, and its nodes stay as they were.
5. Nodes of a replaced site that nothing reads any more are removed; nothing else changes.

Every site is reported in a :class:`~normfold.torch.fuse_norms.FuseNormsReport` whose entries
name the fx node of the site's output: ``{"node", "as"[, "kept"]}`` or ``{"node", "reason"}``.
"""

from __future__ import annotations

__all__ = ["fuse_norm_calls", "fuse_norm_calls_with_report"]

import builtins
import copy
import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from normfold.errors import InputError, Refusal, first_line
from normfold.torch._norm_patterns import (
    Affine,
    Site,
    closure,
    find_sites,
    is_float32_cast,
)
from normfold.torch._norm_probes import base_probes, require_match
from normfold.torch.fuse_norms import FuseNormsReport

_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "layer_norm": F.layer_norm, "rms_norm": F.rms_norm, "group_norm": F.group_norm,
}
# Probe sizes for normalized dims no weight pins down, and for GroupNorm's spatial dims.
_FREE_DIMS = (4, 5, 6, 7)
_SPATIAL = ((3, 4, 2), (5, 2, 3))


def fuse_norm_calls(module: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """``module`` traced, with its inline normalizations rewritten into F. calls (see module doc)."""
    return fuse_norm_calls_with_report(module, concrete_args)[0]


def fuse_norm_calls_with_report(
    module: nn.Module, concrete_args: dict[str, Any] | None = None
) -> tuple[fx.GraphModule, FuseNormsReport]:
    """:func:`fuse_norm_calls` and the report of every site, replaced or refused with its reason.

    ``concrete_args`` is passed to ``torch.fx.symbolic_trace``. Raises :class:`InputError` if
    torch.fx cannot trace ``module``.
    """
    gm = _traced(module, concrete_args)
    report = FuseNormsReport()
    positions = {node: i for i, node in enumerate(gm.graph.nodes)}
    rewrites = []
    for site in find_sites(gm.graph):
        try:
            decided = _decide(gm, site, positions)
        except Refusal as refusal:
            report.refuse(refusal, node=site.outputs[0].name)
            continue
        entry = {"node": decided.outputs[0].name, "as": decided.call.describe()}
        if decided.kept:
            entry["kept"] = decided.kept
        report.replaced.append(entry)
        rewrites.append(decided)
    replaced: dict[fx.Node, fx.Node] = {}
    for rewrite in rewrites:
        rewrite.apply(gm, replaced)
    gm.graph.lint()
    gm.recompile()
    return gm, report


def _traced(module: nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse_norm_calls takes a torch.nn.Module, not {type(module).__name__}")
    if isinstance(module, fx.GraphModule):
        return copy.deepcopy(module)
    try:
        return fx.symbolic_trace(copy.deepcopy(module), concrete_args=concrete_args)
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
        raise InputError(
            f"torch.fx cannot trace {type(module).__name__}: {type(error).__name__}: {first_line(error)}"
        ) from error


@dataclasses.dataclass(frozen=True)
class _Call:
    """The F. call that replaces a site: ``shape`` is the normalized shape, the number of
    trailing dims read from ``x.shape`` (an int), or for GroupNorm the number of groups."""

    kind: str
    shape: tuple[int, ...] | int
    eps: float
    upcast: bool = False
    cast_back: bool = False

    def emit(self, graph: fx.Graph, x: fx.Node, weight: fx.Node | None, bias: fx.Node | None) -> fx.Node:
        """Insert the call (at the graph's insertion point) and return its output node."""
        if self.upcast:
            x_in, weight, bias = (
                None if v is None else graph.call_method("to", (v, torch.float32)) for v in (x, weight, bias)
            )
        else:
            x_in = x
        kwargs: dict[str, Any] = {"weight": weight}
        if self.kind != "rms_norm":
            kwargs["bias"] = bias
        kwargs["eps"] = self.eps
        shape: Any = self.shape
        if self.kind != "group_norm" and isinstance(shape, int):
            sizes = graph.call_function(builtins.getattr, (x, "shape"))
            shape = graph.call_function(operator.getitem, (sizes, slice(-self.shape, None)))
        out = graph.call_function(_OPS[self.kind], (x_in, shape), kwargs)
        if self.cast_back:
            out = graph.call_method("to", (out, graph.call_function(builtins.getattr, (x, "dtype"))))
        return out

    def describe(self) -> str:
        if self.kind == "group_norm":
            what = f"F.group_norm({self.shape}, eps={self.eps!r})"
        elif isinstance(self.shape, int):
            what = f"F.{self.kind}(x.shape[-{self.shape}:], eps={self.eps!r})"
        else:
            what = f"F.{self.kind}({list(self.shape)}, eps={self.eps!r})"
        if self.upcast:
            what += " on x.to(torch.float32)" + (", cast back to x.dtype" if self.cast_back else "")
        return what


@dataclasses.dataclass
class _Param:
    """A weight or bias of the F. call: an existing attribute (``target``) or a new one."""

    value: torch.Tensor
    target: str | None
    source: str  # the attribute a new one is named after


@dataclasses.dataclass
class _Rewrite:
    """A verified rewrite: ``outputs`` become ``call``'s output, and the nodes of the site's
    subgraph (``nodes``) that nothing reads any more are removed."""

    site: Site
    call: _Call
    outputs: list[fx.Node]
    nodes: list[fx.Node]
    weight: _Param | None
    bias: _Param | None
    kept: str

    def apply(self, gm: fx.GraphModule, replaced: dict[fx.Node, fx.Node]) -> None:
        x = replaced.get(self.site.x[0], self.site.x[0])
        first = next(node for node in gm.graph.nodes if node in self.outputs)
        with gm.graph.inserting_before(first):
            weight, bias = (
                None if p is None else gm.graph.get_attr(_attribute(gm, p)) for p in (self.weight, self.bias)
            )
            new = self.call.emit(gm.graph, x, weight, bias)
        for out in self.outputs:
            out.replace_all_uses_with(new)
            replaced[out] = new
        for node in reversed(self.nodes):
            if not node.users and node.op in ("call_function", "call_method", "get_attr"):
                gm.graph.erase_node(node)


def _attribute(gm: fx.GraphModule, param: _Param) -> str:
    """The attribute of ``gm`` that holds ``param``, registered as a new parameter if need be."""
    if param.target is not None:
        return param.target
    base = param.source.replace(".", "_") + "_folded"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_parameter(name, nn.Parameter(param.value.detach().clone()))
    param.target = name
    return name


def _decide(gm: fx.GraphModule, site: Site, positions: dict[fx.Node, int]) -> _Rewrite:
    """The verified rewrite of ``site`` with the longest affine that joins; raises
    :class:`Refusal` saying why when there is none."""
    if site.refusal is not None:
        raise site.refusal
    kept: list[str] = []
    for affine in (*site.affines, None):
        try:
            attempt = _attempt(gm, site, affine, positions)
        except Refusal as why:
            if affine is not None:
                kept.append(f"`{affine.outputs[0].name}`: {why.reason}")
                continue
            if kept:
                raise Refusal(f"{why.reason} (with an affine: {'; '.join(kept)})") from None
            raise
        attempt.kept = "; ".join(kept)
        return attempt
    raise AssertionError("unreachable: the last attempt has no affine")


def _attempt(
    gm: fx.GraphModule, site: Site, affine: Affine | None, positions: dict[fx.Node, int]
) -> _Rewrite:
    """The rewrite of ``site`` with ``affine`` (None: the core alone) if it passes the probes;
    raises :class:`Refusal` saying why when it does not."""
    assert site.eps is not None
    weight, bias = _params(gm, site, affine, positions)
    if site.kind == "group_norm" and weight is None:
        raise Refusal("without a [C] weight the channel count is not in the graph, and F.group_norm needs it "
                      "divisible by the groups (the hand-written view groups any C * H * W)")
    outputs, nodes = (site.outputs, site.nodes) if affine is None else (affine.outputs, affine.nodes)
    original = _subgraph(gm, nodes, set(site.x), outputs[0])
    shapes, normalized_ndim, call_shape = _probe_shapes(site, weight)
    probes = base_probes(shapes, normalized_ndim)
    dtype = _model_dtype(gm, nodes)
    forms = [(False, False)]
    if any(is_float32_cast(node) for node in nodes):
        forms += [(True, False), (True, True)]
    failure = None
    for upcast, cast_back in forms:
        call = _Call(site.kind, call_shape, site.eps, upcast, cast_back)
        try:
            require_match(original, _replacement(call, weight, bias), probes, site.eps, dtype)
        except Refusal as why:
            failure = failure or why.reason
            continue
        return _Rewrite(site, call, outputs, nodes, weight, bias, kept="")
    raise Refusal(f"outputs differ from F.{site.kind}{'' if affine is None else ' with this affine'}: {failure}")


def _params(
    gm: fx.GraphModule, site: Site, affine: Affine | None, positions: dict[fx.Node, int]
) -> tuple[_Param | None, _Param | None]:
    """The F. call's weight and bias from ``affine``; raises :class:`Refusal` saying why when
    the affine cannot join."""
    if affine is None:
        return None, None
    if affine.refusal is not None:
        raise affine.refusal
    found = []
    for node in (affine.weight, affine.bias):
        if node is None:
            found.append(None)
            continue
        value = _evaluate(gm, node, positions)
        found.append(_Param(value, node.target if node.op == "get_attr" else None, _source(node, positions)))
    weight, bias = found
    assert weight is not None
    shape = tuple(weight.value.shape)
    if site.kind == "group_norm":
        if len(shape) != 1 or affine.channels not in (None, shape[0]):
            raise Refusal(f"weight shape {list(shape)} is not [C] as written in its view")
    elif len(shape) != site.dims:
        last = "the last dim" if site.dims == 1 else f"the last {site.dims} dims"
        raise Refusal(f"weight shape {list(shape)} is not the normalized shape ({last})")
    if bias is not None and tuple(bias.value.shape) != shape:
        raise Refusal(f"bias shape {list(bias.value.shape)} != weight shape {list(shape)}")
    return weight, bias


def _evaluate(gm: fx.GraphModule, node: fx.Node, positions: dict[fx.Node, int]) -> torch.Tensor:
    """The value of ``node``, computed from parameters and literals as the model computes it;
    raises :class:`Refusal` when it is not a floating-point tensor computed from those alone."""
    module = _subgraph(gm, closure([node], set(), positions), set(), node)
    with torch.no_grad():
        value = module()
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise Refusal(f"`{node.name}` is not a floating-point tensor")
    return value


def _source(node: fx.Node, positions: dict[fx.Node, int]) -> str:
    attributes = [n.target for n in closure([node], set(), positions) if n.op == "get_attr"]
    return attributes[0] if attributes else node.name


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], cut: set[fx.Node], output: fx.Node) -> fx.GraphModule:
    """A module computing ``output`` from one input (standing for every node of ``cut``) and
    ``gm``'s attributes, by copying ``nodes``; raises :class:`Refusal` when it would read
    something else."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if cut:
        x = graph.placeholder("x")
        env.update(dict.fromkeys(cut, x))
    for node in nodes:
        if node.op not in ("call_function", "call_method", "get_attr"):
            raise Refusal(
                f"`{output.name}` is also computed from `{node.name}` ({node.op}), not only from x and parameters"
            )
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    return fx.GraphModule(gm, graph)


def _replacement(call: _Call, weight: _Param | None, bias: _Param | None) -> fx.GraphModule:
    root = nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = []
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            root.register_buffer(name, param.value.detach())
        nodes.append(None if param is None else graph.get_attr(name))
    graph.output(call.emit(graph, x, *nodes))
    return fx.GraphModule(root, graph)


def _probe_shapes(site: Site, weight: _Param | None) -> tuple[list[tuple[int, ...]], int, tuple[int, ...] | int]:
    """Probe shapes, how many trailing dims each normalizes, and the F. call's shape argument."""
    if site.kind == "group_norm":
        rank = site.rank
        assert weight is not None and rank is not None  # a GroupNorm affine joins only over a known rank
        channels = weight.value.shape[0]
        shapes = [(2, channels, *_SPATIAL[0][: rank - 2]), (1, channels, *_SPATIAL[1][: rank - 2])]
        return shapes, rank - 1, site.groups
    normalized = tuple(weight.value.shape) if weight is not None else _FREE_DIMS[: site.dims]
    shapes = [(2, 5, *normalized), (3, *normalized)]
    return shapes, len(normalized), normalized if weight is not None else site.dims


def _model_dtype(gm: fx.GraphModule, nodes: list[fx.Node]) -> torch.dtype:
    """The dtype of the first floating-point attribute the site reads, else of the module's."""
    attributes = [functools.reduce(getattr, n.target.split("."), gm) for n in nodes if n.op == "get_attr"]
    tensors = [*attributes, *gm.parameters(), *gm.buffers()]
    return next((t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.float32)
