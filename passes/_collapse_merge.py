"""Rules: merge ONNX linear layers that became adjacent once activations were linearized.

The arithmetic is :mod:`normfold.math.conv_merge` (float64, cast once to the weights' dtype).

1. ``Conv(Conv(x, W₁, b₁), W₂, b₂)`` → one Conv (stride, dilation, padding and groups composed).
   With a padded second Conv this is the *pad-first* model (its padding moves to the first
   Conv): outputs differ near the border, which is why the collapse pass measures them.
2. ``Add(Conv(x), x)`` and ``Add(Conv(x), Conv(x))`` (either operand order) → one Conv, the
   shortcut in the merged kernel's centre tap.
3. ``Gemm(Gemm(x, B₁, C₁), B₂, C₂)`` → one Gemm: ``B = α₁α₂·B₁'B₂'``,
   ``C = α₂β₁·C₁B₂' + β₂·C₂`` (``B'`` is ``B`` or ``Bᵀ`` by ``transB``).
4. ``Gemm(Flatten(GlobalAveragePool(Conv(x))))`` → ``Flatten(GlobalAveragePool(Conv'(x)))``: the
   classifier commutes with the pool and merges into the conv as a 1×1 conv after it (needs the
   conv's output size, to weigh the classifier's cost at every position against its cost once).

Refused, with the reason: weights that are not constants, unequal begin and end pads (after
``auto_pad`` is resolved by :func:`normfold.math.padding.conv_pads`; ``SAME_*`` with a stride
needs the input's size), ``transA=1`` on the second Gemm, another reader of the inner
layer's output, a shortcut whose stride or taps do not line up, and a merge whose MACs exceed
``max_flops_growth`` times the unmerged layers'.
"""

from __future__ import annotations

__all__ = ["ClassifierIntoConv", "ConvShortcut", "MergeConvConv", "MergeGemmGemm"]

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from normfold.passes.base import PassOptions, PassRecord, RecordingRule
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    Reads,
    attribute,
    conv_pads_of,
    describe,
    initializer,
    other_reader,
    read_constant,
    tensor_dtype,
)
from onnxscript.rewriter._basics import MatchResult

from normfold.math import conv_merge as merge
from normfold.math.padding import symmetric


def read_conv(node: ir.Node, reads: Reads) -> merge.Conv:
    """A Conv node as a float64 :class:`merge.Conv` (Refusal when it has no such form)."""
    weight = read_constant(node.inputs[1], "Conv weight", reads)
    rank = weight.ndim - 2
    if rank < 1:
        raise Refusal(f"{describe(node)} has a weight of rank {weight.ndim}")
    pads = conv_pads_of(node, weight.shape[2:])
    if pads is None:
        raise Refusal(f"{describe(node)} pads by auto_pad with a stride, on an input of unknown size")
    padding = symmetric(pads)
    if padding is None:
        raise Refusal(f"{describe(node)} pads its begin and end differently ({list(pads)})")
    bias_value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = read_constant(bias_value, "Conv bias", reads) if bias_value is not None else np.zeros(weight.shape[0])
    return merge.Conv(
        weight, bias,
        tuple(attribute(node, "strides", [1] * rank)),
        padding,
        tuple(attribute(node, "dilations", [1] * rank)),
        int(attribute(node, "group", 1)),
    )


def _typed(value: ir.Value, like: ir.Value, channels: int | None = None) -> ir.Value:
    """Give a rewritten value the type and shape of the one it replaces (later rules read them)."""
    value.dtype = like.dtype
    if like.shape is not None:
        dims = list(like.shape.dims)
        if channels is not None:
            dims[1] = channels
        value.shape = ir.Shape(dims)
    return value


def _emit_conv(
    op: Any, x: ir.Value, spec: merge.Conv, like: ir.Node, fresh: Callable[[str], str], name: str
) -> ir.Value:
    dtype = tensor_dtype(like.inputs[1])
    base = like.inputs[1].name or like.name
    return op.Conv(
        x,
        initializer(op, spec.weight, dtype, fresh(f"{base}_collapsed")),
        initializer(op, spec.bias, dtype, fresh(f"{base}_collapsed_bias")),
        strides=list(spec.stride),
        pads=list(spec.padding) * 2,
        dilations=list(spec.dilation),
        group=spec.groups,
        _name=name,
    )


@dataclasses.dataclass(frozen=True)
class _ChainMerge:
    """``second(first(x))`` and what the rule's ``_merge`` read from them for the rewrite."""

    first: ir.Node
    second: ir.Node
    merged: tuple[Any, Any]


@dataclasses.dataclass(frozen=True)
class _ShortcutMerge:
    """``add = conv(x) + shortcut(x)`` (or ``+ x``) as the one conv ``merged``."""

    add: ir.Node
    conv: ir.Node
    merged: merge.Conv


@dataclasses.dataclass(frozen=True)
class _ClassifierMerge:
    """``gemm(flatten(pool(conv(x))))`` with the classifier merged into the conv: ``merged``."""

    conv: ir.Node
    pool: ir.Node
    flatten: ir.Node
    gemm: ir.Node
    merged: merge.Conv


