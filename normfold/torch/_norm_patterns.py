"""Find normalization computations written inline in a torch.fx graph, with torch.fx's matcher.

The rule (what :func:`find_sites` reports; :mod:`normfold.torch.fuse_norm_calls` rewrites):

1. Matching runs torch.fx's ``SubgraphMatcher`` with the pattern functions below on a
   *canonical copy* of the graph, in which spellings of one computation look alike: method,
   ``torch.`` and operator calls of one op are one call (``x.mean`` / ``torch.mean``;
   ``x.pow(2)`` / ``x ** 2`` / ``x * x`` / ``torch.square``; ``v ** -0.5`` / ``v.rsqrt()``);
   arguments are bound to their names with their defaults (``unbiased=False`` is
   ``correction=0``, an int dim is a 1-tuple); ``a / sqrt(v)`` is ``a * rsqrt(v)``; the operands
   of ``+`` and ``*`` are sorted (values computed from the inputs first, then parameters, then
   literals); duplicate computations are one node; floating-point casts (``.float()``,
   ``.to(torch.float32)``, ``.to(x.dtype)``, ``.type_as(x)``) are left out. Each canonical node
   remembers the graph nodes it stands for. Literal arguments (dims, keepdim, eps) are pattern
   placeholders, which the matcher binds to the graph's literals; they are checked here. The
   copy only finds candidates: the graph is not changed here, and the probes of the rewrite
   decide whether a candidate computes what the F. op computes.
2. A *core* is a LayerNorm (``(x - mean) * rsqrt(var + eps)``, the variance as ``mean(d * d)``,
   ``x.var(...)`` or ``torch.var_mean``), an RMSNorm (``x * rsqrt(mean(x * x) + eps)``) or a
   GroupNorm (a LayerNorm core over ``x.view(n, groups, -1)``, viewed back). Bigger patterns
   are matched first and a graph node belongs to one site at most.
3. A core is refused, with the reason, unless: its dims are literal; for LayerNorm/RMSNorm
   they are the trailing dims counted from the end (``-k..-1``: a dim counted from the front,
   such as dim 1 of a channels-first NCHW norm, is refused, since the F. ops normalize trailing
   dims and the input's rank is not in the graph); for GroupNorm it is the last dim of the
   grouped view, whose first dim is x's batch dim and which is viewed back to x's own shape;
   ``keepdim`` is True; the variance is biased (correction 0); eps is a non-negative finite
   literal (a float attribute is one once traced); no intermediate is read outside the site;
   and no in-place method changes x or an intermediate before the site's output.
   ``x.std(...) + eps`` and ``sqrt(var) + eps`` (eps added to the standard deviation) are near
   misses and always refused.
4. A core's *affine* candidates are the ``y * w + b`` and ``y * w`` after it (through casts)
   whose ``w`` (and ``b``) depend on parameters and literals only (``w`` may be an expression
   such as Gemma's ``1 + w``); for GroupNorm they are ``p.view(1, C, 1, ...)`` of a parameter
   expression ``p`` over x's rank. ``y * activation`` and ``y * w + residual`` are no affines.
   A candidate that cannot join (``F.rms_norm`` has no bias, the normalized value is read
   elsewhere, x's rank is unknown) carries its :class:`~normfold.errors.Refusal`.
"""

from __future__ import annotations

__all__ = ["Affine", "Site", "closure", "find_sites", "is_float32_cast", "norm_eps_literals"]

import builtins
import collections
import dataclasses
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher
from torch.nn import functional as F

from normfold.errors import Refusal

_VALUE, _PARAM, _CONST = 0, 1, 2
_METADATA = frozenset({"shape", "dtype", "device", "ndim"})
_FLOAT_CAST_METHODS = frozenset({"float", "half", "bfloat16", "double"})
# Op name -> canonical target; the graph's spellings of each op are listed below.
_TARGETS: dict[str, Any] = {
    "mean": torch.mean, "var": torch.var, "std": torch.std, "var_mean": torch.var_mean,
    "std_mean": torch.std_mean, "pow": torch.pow, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "reshape": torch.reshape,
}
_FUNCTIONS: dict[Any, str] = {
    torch.mean: "mean", torch.var: "var", torch.std: "std", torch.var_mean: "var_mean",
    torch.std_mean: "std_mean", torch.pow: "pow", operator.pow: "pow", torch.square: "square",
    torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub", operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", torch.reshape: "reshape",
}
_METHODS: dict[str, str] = {
    "mean": "mean", "var": "var", "std": "std", "pow": "pow", "square": "square", "sqrt": "sqrt",
    "rsqrt": "rsqrt", "add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div",
    "view": "reshape", "reshape": "reshape",
}
_NORM_FUNCTIONS = (F.layer_norm, F.rms_norm, F.group_norm)


