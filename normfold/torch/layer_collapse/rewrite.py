"""Merge what became linear in a torch.fx graph (TLC step 3), verifying every merge.

:func:`merge_layers` works on a float64 copy in eval mode and applies these rules until none
applies (the arithmetic is :mod:`normfold.math.conv_merge`):

1. Identity and Dropout calls disappear.
2. A BatchNorm or :class:`~.linearize.ChannelAffine` folds into the Conv or Linear before it
   when nothing else reads that layer and the affine map's axis is the layer's output channels
   (axis 1 after a Conv, the last axis after a Linear); after ``Conv(x) + Conv(y)`` its scale
   goes into both convs and its shift into the first.
3. ``Conv(x) + x`` and ``Conv(x) + Conv1x1(x)`` (a residual block whose branch became one
   conv) become one conv, the shortcut in the centre tap.
4. ``Conv(Conv(x))`` and ``Linear(Linear(x))`` become one layer when nothing else reads the
   first; ``Linear(flatten(GlobalAvgPool(Conv(x))))`` becomes ``flatten(GlobalAvgPool(Conv'(x)))``
   (the classifier moves before the pool, with which it commutes, and merges into the conv), and
   through ``GlobalAvgPool(Conv(x) + Conv(y))`` into both convs (its bias into one), or through
   ``GlobalAvgPool(Conv(x) + y)`` into the conv and a new 1×1 conv on ``y``: a residual
   network's linear suffix shrinks to the classifier's width.
5. An affine map that did not fold back folds forward into a single reading Conv or Linear
   (a Conv only when unpadded or the shift is zero), also through a global average pool and
   flatten into the classifier (they commute with a per-channel affine map).

Refused, with the reason: a merge whose MACs exceed ``max_flops_growth`` times the unmerged
layers' (default 1.0: depth is never bought with more work unless asked), unless every layer it
merges belongs to a ``free`` segment (one the caller judged by the cost of its final merged form,
see :mod:`.segments`: its pairwise merges may grow on the way to a form that shrinks); a Conv∘Conv merge whose
second conv is padded (exact only after :func:`.graph.pad_first`), unless ``allow_border``; a
shortcut whose stride or taps do not line up.

After every merge the graph runs on the example inputs and its outputs are compared with the
unmerged model's (float64): each :class:`Merge` carries its ``max_error``, and an exact merge
that changes the outputs raises (a bug, never the user's input).
"""

from __future__ import annotations

__all__ = ["Merge", "MergeResult", "conv_spec", "layer_count", "merge_layers", "record_shapes"]

import copy
import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from normfold.math import conv_merge as merge
from normfold.errors import Refusal
from normfold.math import batchnorm as fm
from normfold.torch.layer_collapse.graph import (
    describe,
    is_add,
    is_batchnorm,
    is_conv,
    is_flatten,
    is_global_pool,
    is_linear,
    module_of,
    padding_of,
)
from normfold.torch.layer_collapse.linearize import ChannelAffine

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_SHAPE = "collapse_shape"


@dataclasses.dataclass
class Merge:
    """One rewrite: ``kind``, the nodes it removed, the node that computes the result now."""

    kind: str  # fold | conv-conv | linear-linear | shortcut | classifier-into-conv
    removed: list[str]
    into: str
    exact: bool = True
    max_error: float = 0.0
    macs: tuple[int, int] | None = None  # (unmerged, merged) for layer merges
    relative_error: float = 0.0  # max_error over the largest |output| of the unmerged model

    def to_dict(self) -> dict[str, Any]:
        result = {"kind": self.kind, "removed": self.removed, "into": self.into,
                  "exact": self.exact, "max_error": self.max_error, "relative_error": self.relative_error}
        if self.macs is not None:
            result["macs_unmerged"], result["macs_merged"] = self.macs
        return result


@dataclasses.dataclass
class MergeResult:
    """The merged module (original dtype, eval mode), what was merged and what was refused."""

    module: fx.GraphModule
    merges: list[Merge]
    refused: dict[str, str]

    @property
    def layers_merged(self) -> int:
        return sum(1 for m in self.merges if m.kind != "fold")


def layer_count(gm: fx.GraphModule) -> int:
    """The Conv and Linear calls of ``gm``."""
    return sum(1 for n in gm.graph.nodes if is_conv(gm, n) or is_linear(gm, n))


