"""Structural re-parameterization of torch modules: parallel branches summed into one Conv.

The torch counterpart of the ``fold-branches`` pass (same rule, same float64 math in
:mod:`normfold.math.branches`), for modules written in the training-time multi-branch form of
RepVGG, MobileOne, ACNet or DBB, without their own ``reparameterize()``:

1. ``module`` is copied (unless ``inplace``) and traced with ``torch.fx.symbolic_trace`` (a
   module that cannot be traced is left as it is, and the report says why). A *sum* is a tree
   of ``+`` / ``torch.add``, ``-`` / ``torch.sub`` calls and products by a constant (a number or
   a stored tensor: a layer scale) whose inner results nothing else reads (``nn.Identity`` calls
   between them, timm's ``drop_path`` at rate 0, are looked through); its leaves are the values
   it adds, each with its coefficient (signs times constants; a constant 0 — MobileOne's
   ``identity_out = 0`` — is dropped). FastViT's RepMixer ``x + γ·(mixer(x) − norm(x))`` is
   one sum of three branches of ``x``. A coefficient must be per channel of the merged Conv's
   output (:func:`normfold.math.batchnorm.per_channel`); a leaf that stays subtracted or scaled
   refuses its whole sum, as the rebuilt sum only adds.
2. A leaf is a *branch* of the tensor ``x`` it reads when it is, optionally followed by an
   eval-mode BatchNorm with running statistics (a call of an ``nn.BatchNorm1d/2d/3d`` module,
   or the ``F.batch_norm`` call on stored statistics that torch.fx records inside a BatchNorm
   subclass such as timm's ``BatchNormAct2d``) and ``nn.Identity`` calls (before the BN too:
   RepGhost's ``fusion_bn(fusion_conv(x))`` with an Identity ``fusion_conv``): a call of an
   ``nn.Conv1d/2d/3d`` (exactly those classes, ``padding_mode='zeros'``) on ``x``; a k×k Conv
   of a 1×1 Conv of ``x`` (DBB; exact when the k×k Conv does not pad or the 1×1 branch gives 0
   on a zero input); an ``nn.AvgPool1d/2d/3d`` counting padded zeros; or ``x`` itself. A
   branch's values may be read by other calls only for their rank or shape (timm's
   ``_assert(x.ndim == 4)``): those then read the merged Conv's output, which has the same. A Conv
   or AvgPool whose values another call reads stays; the leaf is then the identity branch of
   its output (through its BN: RepGhost's ``BN(y) + BN(DWConv(y))`` with ``y = Conv(x)``).
3. The branches of one ``x`` merge when one of them is a Conv of ``x`` and every other one reads
   the same windows centred in its kernel (strides, groups, channels, dilations, pads:
   :func:`normfold.math.branches.sub_kernel_offsets`). The merged Conv is a new module (a
   per-site clone named ``<conv>_reparam``; the original modules are never changed), with the
   summed kernel and bias computed in float64 and cast once to the reference Conv's dtype.
4. Every merge is probe-verified: on a seeded float64 probe, the merged Conv and the original
   branches (run as they are, their parameters in float64) agree within a tolerance set by the
   model's dtype; a site that does not is refused. Every refusal has its reason in a
   :class:`ReparamReport`, a :class:`normfold.errors.Refusal` turned into a report line.
5. Nothing is skipped silently: branches of one tensor that do not merge (no Conv among them,
   every Conv refused, one not fitting the Conv) and a BatchNorm branch alone in its sum (a BN of a
   tensor no Conv branch of the sum reads) are refused with the reason, so every BatchNorm a sum leaves is named.

Run :func:`normfold.torch.fold_batchnorm` before or after it for Conv + BN pairs outside sums.
"""

from __future__ import annotations

__all__ = ["MergedSum", "RefusedBranch", "ReparamReport", "reparameterize", "reparameterize_with_report"]

import copy
import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from normfold.errors import Refusal, first_line
from normfold.math import batchnorm as bnm
from normfold.math import branches as bm
from normfold.math import padding

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADDS = (operator.add, operator.iadd, torch.add)
_SUBS = (operator.sub, operator.isub, torch.sub)
_MULS = (operator.mul, operator.imul, torch.mul)
# Calls that read only a tensor's shape (timm's ``_assert(x.ndim == 4)``): they do not need the
# branch's values, and read the merged Conv's output as well.
_RANK_READS = frozenset({"ndim", "dim"})
_SHAPE_READS = frozenset({"shape", "size"})
# Agreement on the probe, relative to its largest output, per parameter dtype's epsilon.
_PROBE_ULPS = 64