@dataclasses.dataclass
class Affine:
    """``y * weight (+ bias)`` after a core: the nodes whose values become the F. op's weight and
    bias (for GroupNorm, the ``[C]`` expressions under the view), the site's output with it, and
    the closure of that output (cut at x). ``channels`` is the C written in a GroupNorm view."""

    weight: fx.Node
    bias: fx.Node | None
    outputs: list[fx.Node]
    nodes: list[fx.Node]
    refusal: Refusal | None = None
    channels: int | None = None


@dataclasses.dataclass
class Site:
    """One normalization core: its kind (``layer_norm``, ``rms_norm``, ``group_norm``), input,
    output, the closure of its output cut at the input (graph order), the parameters checked
    in rule 3, or the reason it is refused, and its affine candidates (longest first)."""

    kind: str
    x: list[fx.Node]
    outputs: list[fx.Node]
    nodes: list[fx.Node]
    refusal: Refusal | None
    eps: float | None = None
    dims: int = 1
    groups: int = 0
    rank: int | None = None
    affines: list[Affine] = dataclasses.field(default_factory=list)


def find_sites(graph: fx.Graph) -> list[Site]:
    """The normalization cores of ``graph`` (in pattern priority order), each with its affines."""
    canonical = _Canonical(graph, lambda node: _VALUE)
    positions = {node: i for i, node in enumerate(graph.nodes)}
    affines: dict[fx.Node, list[tuple[bool, InternalMatch]]] = collections.defaultdict(list)
    for with_bias, pattern in ((True, _affine_bias), (False, _affine)):
        for match in SubgraphMatcher(_pattern_graph(pattern)).match(canonical.graph):
            y = _values(match)["y"]
            if isinstance(y, fx.Node):
                affines[y].append((with_bias, match))
    claimed: set[fx.Node] = set()
    sites = []
    for core in _CORES:
        for match in _CoreMatcher(_pattern_graph(core.pattern)).match(canonical.graph):
            computed = canonical.originals(_computed(match))
            if computed & claimed:
                continue
            claimed |= computed
            sites.append(_site(canonical, positions, core, match, computed, affines))
    return sites


def closure(outputs: Iterable[fx.Node], cut: set[fx.Node], positions: dict[fx.Node, int]) -> list[fx.Node]:
    """Every node ``outputs`` are computed from, up to (not including) ``cut``, in graph order."""
    seen: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen or node in cut:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(seen, key=positions.__getitem__)


def is_float32_cast(node: fx.Node) -> bool:
    """Whether ``node`` is ``t.float()`` or ``t.to(torch.float32)``."""
    return _cast_source(node) is not None and (
        node.target == "float" or torch.float32 in (*node.args[1:], *node.kwargs.values())
    )