def record_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    """Run ``gm`` on ``inputs``, storing each tensor node's output shape in its meta; returns the output."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                n.meta[_SHAPE] = tuple(result.shape)
            return result

    with torch.no_grad():
        return _Recorder(gm).run(*inputs)


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return node.meta[_SHAPE]


def conv_spec(module: nn.Module) -> merge.Conv:
    """A Conv module as a float64 :class:`normfold.math.conv_merge.Conv`."""
    weight = module.weight.detach().double().cpu().numpy()
    bias = module.bias.detach().double().cpu().numpy() if module.bias is not None else np.zeros(weight.shape[0])
    return merge.Conv(weight, bias, tuple(module.stride), padding_of(module), tuple(module.dilation), module.groups)


def _conv_module(spec: merge.Conv, like: nn.Module) -> nn.Module:
    module = type(like)(
        spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride, padding=spec.padding,
        dilation=spec.dilation, groups=spec.groups, bias=True, dtype=torch.float64,
        device=like.weight.device,
    )
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(spec.weight))
        module.bias.copy_(torch.from_numpy(spec.bias))
    return module


def _linear_module(weight: np.ndarray, bias: np.ndarray, like: nn.Linear) -> nn.Linear:
    module = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64, device=like.weight.device)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    return module


def _linear_weights(module: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    weight = module.weight.detach().double().cpu().numpy()
    bias = module.bias.detach().double().cpu().numpy() if module.bias is not None else np.zeros(weight.shape[0])
    return weight, bias


def merge_layers(
    model: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    max_flops_growth: float = 1.0,
    allow_border: bool = False,
    verify: bool = True,
    free: Collection[str] = (),
    weights: bool = True,
) -> MergeResult:
    """Merge every linear run of ``model`` (not modified) by the rules in the module docstring.

    ``verify=False`` skips running the model after each merge (``max_error`` stays 0), and
    ``weights=False`` (only without verifying) gives merged convs zero weights of the right shape
    instead of composing them: both for planning, when the merged model is only counted and timed,
    never returned to a user.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gm = copy.deepcopy(model).eval().double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in example_inputs)
    if verify and not weights:
        raise ValueError("merge_layers: weights=False is for planning and cannot be verified")
    engine = _Engine(gm, inputs, max_flops_growth=max_flops_growth, allow_border=allow_border, verify=verify,
                     free=free, weights=weights)
    engine.run()
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return MergeResult(gm.to(dtype), engine.merges, engine.refused)