class _CollapseRule(RecordingRule):
    def __init__(
        self, record: PassRecord, options: PassOptions, fresh: Callable[[str], str], max_flops_growth: float
    ) -> None:
        super().__init__(record, options)
        self._fresh = fresh
        self._growth = max_flops_growth
        self._plan: Any = None

    def _check_cost(self, what: str, unmerged: int, merged: int) -> None:
        if merged > self._growth * unmerged:
            raise Refusal(
                f"merging {what} would grow the work x{merged / unmerged:.2f} "
                f"({unmerged} -> {merged} MACs per output position) > max_flops_growth {self._growth:g}"
            )


class _ChainRule(_CollapseRule):
    """``op(op(x))`` → ``op'(x)``, for the ``op_type`` of the subclass, whose :meth:`_merge` says
    how two of them compose (or raises :class:`Refusal`). The first one's output must have no
    other reader."""

    op_type: str

    def pattern(self, op: Any, x: Any) -> Any:
        inner = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["mid"])
        return getattr(op, self.op_type)(inner, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context: Any, x: ir.Value, mid: ir.Value, out: ir.Value, **_: Any) -> MatchResult:
        first, second = mid.producer(), out.producer()
        if (seen := other_reader(mid, {second})) is not None:
            raise Refusal(f"{describe(first)} output is also read by {seen}")
        merged = self._merge(first, second, Reads(self.options.freeze_initializer_inputs))
        self._plan = _ChainMerge(first, second, merged)
        return MatchResult()

    def _merge(self, first: ir.Node, second: ir.Node, reads: Reads) -> tuple[Any, ...]:
        raise NotImplementedError


class MergeConvConv(_ChainRule):
    """``Conv(Conv(x))`` → ``Conv'(x)``."""

    op_type = "Conv"

    def _merge(self, first: ir.Node, second: ir.Node, reads: Reads) -> tuple[Any, ...]:
        a, b = read_conv(first, reads), read_conv(second, reads)
        if a.out_channels != b.in_channels or len(a.kernel) != len(b.kernel):
            raise Refusal(f"{describe(first)} and {describe(second)} do not chain")
        self._check_cost(f"{describe(first)} and {describe(second)}", *merge.compose_macs(a, b))
        return a, b

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        plan: _ChainMerge = self._plan
        first, second, (a, b) = plan.first, plan.second, plan.merged
        merged = merge.compose_conv(a, b)
        self.record.site(second.name, op="Conv∘Conv", into=second.name, removed=first.name,
                         pad_first=any(b.padding), kernel=list(merged.kernel))
        return _typed(_emit_conv(op, x, merged, second, self._fresh, second.name), second.outputs[0])


class ConvShortcut(_CollapseRule):
    """``Add(Conv(x), x)``, ``Add(x, Conv(x))``, ``Add(Conv(x), Conv(x))`` → ``Conv'(x)``."""

    def __init__(self, *args: Any, form: str) -> None:
        super().__init__(*args)
        self._form = form
        self.name = f"{type(self).__name__}-{form}"

    def pattern(self, op: Any, x: Any) -> Any:
        branch = op.Conv(x, _allow_other_inputs=True, _outputs=["branch"])
        if self._form == "conv-first":
            return op.Add(branch, x, _outputs=["out"])
        if self._form == "conv-second":
            return op.Add(x, branch, _outputs=["out"])
        shortcut = op.Conv(x, _allow_other_inputs=True, _outputs=["shortcut"])
        return op.Add(branch, shortcut, _outputs=["out"])

    def check(self, context: Any, x: ir.Value, branch: ir.Value, out: ir.Value, shortcut: ir.Value | None = None,
              **_: Any) -> MatchResult:
        add = out.producer()
        reads = Reads(self.options.freeze_initializer_inputs)
        for value in (branch, shortcut):
            if value is not None and (seen := other_reader(value, {add})) is not None:
                raise Refusal(f"{describe(value.producer())} output is also read by {seen}")
        conv = read_conv(branch.producer(), reads)
        if shortcut is None:
            merged = merge.add_identity(conv)
        else:
            other = read_conv(shortcut.producer(), reads)
            try:
                merged = merge.add_shortcut(conv, other)
            except Refusal:  # the taps may fall the other way round
                merged = merge.add_shortcut(other, conv)
        self._plan = _ShortcutMerge(add, branch.producer(), merged)
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        plan: _ShortcutMerge = self._plan
        add, conv, merged = plan.add, plan.conv, plan.merged
        self.record.site(add.name, op="shortcut", into=conv.name)
        return _typed(_emit_conv(op, x, merged, conv, self._fresh, conv.name), add.outputs[0])


