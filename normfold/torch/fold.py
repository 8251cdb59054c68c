"""Fold eval-mode BatchNorm modules into the Conv, ConvTranspose or Linear module before them.

The rule, for a module ``M`` (the arithmetic is :mod:`normfold.math.batchnorm`'s, shared with
the ONNX passes):

1. ``M`` is copied (unless ``inplace``) and traced with ``torch.fx.symbolic_trace``. Every call
   of a BatchNorm module is a *site*. A site folds when its input is the output of a call of an
   ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` module (exactly those
   classes: a subclass may compute something else) that nothing else reads, and the BatchNorm
   is a ``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` in eval mode with running statistics. The
   layer's weight and bias are replaced by folded ones, computed in float64 and cast once to
   the layer's dtype, and the BatchNorm call disappears from the graph.
2. A layer module called at several sites is folded per site: unless every call of it is
   followed by the same BatchNorm, each folded site calls a new folded copy under a new name
   (``<layer>_folded_<bn>``) and the other calls keep the original layer. (torch's own
   ``fx.experimental.optimization.fuse`` folds the first site's BatchNorm into the shared module
   and so changes every other call: pytorch#104593.)
3. The fold is exact only if the BatchNorm's channel axis (axis 1) is the layer's output-channel
   axis: the BatchNorm must see a batched Conv output ``(N, C, *spatial)``, or a 2-d Linear
   output ``(N, C)``. A BatchNorm1d after a Linear applied to ``(N, L, C_in)`` normalizes axis 1
   (``L``), not the Linear's features, and is refused. The rank the BatchNorm sees is taken from
   ``example_inputs`` when given (one run in eval mode, recording each BatchNorm's input rank),
   else from the graph (``flatten(x, 1)``, ``nn.Flatten``, ``view(n, -1)`` before the Linear,
   through rank-preserving modules), else from what the BatchNorm class accepts; a Conv's input
   is taken to be batched. A Linear + BatchNorm1d site whose rank stays unknown is refused.
   A site whose folded weights the layer's dtype cannot hold (overflow, a nonzero value flushed
   to 0, more error than the unfolded pair in float16/bfloat16) is refused by the rule the ONNX
   folds apply (:mod:`normfold.math.fold_precision`).
   Between the layer and the BatchNorm there may be reshapes (``flatten``, ``view``,
   ``reshape``, ``squeeze``, ``unsqueeze``, as methods or ``torch.`` functions): timm LeViT's
   ``bn(linear(x).flatten(0, 1)).reshape_as(x)``. The site folds when, on the shapes one run of
   ``example_inputs`` shows, they carry the layer's output channels onto the BatchNorm's axis
   1 unmerged (:func:`normfold.math.channel_route.reshape_route`, the rule the ONNX fold uses);
   the reshapes stay. Without ``example_inputs`` such a site is refused, saying so. A reader of
   the layer's output that only takes its shape (``reshape_as(y)``, ``y.size()``, ``y.shape``)
   does not stop a fold.
4. A module torch.fx cannot trace (data-dependent control flow, ...) is not traced: its children
   are folded one by one (each traced on its own), and if it is exactly ``nn.Sequential`` its
   adjacent (layer, BatchNorm) children fold as in 1 (the BatchNorm becomes ``nn.Identity``).
   BatchNorm children of any other untraceable module stay, and a warning says so.
5. Every site is reported, folded or refused with the reason, in a :class:`FoldReport`. Nothing
   raises on a module that cannot be folded; nothing is folded that is not exact.

A traced module that had a site folded comes back as a ``torch.fx.GraphModule`` (as from
``fx.fuse``); a module with nothing folded comes back as it was (copied). Code that reaches into
a child module's own submodules from an untraceable ``forward`` (``self.block.conv(x)``) is not
seen by the trace of the child and sees the child's folded layers.
"""

from __future__ import annotations

__all__ = [
    "FoldReport",
    "FoldedSite",
    "RefusedSite",
    "UntracedModule",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
]

import collections
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd

from normfold.errors import InputError, Refusal, first_line
from normfold.math import channel_route
from normfold.math import batchnorm as fm
from normfold.math import fold_precision