def norm_eps_literals(graph: fx.Graph) -> list[float]:
    """The literal eps of every ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` call and of
    every inline normalization core of ``graph`` whose eps is a literal."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            eps = bound.arguments["eps"]
            if _number(eps):
                found.append(float(eps))
    return found + [site.eps for site in find_sites(graph) if site.eps is not None]


# --- the patterns ----------------------------------------------------------------------------
# Placeholder names say what a pattern input is: x/y are values, w/b parameters, the rest literals.


def _ln_centered(x, dim, keepdim, eps):
    d = x - x.mean(dim, keepdim=keepdim)
    return d * torch.rsqrt((d * d).mean(dim, keepdim=keepdim) + eps)


def _ln_var(x, dim, keepdim, correction, eps):
    var = x.var(dim, correction=correction, keepdim=keepdim)
    return (x - x.mean(dim, keepdim=keepdim)) * torch.rsqrt(var + eps)


def _ln_var_mean(x, dim, keepdim, correction, eps):
    var, mean = torch.var_mean(x, dim, correction=correction, keepdim=keepdim)
    return (x - mean) * torch.rsqrt(var + eps)


def _rms(x, dim, keepdim, eps):
    return x * torch.rsqrt((x * x).mean(dim, keepdim=keepdim) + eps)


def _gn_centered(x, n, groups, back, dim, keepdim, eps):
    return _ln_centered(x.view(n, groups, -1), dim, keepdim, eps).view(back)


def _gn_var(x, n, groups, back, dim, keepdim, correction, eps):
    return _ln_var(x.view(n, groups, -1), dim, keepdim, correction, eps).view(back)


def _gn_var_mean(x, n, groups, back, dim, keepdim, correction, eps):
    return _ln_var_mean(x.view(n, groups, -1), dim, keepdim, correction, eps).view(back)


def _std_plus_eps(x, dim, keepdim, correction, eps):
    return x.std(dim, correction=correction, keepdim=keepdim) + eps


def _sqrt_var_plus_eps(x, dim, keepdim, correction, eps):
    return torch.sqrt(x.var(dim, correction=correction, keepdim=keepdim)) + eps


def _sqrt_centered_plus_eps(x, dim, keepdim, eps):
    d = x - x.mean(dim, keepdim=keepdim)
    return torch.sqrt((d * d).mean(dim, keepdim=keepdim)) + eps


def _rms_plus_eps(x, dim, keepdim, eps):
    return torch.sqrt((x * x).mean(dim, keepdim=keepdim)) + eps


def _affine_bias(y, w, b):
    return y * w + b


def _affine(y, w):
    return y * w


@dataclasses.dataclass(frozen=True)
class _Core:
    kind: str
    pattern: Callable[..., Any]
    near_miss: str | None = None


_EPS_ON_STD = "eps is added to the standard deviation, not to the variance"
_CORES = (
    _Core("group_norm", _gn_centered), _Core("group_norm", _gn_var), _Core("group_norm", _gn_var_mean),
    _Core("layer_norm", _ln_centered), _Core("layer_norm", _ln_var), _Core("layer_norm", _ln_var_mean),
    _Core("layer_norm", _std_plus_eps, f"{_EPS_ON_STD} (x.std() + eps)"),
    _Core("layer_norm", _sqrt_var_plus_eps, f"{_EPS_ON_STD} (sqrt(var) + eps)"),
    _Core("layer_norm", _sqrt_centered_plus_eps, f"{_EPS_ON_STD} (sqrt(mean((x - mean)^2)) + eps)"),
    _Core("rms_norm", _rms_plus_eps, "eps is added to the root mean square, not to the mean square"),
    _Core("rms_norm", _rms),
)
_PLACEHOLDER_KINDS = {"x": _VALUE, "y": _VALUE, "w": _PARAM, "b": _PARAM}


@functools.cache
def _pattern_graph(pattern: Callable[..., Any]) -> fx.Graph:
    """``pattern`` traced and canonicalized like the graphs it is matched against."""
    traced = fx.symbolic_trace(pattern)
    graph = _Canonical(traced.graph, lambda node: _PLACEHOLDER_KINDS.get(node.target, _CONST)).graph
    graph.eliminate_dead_code()  # a / sqrt(v) leaves the sqrt unread
    return graph


class _CoreMatcher(SubgraphMatcher):
    """torch's matcher, keeping matches whose intermediates are read outside the match.

    torch drops those silently; a core whose intermediate leaks is refused with that reason."""

    def _is_contained(self, nodes_map: dict[fx.Node, fx.Node]) -> bool:
        return True


def _values(match: InternalMatch) -> dict[str, Any]:
    return {pn.target: gn for pn, gn in match.nodes_map.items() if pn.op == "placeholder"}


def _computed(match: InternalMatch) -> list[fx.Node]:
    return [gn for pn, gn in match.nodes_map.items() if pn.op not in ("placeholder", "output")]


# --- checks ----------------------------------------------------------------------------------


def _site(
    canonical: _Canonical,
    positions: dict[fx.Node, int],
    core: _Core,
    match: InternalMatch,
    computed: set[fx.Node],
    affines: dict[fx.Node, list[tuple[bool, InternalMatch]]],
) -> Site:
    values = _values(match)
    anchor = match.returning_nodes[0]
    x = canonical.origins[values["x"]]
    outputs = canonical.origins[anchor]
    nodes = closure(outputs, set(x), positions)
    site = Site(core.kind, x, outputs, nodes, refusal=None)
    if core.near_miss is not None:
        unbiased = _number(values.get("correction")) and values["correction"] != 0
        site.refusal = Refusal(core.near_miss + (
            f", and the variance is unbiased (correction={values['correction']!r})" if unbiased else ""))
        return site
    try:
        _check_core(canonical, core.kind, values, site)
        _check_leak(nodes, computed, outputs)
        _check_mutation(x, nodes, outputs, positions)
    except Refusal as refusal:
        site.refusal = refusal
        return site
    for with_bias, affine_match in affines.get(anchor, []):
        affine = _affine_candidate(canonical, positions, site, values, computed, with_bias, affine_match)
        if affine is not None:
            site.affines.append(affine)
    return site


def _check_core(canonical: _Canonical, kind: str, values: dict[str, Any], site: Site) -> None:
    """Rule 3 on the matched literals (raises :class:`Refusal`); fills ``site``'s eps, dims,
    groups and rank."""
    dims = values["dim"]
    if not (isinstance(dims, tuple) and dims and all(type(d) is int for d in dims)):
        raise Refusal(f"reduces over {_show(canonical, dims)}, not literal dims")
    if values["keepdim"] is not True:
        raise Refusal("keepdim is not True: the statistics are not broadcast back over the normalized dims")
    correction = values.get("correction", 0)
    if not (_number(correction) and correction == 0):
        raise Refusal(f"unbiased variance (correction={_show(canonical, correction)}): F.{kind} divides by "
                      f"the number of elements, not by that number minus the correction")
    eps = values["eps"]
    if not _number(eps):
        raise Refusal(f"eps is {_show(canonical, eps)}, not a literal number")
    if not (math.isfinite(eps) and eps >= 0):
        raise Refusal(f"eps {eps!r} is not a non-negative finite number")
    site.eps = float(eps)
    if kind == "group_norm":
        _check_group(canonical, values, site, dims)
        return
    if any(d >= 0 for d in dims):
        raise Refusal(f"reduces dims {dims}, counted from the front, while F.{kind} normalizes trailing dims: "
                      f"whether they trail depends on the input's rank, which the traced graph does not hold "
                      f"(a channels-first norm over dim 1 of NCHW does not normalize trailing dims)")
    if sorted(dims) != list(range(-len(dims), 0)):
        raise Refusal(f"reduces dims {dims}, not trailing dims -k..-1 as F.{kind} does")
    site.dims = len(dims)


def _check_group(canonical: _Canonical, values: dict[str, Any], site: Site, dims: tuple[int, ...]) -> None:
    x = values["x"]
    groups = values["groups"]
    if type(groups) is not int or groups <= 0:
        raise Refusal(f"the grouped view's group count {_show(canonical, groups)} is not a positive literal")
    if _dim_of(values["n"], x) != 0:
        raise Refusal(f"the grouped view's first dim {_show(canonical, values['n'])} is not x's batch dim")
    if dims not in ((-1,), (2,)):
        raise Refusal(f"reduces the grouped view (n, groups, -1) over dims {dims}, not its last dim")
    back = values["back"]
    if _is_shape_of(back, x):
        site.rank = None
    elif isinstance(back, tuple) and [_dim_of(d, x) for d in back] == list(range(len(back))) and len(back) >= 2:
        site.rank = len(back)
    else:
        raise Refusal(f"the grouped result is viewed as {_show(canonical, back)}, not back to x's shape")
    site.groups = groups


def _check_leak(nodes: list[fx.Node], computed: set[fx.Node], outputs: list[fx.Node]) -> None:
    """Raise :class:`Refusal` if a node computed from the site's intermediates is read outside
    ``nodes``."""
    inside = set(nodes)
    private: set[fx.Node] = set()
    for node in nodes:
        if node in computed or any(a in private for a in node.all_input_nodes):
            private.add(node)
            outside = [user.name for user in node.users if user not in inside]
            if outside and node not in outputs:
                raise Refusal(f"intermediate `{node.name}` is also read by `{outside[0]}`")


def _check_mutation(
    x: list[fx.Node], nodes: list[fx.Node], outputs: list[fx.Node], positions: dict[fx.Node, int]
) -> None:
    """Raise :class:`Refusal` if the F. call, placed at the site's output, would read an x the
    site did not read: an in-place method (``x.mul_(...)``) on x or on a node of the site before
    its output."""
    end = max(positions[node] for node in outputs)
    for node in (*x, *nodes):
        for user in node.users:
            name = user.target if user.op == "call_method" else ""
            if name.endswith("_") and not name.startswith("_") and positions[user] < end:
                raise Refusal(f"`{user.name}` changes `{node.name}` in place while the site reads it")


def _affine_candidate(
    canonical: _Canonical,
    positions: dict[fx.Node, int],
    site: Site,
    values: dict[str, Any],
    computed: set[fx.Node],
    with_bias: bool,
    match: InternalMatch,
) -> Affine | None:
    """The affine of ``match`` after ``site``, or None when it is no affine (``y * activation``)."""
    found = _values(match)
    operands = [found["w"], found["b"]] if with_bias else [found["w"]]
    if not all(isinstance(v, fx.Node) and canonical.kinds.get(v) == _PARAM for v in operands):
        return None
    outputs = canonical.origins[match.returning_nodes[0]]
    nodes = closure(outputs, set(site.x), positions)
    refusal = None
    channels = None
    try:
        _check_leak(nodes, computed | canonical.originals(_computed(match)), outputs)
        if site.kind == "rms_norm" and with_bias:
            raise Refusal("F.rms_norm has no bias")
        if site.kind == "group_norm":
            unwrapped = []
            for operand in operands:
                unwrapped.append(_group_param(canonical, operand, values["x"], site.rank))
                channels = channels or _written_channels(operand)
            operands = unwrapped
    except Refusal as why:
        refusal = why
    originals = [canonical.origins[v][0] for v in operands]
    return Affine(originals[0], originals[1] if with_bias else None, outputs, nodes, refusal, channels)


def _group_param(canonical: _Canonical, v: fx.Node, x: fx.Node, rank: int | None) -> fx.Node:
    """``p`` for a GroupNorm affine operand ``p.view(1, C, 1, ...)`` over x's rank; raises
    :class:`Refusal` saying why not."""
    if rank is None:
        raise Refusal("x's rank is not in the graph (viewed back with x.shape), so the affine's broadcast is unknown")
    if not (v.op == "call_function" and v.target is torch.reshape and isinstance(v.args[1], tuple)):
        raise Refusal(f"`{canonical.origins[v][0].name}` is not a parameter viewed as (1, C, 1, ...)")
    under, shape = v.args
    ok = (len(shape) == rank and shape[0] == 1 and all(type(s) is int and s == 1 for s in shape[2:])
          and (type(shape[1]) is int or _dim_of(shape[1], x) == 1))
    if not ok or canonical.kinds[under] != _PARAM:
        raise Refusal(
            f"`{canonical.origins[v][0].name}` is not a parameter viewed as (1, C, 1, ...) over x's rank {rank}"
        )
    return under


def _written_channels(v: fx.Node) -> int | None:
    channels = v.args[1][1]
    return channels if type(channels) is int and channels > 0 else None


def _dim_of(node: Any, x: fx.Node) -> int | None:
    """``i`` when ``node`` is ``x.shape[i]`` or ``x.size(i)``."""
    if not isinstance(node, fx.Node) or len(node.args) != 2 or type(node.args[1]) is not int:
        return None
    if node.op == "call_function" and node.target is operator.getitem and _is_shape_of(node.args[0], x):
        return node.args[1]
    if node.op == "call_method" and node.target == "size" and node.args[0] is x:
        return node.args[1]
    return None


def _is_shape_of(node: Any, x: fx.Node) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs:
        return False
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[0] is x and node.args[1] == "shape"
    return node.op == "call_method" and node.target == "size" and len(node.args) == 1 and node.args[0] is x


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(canonical: _Canonical, value: Any) -> str:
    """A literal as written, a canonical node by the name of the graph node it stands for."""
    if isinstance(value, fx.Node):
        return f"`{canonical.origins[value][0].name}`" if canonical.origins.get(value) else f"`{value.name}`"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(canonical, v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


# --- the canonical copy ----------------------------------------------------------------------


class _Canonical:
    """A canonical copy of a graph (rule 1): ``graph``, and ``origins[c]``, the nodes of the
    original graph that canonical node ``c`` stands for."""

    def __init__(self, graph: fx.Graph, placeholder_kind: Callable[[fx.Node], int]) -> None:
        self.graph = fx.Graph()
        self.origins: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
        self.kinds: dict[fx.Node, int] = {}
        self._env: dict[fx.Node, fx.Node] = {}
        self._position: dict[fx.Node, int] = {}
        self._memo: dict[Any, fx.Node] = {}
        for node in graph.nodes:
            self._add(node, placeholder_kind)

    def originals(self, nodes: Iterable[fx.Node]) -> set[fx.Node]:
        return {origin for node in nodes for origin in self.origins[node]}

    def _add(self, node: fx.Node, placeholder_kind: Callable[[fx.Node], int]) -> None:
        if node.op == "output":
            self.graph.output(fx.map_arg(node.args[0], self._env.__getitem__))
            return
        source = _cast_source(node)
        if source is not None:
            self._env[node] = self._env[source]
            return
        if node.op == "placeholder":
            new = self._register(self.graph.placeholder(node.target), placeholder_kind(node))
        elif node.op == "get_attr":
            new = self._register(self.graph.get_attr(node.target), _PARAM)
        else:
            args = fx.map_arg(node.args, self._env.__getitem__)
            kwargs = fx.map_arg(node.kwargs, self._env.__getitem__)
            name = _METHODS.get(node.target) if node.op == "call_method" else (
                _FUNCTIONS.get(node.target) if node.op == "call_function" else None)
            new = (self._canonical(name, args, kwargs) if name else None) or self._copy(node, args, kwargs)
        self._env[node] = new
        if node not in self.origins[new]:
            self.origins[new].append(node)

    def _register(self, node: fx.Node, kind: int) -> fx.Node:
        self.kinds[node] = kind
        self._position[node] = len(self._position)
        return node

    def _copy(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        pure = (node.op == "call_function" and node.target in (builtins.getattr, operator.getitem)) or (
            node.op == "call_method" and node.target in ("size", "dim"))
        key = _key((node.op, node.target, args, kwargs)) if pure else None
        if key is not None and key in self._memo:
            return self._memo[key]
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        if node.op == "call_module":
            kind = _VALUE
        elif pure and (node.target in ("size", "dim") or (node.target is builtins.getattr and args[1] in _METADATA)):
            kind = _CONST
        else:
            kind = self._kind_of(args, kwargs)
        if key is not None:
            self._memo[key] = new
        return self._register(new, kind)

    def _call(self, name: str, args: tuple[Any, ...]) -> fx.Node:
        """The canonical ``name(*args)`` node, shared by every computation of it."""
        target = _TARGETS[name]
        key = _key((target, args))
        if key is not None and key in self._memo:
            return self._memo[key]
        new = self._register(self.graph.call_function(target, args), self._kind_of(args, {}))
        if key is not None:
            self._memo[key] = new
        return new

    def _kind_of(self, args: Any, kwargs: Any) -> int:
        kinds = [_CONST]
        fx.map_arg((args, kwargs), lambda n: kinds.append(self.kinds.get(n, _VALUE)))
        return min(kinds)

    def _rank(self, value: Any) -> tuple[int, float]:
        if isinstance(value, fx.Node):
            return self.kinds.get(value, _VALUE), self._position.get(value, -1)
        return _CONST, math.inf

    def _canonical(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node | None:
        if name in ("add", "sub", "mul", "div"):
            if len(args) != 2 or kwargs:
                return None
            a, b = args
            if name == "mul" and isinstance(a, fx.Node) and a is b:
                return self._call("pow", (a, 2.0))
            if name == "div" and isinstance(b, fx.Node) and b.target is torch.sqrt:
                root = self._call("rsqrt", b.args)
                self.origins[root].extend(o for o in self.origins[b] if o not in self.origins[root])
                name, b = "mul", root
            if name in ("add", "mul"):
                a, b = sorted((a, b), key=self._rank)
            return self._call(name, (a, b))
        if not args or not isinstance(args[0], fx.Node):
            return None
        x, rest = args[0], args[1:]
        if name == "mean":
            bound = _bind(rest, kwargs, ("dim", "keepdim"), ())
            dims = _dims(bound.get("dim")) if bound is not None else None
            return None if dims is None else self._call("mean", (x, dims, bound.get("keepdim", False)))
        if name in ("var", "std", "var_mean", "std_mean"):
            bound = _bind(rest, kwargs, ("dim", "unbiased", "keepdim"), ("correction",))
            if bound is None or ("unbiased" in bound and "correction" in bound):
                return None
            dims = _dims(bound.get("dim"))
            unbiased = bound.get("unbiased", True)
            correction = bound.get("correction", int(unbiased) if isinstance(unbiased, bool) else unbiased)
            return None if dims is None else self._call(name, (x, dims, correction, bound.get("keepdim", False)))
        if kwargs:
            return None
        if name == "square" and not rest:
            return self._call("pow", (x, 2.0))
        if name in ("sqrt", "rsqrt") and not rest:
            return self._call(name, (x,))
        if name == "pow" and len(rest) == 1 and _number(rest[0]):
            exponent = float(rest[0])
            if exponent in (0.5, -0.5):
                return self._call("sqrt" if exponent > 0 else "rsqrt", (x,))
            return self._call("pow", (x, exponent))
        if name == "reshape" and rest:
            shape = rest[0] if len(rest) == 1 else rest
            if isinstance(shape, (tuple, list)):
                shape = tuple(shape)
            elif type(shape) is int:
                shape = (shape,)
            elif not isinstance(shape, fx.Node):
                return None  # x.view(dtype) reinterprets bits
            return self._call("reshape", (x, shape))
        return None


def _cast_source(node: fx.Node) -> fx.Node | None:
    """The tensor a floating-point cast node casts, or None if ``node`` is no such cast."""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    rest, kwargs = node.args[1:], node.kwargs
    if node.target in _FLOAT_CAST_METHODS and not rest and not kwargs:
        return node.args[0]
    if node.target in ("to", "type"):
        if len(rest) == 1 and not kwargs:
            dtype = rest[0]
        elif not rest and set(kwargs) == {"dtype"}:
            dtype = kwargs["dtype"]
        else:
            return None
        floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else (
            isinstance(dtype, fx.Node) and dtype.op == "call_function" and dtype.target is builtins.getattr
            and dtype.args[1:] == ("dtype",))
        return node.args[0] if floating else None
    if node.target == "type_as" and len(rest) == 1 and isinstance(rest[0], fx.Node) and not kwargs:
        return node.args[0]
    return None


def _bind(
    args: tuple[Any, ...], kwargs: dict[str, Any], positional: tuple[str, ...], keyword: tuple[str, ...]
) -> dict[str, Any] | None:
    if len(args) > len(positional):
        return None
    bound = dict(zip(positional, args))
    for name, value in kwargs.items():
        if name in bound or name not in (*positional, *keyword):
            return None
        bound[name] = value
    return bound


def _dims(dim: Any) -> tuple[int, ...] | fx.Node | None:
    if type(dim) is int:
        return (dim,)
    if isinstance(dim, (tuple, list)) and all(type(d) is int for d in dim):
        return tuple(dim)
    return dim if isinstance(dim, fx.Node) else None


def _key(value: Any) -> Any:
    """A hashable key equal only for equal arguments (1, 1.0 and True differ), or None."""
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, (tuple, list)):
        keys = tuple(_key(v) for v in value)
        return None if None in keys else (type(value).__name__, keys)
    if isinstance(value, dict):
        return _key(tuple(value.items()))
    if isinstance(value, slice):
        return _key(("slice", value.start, value.stop, value.step))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)) or callable(value):
        return type(value).__name__, repr(value) if isinstance(value, float) else value
    return None