class MergeGemmGemm(_ChainRule):
    """``Gemm(Gemm(x))`` → ``Gemm'(x)``."""

    op_type = "Gemm"

    def _merge(self, first: ir.Node, second: ir.Node, reads: Reads) -> tuple[Any, ...]:
        if attribute(second, "transA", 0):
            raise Refusal(f"{describe(second)} transposes its input (transA=1)")
        b1, c1, alpha1, beta1 = _gemm_terms(first, reads)
        b2, c2, alpha2, beta2 = _gemm_terms(second, reads)
        if b1.shape[1] != b2.shape[0]:
            raise Refusal(f"{describe(first)} and {describe(second)} do not chain")
        (width, mid_width), out_width = b1.shape, b2.shape[1]
        self._check_cost(f"{describe(first)} and {describe(second)}",
                         width * mid_width + mid_width * out_width, width * out_width)
        weight = alpha1 * alpha2 * (b1 @ b2)
        bias = alpha2 * beta1 * (np.broadcast_to(c1, c1.shape[:-1] + (b1.shape[1],)) @ b2) + beta2 * c2
        return weight, bias

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        plan: _ChainMerge = self._plan
        first, second, (weight, bias) = plan.first, plan.second, plan.merged
        dtype = tensor_dtype(second.inputs[1])
        base = second.inputs[1].name or second.name
        self.record.site(second.name, op="Gemm∘Gemm", into=second.name, removed=first.name)
        attributes = {"transA": attribute(first, "transA", 0)}
        return _typed(op.Gemm(
            x,
            initializer(op, weight, dtype, self._fresh(f"{base}_collapsed")),
            initializer(op, np.asarray(bias), dtype, self._fresh(f"{base}_collapsed_bias")),
            _name=second.name,
            **attributes,
        ), second.outputs[0])


class ClassifierIntoConv(_CollapseRule):
    """``Gemm(Flatten(GlobalAveragePool(Conv(x))))`` → ``Flatten(GlobalAveragePool(Conv'(x)))``."""

    def pattern(self, op: Any, x: Any) -> Any:
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["features"])
        flat = op.Flatten(op.GlobalAveragePool(conv, _outputs=["pooled"]), _outputs=["flat"])
        return op.Gemm(flat, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context: Any, x: ir.Value, features: ir.Value, pooled: ir.Value, flat: ir.Value,
              out: ir.Value, **_: Any) -> MatchResult:
        conv_node, gemm = features.producer(), out.producer()
        reads = Reads(self.options.freeze_initializer_inputs)
        for value, reader in ((features, pooled.producer()), (pooled, flat.producer()), (flat, gemm)):
            if (seen := other_reader(value, {reader})) is not None:
                raise Refusal(f"{describe(value.producer())} output is also read by {seen}")
        if int(attribute(flat.producer(), "axis", 1)) != 1 or attribute(gemm, "transA", 0):
            raise Refusal(f"{describe(gemm)} does not read the pooled channels as its features")
        conv = read_conv(conv_node, reads)
        b, c, alpha, beta = _gemm_terms(gemm, reads)
        if c.ndim > 1 and c.shape[0] != 1:
            raise Refusal(f"{describe(gemm)} has a per-row C of shape {list(c.shape)}")
        dims = features.shape.dims[2:] if features.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise Refusal(f"the output size of {describe(conv_node)} is unknown, so its cost cannot be weighed")
        positions = int(np.prod(dims))
        head = merge.linear_as_conv(alpha * b.T, beta * c.reshape(-1), len(conv.kernel))
        merged = merge.compose_conv(conv, head)
        self._check_cost(f"{describe(gemm)} into {describe(conv_node)}",
                         conv.macs_per_output * positions + b.size, merged.macs_per_output * positions)
        self._plan = _ClassifierMerge(conv_node, pooled.producer(), flat.producer(), gemm, merged)
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        plan: _ClassifierMerge = self._plan
        conv_node, pool, flatten, gemm, merged = plan.conv, plan.pool, plan.flatten, plan.gemm, plan.merged
        self.record.site(gemm.name, op="classifier-into-conv", into=conv_node.name)
        classes = merged.out_channels
        features = _emit_conv(op, x, merged, conv_node, self._fresh, conv_node.name)
        features = _typed(features, conv_node.outputs[0], classes)
        pooled = _typed(op.GlobalAveragePool(features, _name=pool.name), pool.outputs[0], classes)
        return _typed(op.Flatten(pooled, axis=1, _name=flatten.name), gemm.outputs[0])


def _gemm_terms(node: ir.Node, reads: Reads) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(B', C, alpha, beta)`` of a Gemm with ``B' = B`` or ``Bᵀ`` (``(K, N)``); C defaults to 0."""
    b = read_constant(node.inputs[1], "Gemm B", reads)
    if b.ndim != 2:
        raise Refusal(f"{describe(node)} has a B of rank {b.ndim}")
    b = b.T if attribute(node, "transB", 0) else b
    c_value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    c = read_constant(c_value, "Gemm C", reads) if c_value is not None else np.zeros(b.shape[1])
    if c.ndim == 0:
        c = np.full(b.shape[1], float(c))
    return b, c, float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