class _Engine:
    def __init__(
        self, gm: fx.GraphModule, inputs: tuple, *, max_flops_growth: float, allow_border: bool, verify: bool,
        free: Collection[str], weights: bool,
    ) -> None:
        self.gm = gm
        self.free = set(free)
        self.weights = weights
        self.verify = verify
        self.inputs = inputs
        self.max_flops_growth = max_flops_growth
        self.allow_border = allow_border
        self.merges: list[Merge] = []
        self.refused: dict[str, str] = {}
        self.reference = _flat(record_shapes(gm, inputs))
        self.scale = max((float(t.abs().max()) for t in self.reference if t.numel()), default=1.0)
        self._names = 0

    def run(self) -> None:
        rules: list[Callable[[fx.Node], Merge | None | bool]] = [
            self._passthrough, self._fold_into_producer, self._shortcut, self._conv_conv,
            self._linear_linear, self._classifier_into_conv, self._fold_into_consumer,
        ]
        changed = True
        while changed:
            changed = False
            for rule in rules:
                for node in list(self.gm.graph.nodes):
                    outcome = rule(node)
                    if outcome:
                        self._commit(outcome)
                        changed = True
                        break
                if changed:
                    break

    def _commit(self, outcome: Merge | bool) -> None:
        self.gm.graph.lint()
        if not self.verify:  # nothing runs the graph before merge_layers recompiles it once
            if isinstance(outcome, Merge):
                self.merges.append(outcome)
            return
        self.gm.recompile()
        outputs = _flat(record_shapes(self.gm, self.inputs))
        if not isinstance(outcome, Merge):
            return
        error = max((float((a - b).abs().max()) for a, b in zip(outputs, self.reference) if a.numel()), default=0.0)
        outcome.max_error = error
        outcome.relative_error = error / self.scale if self.scale else error
        if outcome.exact and error > 1e-9 * max(1.0, self.scale):
            raise RuntimeError(
                f"normfold bug: the {outcome.kind} merge into {outcome.into} changed the outputs by {error:.3g}"
            )
        self.merges.append(outcome)

    def _install(self, module: nn.Module, stem: str) -> str:
        while True:
            self._names += 1
            name = f"collapsed_{stem}_{self._names}"
            if not hasattr(self.gm, name):
                self.gm.add_submodule(name, module)
                return name

    def _refuse(self, node: fx.Node, reason: str) -> None:
        self.refused.setdefault(node.name, reason)

    # 1. Identity and Dropout
    def _passthrough(self, node: fx.Node) -> bool:
        if type(module_of(self.gm, node)) not in _PASSTHROUGH:
            return False
        node.replace_all_uses_with(node.args[0])
        self.gm.graph.erase_node(node)
        return True

    def _affine(self, node: fx.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
        """``(scale, shift, axis)`` of a BatchNorm or ChannelAffine call, axis normalized."""
        module = module_of(self.gm, node)
        if is_batchnorm(self.gm, node):
            def f64(t):
                return None if t is None else t.detach().double().cpu().numpy()
            scale, shift = fm.bn_scale_shift(
                f64(module.weight), f64(module.bias), f64(module.running_mean), f64(module.running_var), module.eps
            )
            return scale, shift, 1
        if isinstance(module, ChannelAffine):
            return (module.slope.detach().double().cpu().numpy(), module.offset.detach().double().cpu().numpy(),
                    module.axis % len(shape_of(node)))
        return None

    # 2. BatchNorm / ChannelAffine into the layer before it
    def _fold_into_producer(self, node: fx.Node) -> Merge | None:
        affine = self._affine(node)
        source = node.args[0] if node.args else None
        if affine is None or not isinstance(source, fx.Node) or len(source.users) != 1:
            return None
        scale, shift, axis = affine
        layer = module_of(self.gm, source)
        rank = len(shape_of(node))
        if is_add(source) and axis == 1:
            return self._fold_into_branches(node, source, scale, shift)
        if is_conv(self.gm, source) and axis == 1:
            new = _conv_module(merge.affine_after(conv_spec(layer), scale, shift), layer)
        elif is_linear(self.gm, source) and axis == rank - 1:
            weight, bias = _linear_weights(layer)
            new = _linear_module(*fm.fold_after_conv(weight, bias, scale, shift), layer)  # (out, in): axis 0
        else:
            return None
        source.target = self._install(new, source.name)
        node.replace_all_uses_with(source)
        self.gm.graph.erase_node(node)
        return Merge("fold", [node.name], source.name)

    def _fold_into_branches(self, node: fx.Node, add: fx.Node, scale: np.ndarray, shift: np.ndarray) -> Merge | None:
        """``s·(Conv(x) + Conv(y)) + t``: the scale into both convs, the shift into the first."""
        convs = list(add.args[:2])
        if len(set(convs)) != 2 or not all(is_conv(self.gm, c) and len(c.users) == 1 for c in convs):
            return None
        for index, conv in enumerate(convs):
            layer = module_of(self.gm, conv)
            spec = merge.affine_after(conv_spec(layer), scale, shift if index == 0 else np.zeros_like(shift))
            conv.target = self._install(_conv_module(spec, layer), conv.name)
        node.replace_all_uses_with(add)
        self.gm.graph.erase_node(node)
        return Merge("fold", [node.name], ", ".join(c.name for c in convs))

    # 5. ... or into the layer after it
    def _fold_into_consumer(self, node: fx.Node) -> Merge | None:
        affine = self._affine(node)
        if affine is None or len(node.users) != 1:
            return None
        scale, shift, axis = affine
        reader = next(iter(node.users))
        if not reader.args or reader.args[0] is not node:
            return None
        if axis == 1 and is_global_pool(self.gm, reader):
            return self._fold_through_pool(node, reader, scale, shift)
        layer = module_of(self.gm, reader)
        rank = len(shape_of(node))
        if is_conv(self.gm, reader) and axis == 1:
            spec = conv_spec(layer)
            if any(spec.padding) and np.any(shift != 0):
                self._refuse(node, f"{describe(self.gm, reader)} is zero-padded: the shift would reach its border")
                return None
            new = _conv_module(merge.affine_before(spec, scale, shift), layer)
        elif is_linear(self.gm, reader) and axis == rank - 1:
            weight, bias = _linear_weights(layer)
            new = _linear_module(*fm.fold_before_conv(weight, bias, scale, shift, 1), layer)  # (out, in)
        else:
            return None
        reader.target = self._install(new, reader.name)
        reader.args = (node.args[0],) + tuple(reader.args[1:])
        self.gm.graph.erase_node(node)
        return Merge("fold", [node.name], reader.name)

    def _fold_through_pool(self, node: fx.Node, pool: fx.Node, scale: np.ndarray, shift: np.ndarray) -> Merge | None:
        """``Linear(flatten(GAP(s·z + t)))``: the pool and flatten commute with it, the Linear takes it."""
        flatten = next(iter(pool.users)) if len(pool.users) == 1 else None
        if flatten is None or not is_flatten(self.gm, flatten) or len(flatten.users) != 1:
            return None
        linear = next(iter(flatten.users))
        if not is_linear(self.gm, linear):
            return None
        layer = module_of(self.gm, linear)
        weight, bias = _linear_weights(layer)
        folded = _linear_module(weight * scale[None, :], bias + weight @ shift, layer)
        linear.target = self._install(folded, linear.name)
        node.replace_all_uses_with(node.args[0])
        self.gm.graph.erase_node(node)
        return Merge("fold", [node.name], linear.name)

    # 3. residual blocks whose branch is one conv
    def _shortcut(self, node: fx.Node) -> Merge | None:
        if not is_add(node):
            return None
        a, b = node.args[:2]
        for conv, other in ((a, b), (b, a)):
            if not (is_conv(self.gm, conv) and len(conv.users) == 1) or shape_of(conv) != shape_of(node):
                continue
            x = conv.args[0]
            spec = conv_spec(module_of(self.gm, conv))
            try:
                if other is x:
                    merged, removed = merge.add_identity(spec), [conv.name]
                elif is_conv(self.gm, other) and len(other.users) == 1 and other.args[0] is x:
                    merged = merge.add_shortcut(spec, conv_spec(module_of(self.gm, other)))
                    removed = [conv.name, other.name]
                else:
                    continue
            except Refusal as refusal:
                self._refuse(node, f"the shortcut cannot fold into {describe(self.gm, conv)}: {refusal.reason}")
                continue
            name = self._install(_conv_module(merged, module_of(self.gm, conv)), node.name)
            with self.gm.graph.inserting_before(node):
                replacement = self.gm.graph.create_node("call_module", name, (x,), {}, name=f"{node.name}_merged")
            replacement.meta[_SHAPE] = shape_of(node)
            if node.name in self.free:
                self.free.add(replacement.name)
            node.replace_all_uses_with(replacement)
            self.gm.graph.erase_node(node)
            for dead in (conv, other) if len(removed) == 2 else (conv,):
                self.gm.graph.erase_node(dead)
            return Merge("shortcut", removed + [node.name], replacement.name)
        return None

    def _too_costly(self, nodes: Sequence[fx.Node], what: str, unmerged: int, merged: int) -> bool:
        if merged <= self.max_flops_growth * unmerged or all(n.name in self.free for n in nodes):
            return False
        node = nodes[0]
        self._refuse(
            node,
            f"merging {what} would grow the work x{merged / unmerged:.2f} "
            f"({unmerged} -> {merged} MACs per output position) > max_flops_growth {self.max_flops_growth:g}",
        )
        return True

    # 4a. Conv ∘ Conv
    def _conv_conv(self, node: fx.Node) -> Merge | None:
        source = node.args[0] if node.args else None
        if not (is_conv(self.gm, node) and isinstance(source, fx.Node) and is_conv(self.gm, source)):
            return None
        if len(source.users) != 1 or type(module_of(self.gm, source)) is not type(module_of(self.gm, node)):
            return None
        first, second = conv_spec(module_of(self.gm, source)), conv_spec(module_of(self.gm, node))
        exact = not any(second.padding)
        if not exact and not self.allow_border:
            self._refuse(
                node,
                f"{describe(self.gm, node)} is zero-padded: merging it with {describe(self.gm, source)} is exact "
                "only after pad-first (its padding moved to the first conv)",
            )
            return None
        unmerged, merged_macs = merge.compose_macs(first, second)
        what = f"{describe(self.gm, source)} and {describe(self.gm, node)}"
        if self._too_costly((node, source), what, unmerged, merged_macs):
            return None
        merged = merge.compose_conv(first, second, weights=self.weights)
        node.target = self._install(_conv_module(merged, module_of(self.gm, node)), node.name)
        node.args = (source.args[0],) + tuple(node.args[1:])
        self.gm.graph.erase_node(source)
        return Merge("conv-conv", [source.name], node.name, exact=exact, macs=(unmerged, merged_macs))

    # 4b. Linear ∘ Linear
    def _linear_linear(self, node: fx.Node) -> Merge | None:
        source = node.args[0] if node.args else None
        if not (is_linear(self.gm, node) and isinstance(source, fx.Node) and is_linear(self.gm, source)):
            return None
        if len(source.users) != 1:
            return None
        first, second = _linear_weights(module_of(self.gm, source)), _linear_weights(module_of(self.gm, node))
        (mid, width), out = first[0].shape, second[0].shape[0]
        unmerged, merged_macs = width * mid + mid * out, width * out
        if self._too_costly((node, source), f"{describe(self.gm, source)} and {describe(self.gm, node)}",
                            unmerged, merged_macs):
            return None
        weight, bias = merge.compose_linear(first, second)
        node.target = self._install(_linear_module(weight, bias, module_of(self.gm, node)), node.name)
        node.args = (source.args[0],) + tuple(node.args[1:])
        self.gm.graph.erase_node(source)
        return Merge("linear-linear", [source.name], node.name, macs=(unmerged, merged_macs))

    # 4c. Linear(flatten(GAP(Conv(x)))), or of GAP(Conv(x) + Conv(y)) or GAP(Conv(x) + y)
    def _classifier_into_conv(self, node: fx.Node) -> Merge | None:
        flatten = node.args[0] if node.args else None
        if not (is_linear(self.gm, node) and isinstance(flatten, fx.Node) and is_flatten(self.gm, flatten)):
            return None
        pool = flatten.args[0]
        if not (isinstance(pool, fx.Node) and is_global_pool(self.gm, pool) and len(flatten.users) == 1):
            return None
        source = pool.args[0]
        if not isinstance(source, fx.Node) or len(pool.users) != 1 or len(source.users) != 1:
            return None
        # The classifier commutes with the pool and distributes over an Add (its bias goes once);
        # an identity operand of the Add becomes a 1×1 conv computing the classifier on it.
        branches = [source] if not is_add(source) else list(source.args[:2])
        convs = [b for b in branches if is_conv(self.gm, b) and len(b.users) == 1]
        if not convs or len(set(branches)) != len(branches) or len(branches) - len(convs) > 1:
            return None
        weight, bias = _linear_weights(module_of(self.gm, node))
        rank = len(shape_of(source)) - 2
        unmerged_macs, merged_macs, merged = weight.size, 0, {}
        for branch in branches:
            positions = int(np.prod(shape_of(branch)[2:]))
            head = merge.linear_as_conv(weight, bias if branch is convs[0] else np.zeros_like(bias), rank)
            if branch in convs:
                spec = conv_spec(module_of(self.gm, branch))
                merged[branch] = merge.compose_conv(spec, head, weights=self.weights)
                unmerged_macs += spec.macs_per_output * positions
            else:
                merged[branch] = head
            merged_macs += merged[branch].macs_per_output * positions
        what = f"{describe(self.gm, node)} into {' and '.join(describe(self.gm, c) for c in branches)}"
        if self._too_costly((node, *convs), what, unmerged_macs, merged_macs):
            return None
        like = module_of(self.gm, convs[0])
        for branch, spec in merged.items():
            if branch in convs:
                branch.target = self._install(_conv_module(spec, module_of(self.gm, branch)), branch.name)
                continue
            name = self._install(_conv_module(spec, like), f"{node.name}_shortcut")
            with self.gm.graph.inserting_before(source):
                head = self.gm.graph.create_node("call_module", name, (branch,), {}, name=f"{node.name}_shortcut")
            head.meta[_SHAPE] = shape_of(branch)
            source.replace_input_with(branch, head)
        # Channels become the classifier's outputs from the convs on (shapes for later rules).
        outputs = [*source.args[:2], source] if is_add(source) else [source]
        for changed in (*outputs, pool, flatten):
            old_shape = shape_of(changed)
            changed.meta[_SHAPE] = (old_shape[0], weight.shape[0]) + old_shape[2:]
        node.replace_all_uses_with(flatten)
        self.gm.graph.erase_node(node)
        into = ", ".join(c.name for c in source.args[:2]) if is_add(source) else source.name
        return Merge("classifier-into-conv", [node.name], into, macs=(unmerged_macs, merged_macs))


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flat(item)]
    return []