@dataclasses.dataclass(frozen=True)
class MergedSum:
    """One sum whose branches of one tensor became the Conv module ``into``."""

    node: str
    into: str
    branches: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RefusedBranch:
    """A branch (or a whole sum: ``node`` is then the sum) left as it was, and why."""

    node: str
    reason: str


@dataclasses.dataclass
class ReparamReport:
    """What :func:`reparameterize` merged and refused, with reasons."""

    merged: list[MergedSum] = dataclasses.field(default_factory=list)
    refused: list[RefusedBranch] = dataclasses.field(default_factory=list)

    def refuse(self, node: str, refusal: Refusal) -> None:
        """Report ``refusal`` of the branch or sum ``node``: the one place a :class:`Refusal`
        becomes a :class:`RefusedBranch`."""
        self.refused.append(RefusedBranch(node, refusal.reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": len(self.merged),
            "merged": [dataclasses.asdict(site) for site in self.merged],
            "refused": [dataclasses.asdict(site) for site in self.refused],
        }


@dataclasses.dataclass
class _Branch:
    leaf: fx.Node
    source: fx.Node
    label: str
    kind: str  # conv | pointwise+conv | pool | identity
    nodes: list[fx.Node]  # the calls in the branch, in order
    steps: list[Callable[[torch.Tensor], torch.Tensor]]  # the same in float64, for the probe
    kernel: np.ndarray | None = None
    bias: np.ndarray | None = None
    window: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    group: int = 1
    affine: tuple[np.ndarray, np.ndarray] | None = None
    coefficient: torch.Tensor | None = None  # what the sum multiplies it by (None: 1)
    conv: nn.Module | None = None
    conv_target: str | None = None


def reparameterize(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``module`` with every exactly mergeable sum of parallel branches as one Conv.

    Returns a new module (a ``torch.fx.GraphModule`` when something merged) and leaves
    ``module`` untouched, unless ``inplace``. See :func:`reparameterize_with_report`.
    """
    return reparameterize_with_report(module, inplace=inplace)[0]


def reparameterize_with_report(
    module: nn.Module, *, inplace: bool = False
) -> tuple[nn.Module, ReparamReport]:
    """:func:`reparameterize`, and the :class:`ReparamReport` of every sum it looked at."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"reparameterize takes a torch.nn.Module, not {type(module).__name__}")
    report = ReparamReport()
    work = module if inplace else copy.deepcopy(module)
    try:
        traced = fx.symbolic_trace(work)
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
        report.refuse(type(module).__name__, Refusal(f"torch.fx cannot trace it: {first_line(error)}"))
        return work, report
    modules = dict(traced.named_modules())
    merged = 0
    for root in [n for n in traced.graph.nodes if _is_root(n, traced, modules)]:
        merged += _fold_sum(traced, root, modules, report)
    if not merged:
        return work, report
    traced.graph.eliminate_dead_code()
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, report


def _binary(node: Any, targets: tuple[Callable, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets \
        and len(node.args) == 2 and not node.kwargs


def _scale_of(node: Any, gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor] | None:
    """``(v, c)`` in float64 when ``node`` is ``v * c`` (either order) with ``c`` a number or a
    stored floating-point tensor (a layer scale: timm's ``LayerScale2d``); else None. Whether
    ``c`` is per channel is checked once the branch's Conv is known."""
    if not _binary(node, _MULS):
        return None
    for index in (0, 1):
        factor, value = node.args[index], node.args[1 - index]
        if not isinstance(value, fx.Node):
            continue
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            return value, torch.tensor(float(factor), dtype=torch.float64)
        if isinstance(factor, fx.Node) and factor.op == "get_attr":
            tensor = functools.reduce(getattr, factor.target.split("."), gm)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                return value, tensor.detach().to("cpu", torch.float64)
    return None


def _is_sum(node: Any, gm: fx.GraphModule) -> bool:
    """``+``, ``-`` or a product by a constant: a node a sum tree goes through."""
    return _binary(node, _ADDS + _SUBS) or _scale_of(node, gm) is not None


def _through_identities(node: Any, modules: dict[str, nn.Module]) -> tuple[Any, list[fx.Node]]:
    """``node`` with the single-reader ``nn.Identity`` calls before it skipped (timm's
    ``drop_path`` at rate 0), and the skipped calls."""
    skipped = []
    while _call(node, modules, (nn.Identity,)) is not None and len(node.args[0].users) == 1:
        skipped.append(node)
        node = node.args[0]
    return node, skipped


def _is_root(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> bool:
    """A sum node whose result does not go, through Identity calls at most, into another."""
    if not _is_sum(node, gm):
        return False
    while len(node.users) == 1:
        (user,) = node.users
        if _is_sum(user, gm):
            return False
        if _call(user, modules, (nn.Identity,)) is None:
            return True
        node = user
    return True


def _sum_tree(root: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]
              ) -> tuple[set[fx.Node], list[tuple[Any, torch.Tensor | None]]]:
    """The sum nodes of the tree at ``root`` and its leaves, each with its coefficient: None
    for 1, else the float64 product of its signs (a ``-``'s second input is subtracted) and the
    constants it is multiplied by — FastViT's RepMixer ``x + γ·(mixer(x) − norm(x))``."""
    nodes, leaves = {root}, []

    def visit(node: fx.Node, coefficient: torch.Tensor | None) -> None:
        scaled = _scale_of(node, gm)
        if scaled is not None:
            value, factor = scaled
            terms = [(value, factor if coefficient is None else coefficient * factor)]
        else:
            minus = torch.tensor(-1.0, dtype=torch.float64) if coefficient is None else -coefficient
            terms = [(node.args[0], coefficient),
                     (node.args[1], minus if node.target in _SUBS else coefficient)]
        for arg, term in terms:
            inner, skipped = _through_identities(arg, modules)
            if _is_sum(inner, gm) and len(inner.users) == 1:
                nodes.update([inner, *skipped])
                visit(inner, term)
            else:
                leaves.append((arg, term))

    visit(root, None)
    return nodes, leaves


def _call(node: Any, modules: dict[str, nn.Module], kinds: tuple[type, ...]) -> nn.Module | None:
    """The module ``node`` calls when it is exactly one of ``kinds`` (a subclass may differ)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = modules[node.target]
        if type(module) in kinds:
            return module
    return None


def _f64(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    if bn.training:
        raise Refusal("its BatchNorm is in training mode (call .eval())")
    if bn.running_mean is None or bn.running_var is None:
        raise Refusal("its BatchNorm has no running statistics")
    channels = bn.num_features
    gamma = _f64(bn.weight) if bn.weight is not None else np.ones(channels)
    beta = _f64(bn.bias) if bn.bias is not None else np.zeros(channels)
    return bnm.bn_scale_shift(gamma, beta, _f64(bn.running_mean), _f64(bn.running_var), bn.eps)


def _conv_geometry(conv: nn.Module) -> tuple[tuple[int, ...], ...]:
    if conv.padding_mode != "zeros":
        raise Refusal(f"it pads with '{conv.padding_mode}', not zeros")
    window = tuple(conv.kernel_size)
    pads = padding.torch_conv_pads(conv.padding, window, conv.dilation)
    return window, tuple(conv.stride), pads, tuple(conv.dilation)


def _shape_read(user: fx.Node) -> str | None:
    """``"rank"`` or ``"shape"`` when ``user`` reads only that of its input, else None."""
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        attribute = user.args[1]
    elif user.op == "call_method" and user.target in _RANK_READS | _SHAPE_READS:
        attribute = user.target
    else:
        return None
    return "rank" if attribute in _RANK_READS else "shape" if attribute in _SHAPE_READS else None


def _value_readers(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if _shape_read(user) is None]


def _module_step(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def step(x: torch.Tensor) -> torch.Tensor:
        return copy.deepcopy(module).to(torch.float64)(x)

    return step


def _fetch(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise Refusal(f"a BatchNorm statistic `{node}` is computed, not a stored tensor")
    return functools.reduce(getattr, node.target.split("."), gm)


def _batchnorm_at(node: Any, gm: fx.GraphModule, modules: dict[str, nn.Module]
                  ) -> tuple[tuple[np.ndarray, np.ndarray], Callable] | None:
    """``(affine, float64 step)`` when ``node`` is an eval-mode BatchNorm: a call of an
    ``nn.BatchNorm1d/2d/3d`` module, or of ``F.batch_norm`` on stored statistics (what torch.fx
    records inside a BatchNorm subclass such as timm's ``BatchNormAct2d``)."""
    bn = _call(node, modules, _BATCHNORMS)
    if bn is not None:
        return _bn_affine(bn), _module_step(bn)
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is nn.functional.batch_norm):
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    given = dict(zip(names, node.args)) | dict(node.kwargs)
    if given.get("training", False) is not False:
        raise Refusal(f"`{node.name}` normalizes with batch statistics (training=True)")
    mean, var = _fetch(gm, given.get("running_mean")), _fetch(gm, given.get("running_var"))
    if mean is None or var is None:
        raise Refusal(f"`{node.name}` has no running statistics")
    weight, bias = _fetch(gm, given.get("weight")), _fetch(gm, given.get("bias"))
    eps = float(given.get("eps", 1e-5))
    channels = mean.numel()
    scale, shift = bnm.bn_scale_shift(
        _f64(weight) if weight is not None else np.ones(channels),
        _f64(bias) if bias is not None else np.zeros(channels),
        _f64(mean), _f64(var), eps,
    )
    tensors = [None if t is None else t.detach().to("cpu", torch.float64) for t in (mean, var, weight, bias)]

    def step(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, tensors[0], tensors[1], tensors[2], tensors[3], False, 0.0, eps)

    return (scale, shift), step


def _read_branch(leaf: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> _Branch:
    nodes: list[fx.Node] = []
    mods: list[Callable] = []
    inner, affine = leaf, None
    # timm's ConvNormAct(apply_act=False) ends in nn.Identity calls (its act and drop).
    while (identity := _call(inner, modules, (nn.Identity,))) is not None:
        nodes.insert(0, inner)
        mods.insert(0, _module_step(identity))
        inner = inner.args[0]
    found = _batchnorm_at(inner, gm, modules)
    if found is not None:
        affine, step = found
        nodes.insert(0, inner)
        mods.insert(0, step)
        inner = inner.args[0]
        # RepGhost's ``fusion_bn(fusion_conv(x))`` with ``fusion_conv = nn.Identity()``: the
        # identity branch of ``x``, read by the cheap depthwise Conv as well.
        while (identity := _call(inner, modules, (nn.Identity,))) is not None \
                and len(_value_readers(inner)) == 1:
            nodes.insert(0, inner)
            mods.insert(0, _module_step(identity))
            inner = inner.args[0]
    conv = _call(inner, modules, _CONVS)
    pool = _call(inner, modules, _POOLS)
    if conv is None and pool is None:
        return _Branch(leaf, inner, f"identity {leaf.name}", "identity", nodes, mods, affine=affine)
    if len(_value_readers(inner)) != 1:
        # Its output is needed elsewhere, so it stays: what the leaf adds is the identity branch
        # of that output (through the BN, if any) — RepGhost's ``BN(y) + BN(DWConv(y))`` with
        # ``y = Conv(x)``, a residual ``y + f(y)``.
        return _Branch(leaf, inner, f"identity {leaf.name}", "identity", nodes, mods, affine=affine)
    nodes.insert(0, inner)
    mods.insert(0, _module_step(conv if conv is not None else pool))
    if pool is not None:
        window = _tuple(pool.kernel_size, pool)
        strides = _tuple(pool.stride, pool)
        pads = _tuple(pool.padding, pool)
        if pool.ceil_mode:
            raise Refusal(f"{inner.name} has ceil_mode=True: its last window may be partial")
        if any(pads) and not pool.count_include_pad:
            raise Refusal(f"{inner.name} pads without count_include_pad")
        if getattr(pool, "divisor_override", None):
            raise Refusal(f"{inner.name} has a divisor_override")
        return _Branch(leaf, inner.args[0], inner.name, "pool", nodes, mods, window=window,
                       strides=strides, pads=(*pads, *pads), dilations=(1,) * len(window),
                       affine=affine)
    window, strides, pads, dilations = _conv_geometry(conv)
    branch = _Branch(leaf, inner.args[0], inner.target, "conv", nodes, mods,
                     kernel=_f64(conv.weight), bias=_f64(conv.bias), window=window,
                     strides=strides, pads=pads, dilations=dilations, group=conv.groups,
                     affine=affine, conv=conv, conv_target=inner.target)
    _compose_pointwise(branch, gm, modules)
    return branch


def _tuple(value: Any, pool: nn.Module) -> tuple[int, ...]:
    rank = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(pool)]
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def _compose_pointwise(branch: _Branch, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """A k×k Conv reading a 1×1 Conv (through a BN, maybe) becomes a branch of the 1×1's input."""
    middle = branch.nodes[0].args[0]
    extra, mid_affine, mid_steps = [], None, []
    try:
        found = _batchnorm_at(middle, gm, modules)
    except Refusal:
        return
    if found is not None:
        mid_affine, step = found
        mid_steps.append(step)
        extra.append(middle)
        middle = middle.args[0]
    first = _call(middle, modules, _CONVS)
    if first is None or first.groups != branch.group or first.padding_mode != "zeros":
        return
    window, strides, pads, _ = _conv_geometry(first)
    if any(w != 1 for w in window) or any(s != 1 for s in strides) or any(pads):
        return
    chain = [middle, *extra, branch.nodes[0]]
    if any(len(node.users) != 1 for node in chain[:-1]):
        # The 1×1 result is needed elsewhere (even for its shape alone, which differs from the
        # merged Conv's): the k×k Conv is the branch on its own.
        return
    branch.kernel, branch.bias = bm.prepend_pointwise(
        _f64(first.weight), _f64(first.bias), mid_affine, branch.kernel, branch.bias, branch.group,
        padded=any(branch.pads), first_name=str(middle.target), second_name=branch.label,
    )
    branch.nodes[:0] = [middle, *extra]
    branch.steps[:0] = [_module_step(first), *mid_steps]
    branch.source = middle.args[0]
    branch.label = f"{middle.target} → {branch.label}"
    branch.kind = "pointwise+conv"


def _check_readers(branch: _Branch, tree: set[fx.Node]) -> None:
    for node in branch.nodes[:-1]:
        if len(_value_readers(node)) != 1:
            raise Refusal(f"`{node.name}` is also read by {sorted(u.name for u in _value_readers(node))}")
    if branch.nodes and any(user not in tree for user in _value_readers(branch.leaf)):
        raise Refusal(f"`{branch.leaf.name}` is also read outside the sum: merging would keep it")


def _branch_kernel(branch: _Branch, reference: _Branch) -> tuple[np.ndarray, np.ndarray]:
    """``branch``'s kernel padded to the reference's and its bias, float64, before its BN."""
    out_channels, in_per_group = reference.kernel.shape[:2]
    group, spatial = reference.group, len(reference.window)
    if branch.kind == "identity":
        window, strides = (1,) * spatial, (1,) * spatial
        pads, dilations = (0,) * (2 * spatial), (1,) * spatial
    else:
        window, strides, pads, dilations = branch.window, branch.strides, branch.pads, branch.dilations
    if strides != reference.strides:
        raise Refusal(f"{branch.label} has strides {list(strides)}, {reference.label} {list(reference.strides)}")
    if branch.kind in ("identity", "pool"):
        if out_channels != in_per_group * group:
            raise Refusal(f"{branch.label} keeps {in_per_group * group} channels, "
                           f"{reference.label} makes {out_channels}")
        kernel = (bm.identity_kernel(out_channels, group, spatial) if branch.kind == "identity"
                  else bm.average_pool_kernel(out_channels, group, window))
        bias = np.zeros(out_channels)
    else:
        if branch.group != group or branch.kernel.shape[:2] != (out_channels, in_per_group):
            raise Refusal(f"{branch.label} has a {list(branch.kernel.shape)} weight in "
                           f"{branch.group} group(s), {reference.label} a "
                           f"{list(reference.kernel.shape)} one in {group}")
        kernel = branch.kernel
        bias = np.zeros(out_channels) if branch.bias is None else branch.bias
    try:
        offsets = bm.sub_kernel_offsets(window, pads, dilations, reference.window,
                                        reference.pads, reference.dilations)
    except ValueError as error:
        raise Refusal(f"{branch.label} does not fit in {reference.label}: {error}") from None
    return bm.pad_kernel(kernel, offsets, reference.window), bias


@dataclasses.dataclass
class _Fit:
    """The branches of one sum that fit in ``reference`` (check) and what the rewrite sums."""

    reference: _Branch
    parts: list[tuple[np.ndarray, np.ndarray]]  # (kernel, bias), BN folded, padded to the reference
    used: list[_Branch]  # the branches ``parts`` come from, in the same order
    refusals: list[tuple[_Branch, Refusal]]  # the branches that do not fit, and why


def _fit(branches: list[_Branch], reference: _Branch) -> _Fit:
    parts, used, refusals = [], [], []
    for branch in branches:
        try:
            kernel, bias = _branch_kernel(branch, reference)
        except Refusal as refusal:
            refusals.append((branch, refusal))
            continue
        if branch.affine is not None:
            kernel, bias = bnm.fold_after_conv(kernel, bias, *branch.affine)
        if branch.coefficient is not None:
            channels = kernel.shape[0]
            try:
                scale = bnm.per_channel(branch.coefficient.numpy(), len(reference.window) + 2, 1,
                                        channels, of=f"{branch.label}")
            except Refusal as refusal:
                refusals.append((branch, refusal))
                continue
            kernel, bias = bnm.fold_after_conv(kernel, bias, scale, np.zeros(channels))
        parts.append((kernel, bias))
        used.append(branch)
    return _Fit(reference, parts, used, refusals)


def _merged_conv(reference: _Branch, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    conv = reference.conv
    merged = type(conv)(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        merged.weight.copy_(torch.from_numpy(weight))
        merged.bias.copy_(torch.from_numpy(bias))
    merged.train(conv.training)
    return merged


def _run_branch(branch: _Branch, x: torch.Tensor) -> torch.Tensor:
    for step in branch.steps:
        x = step(x)
    return x


def _require_probe_match(used: list[_Branch], merged: nn.Module, reference: _Branch) -> None:
    """Raise :class:`Refusal` unless the merged Conv computes the branches' sum on a seeded
    float64 probe."""
    conv = reference.conv
    spatial = tuple(2 * k * d + 3 for k, d in zip(conv.kernel_size, conv.dilation))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, conv.in_channels, *spatial), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = sum(_run_branch(branch, x) * (1 if branch.coefficient is None else branch.coefficient)
                       for branch in used)
        actual = copy.deepcopy(merged).to(torch.float64)(x)
    if actual.shape != expected.shape:
        raise Refusal(f"the merged Conv gives shape {list(actual.shape)}, the branches {list(expected.shape)}")
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    limit = _PROBE_ULPS * torch.finfo(conv.weight.dtype).eps * max(scale, 1.0)
    if not error <= limit:
        raise Refusal(f"on a probe the merged Conv is {error:.3g} away from the branches (limit {limit:.3g})")


def _fold_sum(gm: fx.GraphModule, root: fx.Node, modules: dict[str, nn.Module],
              report: ReparamReport) -> int:
    tree, terms = _sum_tree(root, gm, modules)
    terms = [(leaf, c) for leaf, c in terms if not (isinstance(leaf, (int, float)) and leaf == 0)]
    leaves = [leaf for leaf, _ in terms]
    groups: dict[fx.Node, list[_Branch]] = {}
    for leaf, coefficient in terms:
        if not isinstance(leaf, fx.Node):
            continue
        try:
            branch = _read_branch(leaf, gm, modules)
        except Refusal as refusal:
            report.refuse(leaf.name, refusal)
            continue
        branch.coefficient = coefficient
        groups.setdefault(branch.source, []).append(branch)
    plans: list[tuple[fx.Node, _Branch, nn.Module, list[_Branch]]] = []
    for source, branches in groups.items():
        if len(branches) < 2 or not any(b.kind == "conv" for b in branches):
            _refuse_unmergeable(source, branches, report)
            continue
        ready = []
        for branch in branches:
            try:
                _check_readers(branch, tree)
            except Refusal as refusal:
                report.refuse(branch.leaf.name, refusal)
                continue
            ready.append(branch)
        convs = [b for b in ready if b.kind == "conv"]
        if not convs:
            for branch in ready:
                report.refuse(branch.leaf.name, Refusal(
                    f"every Conv branch of `{source.name}` in this sum was refused: nothing is "
                    "left to merge it into"))
            continue
        largest = max(int(np.prod(b.window)) for b in convs)
        attempts = [_fit(ready, c) for c in convs if int(np.prod(c.window)) == largest]
        fit = max(attempts, key=lambda a: len(a.used))
        reference, parts, used = fit.reference, fit.parts, fit.used
        for branch, refusal in fit.refusals:
            report.refuse(branch.leaf.name, refusal)
        if len(used) < 2:  # every other branch is in fit.refusals, reported above
            continue
        weight = np.sum([k for k, _ in parts], axis=0)
        bias = np.sum([b for _, b in parts], axis=0)
        merged = _merged_conv(reference, weight, bias)
        try:
            _require_probe_match(used, merged, reference)
        except Refusal as refusal:
            report.refuse(root.name, refusal)
            continue
        plans.append((source, reference, merged, used))
    merged_leaves = {id(b.leaf) for *_, used in plans for b in used}
    scaled = [leaf for leaf, c in terms if c is not None and id(leaf) not in merged_leaves]
    if plans and scaled:
        # The rebuilt sum adds its leaves as they are; a subtracted or scaled one would need
        # its own Mul, which is not written.
        report.refuse(root.name, Refusal(
            f"{_describe(scaled[0])} stays in the sum subtracted or scaled, and the rebuilt sum "
            "only adds: nothing in this sum is merged"))
        return 0
    replacements: dict[fx.Node, tuple[fx.Node, list[_Branch]]] = {}
    for source, reference, merged, used in plans:
        name = _fresh_name(gm, f"{reference.conv_target}_reparam")
        gm.add_submodule(name, merged)
        modules[name] = merged  # a later sum may read it
        # Right after its input: the shape readers of the branches (timm's asserts) move to it.
        with gm.graph.inserting_after(source):
            node = gm.graph.call_module(name, (source,))
        for branch in used:
            for inner in branch.nodes:
                for user in list(inner.users):
                    if _shape_read(user) is not None:
                        user.replace_input_with(inner, node)
        replacements[source] = (node, used)
        report.merged.append(MergedSum(root.name, name, tuple(b.label for b in used)))
    if not replacements:
        return 0
    first = {id(used[0].leaf): node for node, used in replacements.values()}
    kept = []
    for leaf in leaves:
        if id(leaf) in first:
            kept.append(first.pop(id(leaf)))
        elif id(leaf) not in merged_leaves:
            kept.append(leaf)
    total = kept[0]
    with gm.graph.inserting_before(root):
        for term in kept[1:]:
            total = gm.graph.call_function(operator.add, (total, term))
    root.replace_all_uses_with(total)
    return len(replacements)


def _refuse_unmergeable(source: fx.Node, branches: list[_Branch], report: ReparamReport) -> None:
    """The reasons a group of branches of ``source`` with no Conv to merge into stays.

    A lone Conv (+ BN) branch is no multi-branch site (:func:`normfold.torch.fold_batchnorm`
    folds its BN); a BatchNorm branch of a tensor that no Conv branch shares (two BNs of one
    tensor, a BN alone in its sum) has nothing to merge into, and the report says so, so no BN
    is left without a reason.
    """
    if len(branches) < 2 and branches[0].kind != "identity":
        return
    if len(branches) < 2 and branches[0].affine is None:
        return  # ``x`` itself as a term: a residual connection, not a branch of a block
    for branch in branches:
        if len(branches) < 2:
            reason = (f"the only branch of `{source.name}` in this sum is a BatchNorm of it, and "
                      f"no Conv branch of `{source.name}` is there to merge it into")
        else:
            reason = (f"none of the {len(branches)} branches of `{source.name}` in this sum is a "
                      "Conv to merge them into")
        report.refuse(branch.leaf.name, Refusal(reason))


def _describe(leaf: Any) -> str:
    return f"`{leaf.name}`" if isinstance(leaf, fx.Node) else f"the constant {leaf!r}"


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    stem = base.replace(".", "_")
    name, count = stem, 1
    while hasattr(gm, name):
        count += 1
        name = f"{stem}_{count}"
    return name