logger = logging.getLogger(__name__)

_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Input ranks each BatchNorm class accepts (it raises on others); SyncBatchNorm takes any >= 2.
_BN_RANKS: dict[type[nn.Module], frozenset[int]] = {
    nn.BatchNorm1d: frozenset({2, 3}),
    nn.BatchNorm2d: frozenset({4}),
    nn.BatchNorm3d: frozenset({5}),
    nn.SyncBatchNorm: frozenset(range(2, 9)),
}
# Modules and functions whose output has the rank of their (first) input.
_SAME_RANK_MODULES = (
    nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_SAME_RANK_FUNCTIONS = (
    torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6,
    nn.functional.gelu, nn.functional.silu, nn.functional.leaky_relu, nn.functional.hardswish,
    nn.functional.dropout,
)
_SAME_RANK_METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous", "clone"})


@dataclasses.dataclass(frozen=True)
class FoldedSite:
    """One BatchNorm call folded into the layer before it.

    ``bn`` and ``layer`` are module paths in the input module; ``into`` is the path of the
    folded layer in the result (``layer`` itself unless the layer was called at other sites);
    ``call`` names the call site: the torch.fx node of the BatchNorm call, after the path of the
    traced module that holds it (``layer1:bn_1``), or for a Sequential folded without torch.fx
    the BatchNorm's path.
    """

    bn: str
    layer: str
    into: str
    call: str
    kind: str


@dataclasses.dataclass(frozen=True)
class RefusedSite:
    """One BatchNorm call left in place, and why."""

    bn: str
    call: str
    reason: str


@dataclasses.dataclass(frozen=True)
class UntracedModule:
    """A module torch.fx could not trace; its children were folded one by one instead."""

    path: str
    type: str
    reason: str


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold_batchnorm` folded, refused (with reasons) and could not trace."""

    folded: list[FoldedSite] = dataclasses.field(default_factory=list)
    refused: list[RefusedSite] = dataclasses.field(default_factory=list)
    untraced: list[UntracedModule] = dataclasses.field(default_factory=list)

    def refuse(self, bn: str, call: str, refusal: Refusal) -> None:
        """Report ``refusal`` of the BatchNorm call ``call`` (of module ``bn``): the one place a
        :class:`Refusal` becomes a :class:`RefusedSite`."""
        self.refused.append(RefusedSite(bn, call, refusal.reason))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form: ``{"folded": [...], "refused": [...], "untraced": [...]}``."""
        return {
            "applied": len(self.folded),
            "folded": [dataclasses.asdict(site) for site in self.folded],
            "refused": [dataclasses.asdict(site) for site in self.refused],
            "untraced": [dataclasses.asdict(module) for module in self.untraced],
        }


def fold_batchnorm(
    module: nn.Module,
    *,
    inplace: bool = False,
    example_inputs: Sequence[Any] | None = None,
) -> nn.Module:
    """``module`` with every exactly foldable BatchNorm folded into the layer before it.

    Returns a new module and leaves ``module`` untouched; ``inplace=True`` skips the copy, and
    then ``module`` itself may be changed and must not be used afterwards. ``example_inputs``
    (positional arguments of ``forward``) let Linear + BatchNorm1d sites fold whose input rank
    the graph does not show. See :func:`fold_batchnorm_with_report` for what was folded.
    """
    return _fold(module, inplace, example_inputs)[0]


def fold_batchnorm_with_report(
    module: nn.Module,
    *,
    inplace: bool = False,
    example_inputs: Sequence[Any] | None = None,
) -> tuple[nn.Module, FoldReport]:
    """:func:`fold_batchnorm`, and the :class:`FoldReport` of every BatchNorm call site."""
    return _fold(module, inplace, example_inputs)


def _fold(
    module: nn.Module, inplace: bool, example_inputs: Sequence[Any] | None
) -> tuple[nn.Module, FoldReport]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"fold_batchnorm takes a torch.nn.Module, not {type(module).__name__}")
    work = module if inplace else copy.deepcopy(module)
    shapes = {} if example_inputs is None else _observed_shapes(work, tuple(example_inputs))
    folder = _Folder(shapes)
    result = folder.fold(work, "")
    if folder.left_untraced:
        untraced = ", ".join(f"`{u.path or u.type}` ({u.reason})" for u in folder.report.untraced)
        warnings.warn(
            f"fold_batchnorm: torch.fx cannot trace {untraced}; folded inside its traceable "
            f"submodules and left {len(folder.left_untraced)} BatchNorm module(s) unfolded: "
            + ", ".join(folder.left_untraced),
            stacklevel=3,  # the caller of fold_batchnorm[_with_report]
        )
    return result, folder.report


def _join(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _call(scope: str, node: fx.Node) -> str:
    """A call site: the fx node's name, after the path of the traced module that holds it."""
    return f"{scope}:{node.name}" if scope else node.name


class _Folder:
    """Walks a module: traces what it can, folds sites, records everything in ``report``."""

    def __init__(self, shapes: dict[int, set[tuple[int, ...]]]) -> None:
        self.shapes = shapes
        self.ranks = {key: {len(shape) for shape in seen} for key, seen in shapes.items()}
        self.report = FoldReport()
        self.left_untraced: list[str] = []  # BatchNorm children of untraceable modules

    def fold(self, module: nn.Module, scope: str) -> nn.Module:
        """``module`` (at path ``scope``) folded: a new GraphModule, or ``module`` itself."""
        if not any(isinstance(sub, _BatchNorm) for sub in module.modules()):
            return module
        try:
            traced = fx.symbolic_trace(module)
        except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
            reason = f"{type(error).__name__}: {first_line(error)}"
            logger.debug("cannot trace %s: %s", scope or type(module).__name__, reason)
            self.report.untraced.append(UntracedModule(scope, type(module).__name__, reason))
            self._fold_children(module, scope, reason)
            return module
        return traced if self._fold_graph(traced, scope) else module

    # -- traced modules ----------------------------------------------------------------------

    def _fold_graph(self, gm: fx.GraphModule, scope: str) -> bool:
        modules = dict(gm.named_modules())
        sites: list[tuple[fx.Node, fx.Node]] = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
                continue
            producer, chain = _through_reshapes(_bn_input(node))
            try:
                self._check_graph_site(node, producer, chain, modules, scope)
            except Refusal as refusal:
                self.report.refuse(_join(scope, node.target), _call(scope, node), refusal)
                continue
            sites.append((node, producer))
        if not sites:
            return False
        self._rewrite(gm, sites, modules, scope)
        return True

    def _check_graph_site(
        self,
        node: fx.Node,
        producer: Any,
        chain: list[fx.Node],
        modules: dict[str, nn.Module],
        scope: str,
    ) -> None:
        """Raise :class:`Refusal` unless the BatchNorm call ``node`` folds into ``producer``."""
        bn = modules[node.target]
        _check_bn(bn)
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            what = producer.name if isinstance(producer, fx.Node) else repr(producer)
            raise Refusal(f"its input `{what}` is not the output of a Conv, ConvTranspose or Linear module")
        layer = modules[producer.target]
        _check_layer(layer, _join(scope, producer.target))
        for value, reader in zip([producer, *chain], [*chain, node]):
            # A reader of the shape alone (timm's ``reshape_as(x)``) needs no unscaled values.
            others = sorted(user.name for user in value.users
                            if user is not reader and not _reads_shape_only(user, value))
            if others:
                raise Refusal(f"the output of `{_join(scope, value.target if value is producer else value.name)}` "
                              "is also read by " + ", ".join(f"`{name}`" for name in others))
        if chain:
            self._check_route(layer, bn, chain)
            return
        layer_input = producer.args[0] if producer.args else None
        _check_pair(layer, bn, self.ranks.get(id(bn)), lambda: _graph_rank(layer_input, modules))

    def _check_route(self, layer: nn.Module, bn: nn.Module, chain: list[fx.Node]) -> None:
        """Raise :class:`Refusal` unless ``bn(reshapes(layer(x)))`` is exactly a folded layer: the reshapes
        must carry the layer's output channels onto the BN's axis 1 unmerged, proved on the
        shapes ``example_inputs`` gave (:func:`normfold.math.channel_route.reshape_route`)."""
        through = ", ".join(f"`{n.name}`" for n in chain)
        out_shapes, in_shapes = self.shapes.get(id(layer), set()), self.shapes.get(id(bn), set())
        if not out_shapes or not in_shapes:
            raise Refusal(f"it reads the {type(layer).__name__} through {through}: pass example_inputs "
                          "to show where the reshapes put the channels")
        if len(out_shapes) > 1 or len(in_shapes) > 1:
            raise Refusal(f"the layer or the BatchNorm is called with several shapes, through {through}")
        (out_shape,), (in_shape,) = out_shapes, in_shapes
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        axis = len(out_shape) - 1 if isinstance(layer, nn.Linear) else 1
        try:
            route = channel_route.reshape_route(out_shape, in_shape, axis, 1, channels)
        except ValueError as error:
            raise Refusal(f"through {through}: {error}") from None
        if route != (1, 1) or bn.num_features != channels:
            raise Refusal(f"{through} carry the {type(layer).__name__}'s {channels} channels to axis "
                          f"{route[0]} (block {route[1]}) of the {bn.num_features}-channel "
                          f"{type(bn).__name__}'s input, not onto its axis 1")

    def _rewrite(
        self,
        gm: fx.GraphModule,
        sites: list[tuple[fx.Node, fx.Node]],
        modules: dict[str, nn.Module],
        scope: str,
    ) -> None:
        by_layer: dict[str, list[tuple[fx.Node, fx.Node]]] = collections.defaultdict(list)
        for bn_node, layer_node in sites:
            by_layer[layer_node.target].append((bn_node, layer_node))
        calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        attributes = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
        for target, layer_sites in by_layer.items():
            # A get_attr of the layer's weight must keep reading the unfolded weight.
            read = any(a == target or a.startswith(target + ".") for a in attributes)
            bns = {bn_node.target for bn_node, _ in layer_sites}
            shared = read or calls[target] > len(layer_sites) or len(bns) > 1
            installed: dict[str, str] = {}
            for bn_node, layer_node in layer_sites:
                if bn_node.target not in installed:
                    folded = _folded_layer(modules[target], modules[bn_node.target])
                    name = _fresh_name(gm, target, bn_node.target) if shared else target
                    gm.add_submodule(name, folded)
                    installed[bn_node.target] = name
                self.report.folded.append(FoldedSite(
                    bn=_join(scope, bn_node.target),
                    layer=_join(scope, target),
                    into=_join(scope, installed[bn_node.target]),
                    call=_call(scope, bn_node),
                    kind=type(modules[target]).__name__,
                ))
                layer_node.target = installed[bn_node.target]
                bn_node.replace_all_uses_with(_bn_input(bn_node))  # the layer, or its reshapes
                gm.graph.erase_node(bn_node)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()

    # -- untraceable modules -----------------------------------------------------------------

    def _fold_children(self, module: nn.Module, scope: str, reason: str) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                continue  # a lone BatchNorm has nothing to fold into; its caller decides
            folded = self.fold(child, _join(scope, name))
            if folded is not child:
                setattr(module, name, folded)
        if type(module) is nn.Sequential:
            self._fold_sequential(module, scope)
            return
        label = scope or type(module).__name__
        for name, child in module.named_children():
            if isinstance(child, _BatchNorm):
                path = _join(scope, name)
                self.left_untraced.append(path)
                why = Refusal(f"called from `{label}`, whose forward torch.fx cannot trace ({reason})")
                self.report.refuse(path, path, why)

    def _fold_sequential(self, seq: nn.Sequential, scope: str) -> None:
        """Fold adjacent (layer, BatchNorm) children of a plain Sequential.

        The layer's output feeds only the next child, so the pair folds like a traced site; the
        BatchNorm becomes ``nn.Identity`` so that the indices of the other children stay.
        """
        children = list(seq)
        for index, bn in enumerate(children):
            if not isinstance(bn, _BatchNorm):
                continue
            path = _join(scope, str(index))
            layer = children[index - 1] if index else None
            try:
                _check_bn(bn)
                if layer is None:
                    raise Refusal("it is the first module of the Sequential, so its input is not a layer's")
                _check_layer(layer, _join(scope, str(index - 1)))
                _check_pair(layer, bn, self.ranks.get(id(bn)), lambda: _sequential_rank(children, index - 1))
            except Refusal as refusal:
                self.report.refuse(path, path, refusal)
                continue
            seq[index - 1] = _folded_layer(layer, bn)
            seq[index] = nn.Identity()
            layer_path = _join(scope, str(index - 1))
            self.report.folded.append(
                FoldedSite(path, layer_path, layer_path, path, type(layer).__name__)
            )


# -- reshapes between a layer and its BatchNorm ------------------------------------------------

# Row-major reshapes (a chain of them is one reshape from its first shape to its last).
_RESHAPE_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze"})
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
# Methods whose second argument is read for its shape only.
_SHAPE_OF_ARGUMENT = frozenset({"reshape_as", "view_as", "expand_as"})


def _bn_input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _is_reshape(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in _RESHAPE_METHODS)
        or (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
    )


def _through_reshapes(value: Any) -> tuple[Any, list[fx.Node]]:
    """The value before a chain of reshapes ending in ``value``, and the chain (in order)."""
    chain: list[fx.Node] = []
    while _is_reshape(value):
        chain.insert(0, value)
        value = value.args[0]
    return value, chain


def _reads_shape_only(user: fx.Node, value: fx.Node) -> bool:
    """``user`` reads only the shape of ``value`` (``y.reshape_as(value)``, ``value.size()``,
    ``value.shape``)."""
    if user.op == "call_method" and user.target in _SHAPE_OF_ARGUMENT:
        return value not in user.args[:1] and value in user.args[1:]
    if user.op == "call_method" and user.target == "size":
        return True
    return user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",)


# -- exactness checks ------------------------------------------------------------------------


def _check_bn(bn: nn.Module) -> None:
    """Raise :class:`Refusal` if this BatchNorm module cannot be folded anywhere."""
    if type(bn) not in _BATCHNORMS:
        raise Refusal(f"it is a {type(bn).__name__}, not a BatchNorm1d/2d/3d or SyncBatchNorm")
    if bn.training:
        raise Refusal("it is in training mode, where it normalizes with batch statistics (call .eval())")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise Refusal("track_running_stats=False: it always normalizes with batch statistics")
    if _has_hooks(bn):
        raise Refusal("it has forward hooks, which the fold would skip")


def _check_layer(layer: nn.Module, path: str) -> None:
    """Raise :class:`Refusal` if the module before a BatchNorm cannot take the fold."""
    if type(layer) in _LAYERS:
        if _has_hooks(layer):
            raise Refusal(f"`{path}` has forward hooks, which would see the folded output")
        return
    name = type(layer).__name__
    for base in _LAYERS:
        if isinstance(layer, base):
            raise Refusal(f"its input comes from `{path}`, a {name}: a subclass of {base.__name__} "
                          "may compute differently")
    raise Refusal(f"its input comes from `{path}` ({name}), not a Conv, ConvTranspose or Linear module")


def _check_pair(
    layer: nn.Module,
    bn: nn.Module,
    observed: set[int] | None,
    graph_rank: Callable[[], int | None],
) -> None:
    """Raise :class:`Refusal` unless ``bn(layer(x))`` is exactly a folded layer.

    Exact iff the BatchNorm's axis 1 is the layer's output-channel axis, i.e. the BatchNorm sees
    a tensor of the weight's rank: batched ``(N, C, *k)`` after a Conv, ``(N, C)`` after a Linear.
    """
    need = layer.weight.dim()
    kind, bn_kind = type(layer).__name__, type(bn).__name__
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != channels:
        raise Refusal(f"{bn_kind} has {bn.num_features} features but {kind} produces {channels} "
                      "channels: its axis 1 is not the layer's output channel")
    if observed:
        ranks, source = set(observed), "with example_inputs"
    elif isinstance(layer, nn.Linear) and (rank := graph_rank()) is not None:
        ranks, source = {rank}, "in the graph"
    else:
        # The Linear's input may have any rank; a Conv's has rank need or need - 1 (unbatched).
        possible = set(range(1, 9)) if isinstance(layer, nn.Linear) else {need, need - 1}
        ranks, source = possible & _BN_RANKS[type(bn)], "by its class"
        if not isinstance(layer, nn.Linear) and need in ranks:
            ranks = {need}  # a Conv's input is taken to be batched
    if ranks != {need}:
        if need in ranks:
            raise Refusal(f"{bn_kind} may see a {need}-d {kind} output (foldable) or a "
                          f"{max(ranks - {need})}-d one, where axis 1 is not the {kind}'s output "
                          "channel: pass example_inputs to show which")
        seen = "/".join(str(r) for r in sorted(ranks))
        raise Refusal(f"{bn_kind} sees a {seen}-d {kind} output ({source}) and normalizes its axis 1, "
                      f"which is not the {kind}'s output channel")
    _check_dtype(layer, bn)


def _check_dtype(layer: nn.Module, bn: nn.Module) -> None:
    """Raise :class:`Refusal` if the folded weights would not survive the cast to the layer's
    dtype: overflow, a nonzero value flushed to 0, or more error than the unfolded pair
    (``fold_precision``, the rule the ONNX folds apply)."""
    weight, bias = _folded_arrays(layer, bn)
    dtype = _numpy_dtype(layer.weight.dtype)
    for what, array in (("weight", weight), ("bias", bias)):
        if (problem := fold_precision.cast_problem(array, dtype, what)) is not None:
            raise Refusal(problem)
    kind = "ConvTranspose" if isinstance(layer, _ConvTransposeNd) else "Gemm" if isinstance(layer, nn.Linear) else "Conv"
    groups = getattr(layer, "groups", 1)
    # A Linear's weight (out, in) is a Gemm B with transB.
    rows = fold_precision.output_rows(kind, _f64(layer.weight), group=groups, trans_b=True)
    folded_rows = fold_precision.output_rows(kind, weight, group=groups, trans_b=True)
    old_bias = None if layer.bias is None else _f64(layer.bias)
    scale, shift = _bn_affine(bn)
    reference, folded = fold_precision.site_outputs(
        rows, old_bias, folded_rows, bias, dtype, after=fold_precision.Affine(scale, shift)
    )
    if (problem := fold_precision.precision_problem(reference, folded, dtype)) is not None:
        raise Refusal(problem)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    # numpy has no bfloat16: ml_dtypes' is what the ONNX side uses too.
    return np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# -- rank evidence ---------------------------------------------------------------------------


def _observed_shapes(
    module: nn.Module, example_inputs: tuple[Any, ...]
) -> dict[int, set[tuple[int, ...]]]:
    """Run ``module`` once on ``example_inputs`` in eval mode; the input shapes of each BatchNorm
    and the output shapes of each Conv/ConvTranspose/Linear, by ``id`` of the module."""
    shapes: dict[int, set[tuple[int, ...]]] = collections.defaultdict(set)

    def record_input(bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = args[0] if args else kwargs.get("input")
        if isinstance(value, torch.Tensor):
            shapes[id(bn)].add(tuple(value.shape))

    def record_output(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            shapes[id(layer)].add(tuple(output.shape))

    handles = [
        sub.register_forward_pre_hook(record_input, with_kwargs=True)
        for sub in module.modules()
        if isinstance(sub, _BatchNorm)
    ] + [sub.register_forward_hook(record_output) for sub in module.modules() if type(sub) in _LAYERS]
    modes = [(sub, sub.training) for sub in module.modules()]
    try:
        module.eval()  # a BatchNorm in training mode would update its running statistics
        with torch.no_grad():
            module(*example_inputs)
    except Exception as error:
        message = f"fold_batchnorm: example_inputs do not run: {first_line(error)}"
        raise InputError(message) from error
    finally:
        for handle in handles:
            handle.remove()
        for sub, training in modes:
            sub.training = training
    return dict(shapes)


def _flatten_rank(start: Any, end: Any) -> int | None:
    if isinstance(start, int) and start >= 0 and end == -1:
        return start + 1
    return None


def _graph_rank(node: Any, modules: dict[str, nn.Module]) -> int | None:
    """The rank of ``node``'s value when the graph fixes it (flatten, view), else None."""
    while isinstance(node, fx.Node):
        args = node.args
        if node.op == "call_module":
            module = modules[node.target]
            if type(module) is nn.Flatten:
                return _flatten_rank(module.start_dim, module.end_dim)
            if type(module) not in _SAME_RANK_MODULES:
                return None
        elif node.op == "call_function" and node.target is torch.flatten:
            return _flatten_rank(node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0),
                                 node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1))
        elif node.op == "call_method" and node.target == "flatten":
            return _flatten_rank(node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0),
                                 node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1))
        elif node.op == "call_method" and node.target in ("view", "reshape"):
            return _shape_rank(args[1:])
        elif node.op == "call_function" and node.target is torch.reshape:
            return _shape_rank(args[1:2])
        elif not (
            (node.op == "call_function" and node.target in _SAME_RANK_FUNCTIONS)
            or (node.op == "call_method" and node.target in _SAME_RANK_METHODS)
        ):
            return None
        node = args[0] if args else None
    return None


def _shape_rank(shape: tuple[Any, ...]) -> int | None:
    """The rank a ``view``/``reshape`` to ``shape`` gives: one entry per size, sizes or a tuple."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if shape and all(isinstance(size, (int, fx.Node)) for size in shape):
        # A lone Node may be a whole torch.Size rather than one size.
        return None if len(shape) == 1 and isinstance(shape[0], fx.Node) else len(shape)
    return None


def _sequential_rank(children: list[nn.Module], index: int) -> int | None:
    """The rank of the input of ``children[index]`` when the children before it fix it."""
    for child in reversed(children[:index]):
        if type(child) is nn.Flatten:
            return _flatten_rank(child.start_dim, child.end_dim)
        if type(child) not in _SAME_RANK_MODULES:
            return None
    return None


# -- module plumbing -------------------------------------------------------------------------


def _f64(tensor: torch.Tensor | None) -> np.ndarray | None:
    # On the CPU: some accelerators (MPS) have no float64.
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return fm.bn_scale_shift(_f64(bn.weight), _f64(bn.bias), _f64(bn.running_mean), _f64(bn.running_var), bn.eps)


def _folded_arrays(layer: nn.Module, bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The float64 weight and bias of ``bn(layer(x))``."""
    scale, shift = _bn_affine(bn)
    if isinstance(layer, _ConvTransposeNd):
        return fm.fold_after_conv_transpose(_f64(layer.weight), _f64(layer.bias), scale, shift, layer.groups)
    # Conv (C_out, C_in/g, k...) and Linear (out, in): output channels on axis 0
    return fm.fold_after_conv(_f64(layer.weight), _f64(layer.bias), scale, shift)


def _folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))``; folded in float64, cast once."""
    folded_weight, folded_bias = _folded_arrays(layer, bn)
    weight, bias = torch.from_numpy(folded_weight), torch.from_numpy(folded_bias)
    old_weight, old_bias = layer.weight, layer.bias
    bias_dtype = old_weight.dtype if old_bias is None else old_bias.dtype
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(
        weight.to(old_weight.device, old_weight.dtype), requires_grad=old_weight.requires_grad
    )
    folded.bias = nn.Parameter(
        bias.to(old_weight.device, bias_dtype),
        requires_grad=old_weight.requires_grad if old_bias is None else old_bias.requires_grad,
    )
    return folded


def _fresh_name(gm: fx.GraphModule, target: str, bn_target: str) -> str:
    base = f"{target}_folded_{bn_target.replace('.', '_')}"
    name, count = base, 1
    *parent, _ = target.split(".")
    owner = gm.get_submodule(".".join(parent))
    while hasattr(owner, name.rsplit(".", 1)[-1]):
        count += 1
        name = f"{base}_{count}"
    return name
