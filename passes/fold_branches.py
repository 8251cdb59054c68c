"""fold-branches: a sum of parallel linear branches of one tensor becomes one Conv.

This is the deployment step of RepVGG, MobileOne, ACNet and DBB ("structural
re-parameterization"), done on the exported graph. Rule:

1. A *sum* is a tree of ``Add`` / ``Sum`` / ``Sub`` nodes whose inner results have no other
   reader; its *leaves* are the values it adds, each with its sign (a ``Sub``'s second input is
   subtracted).
2. A leaf is a *branch* of the tensor ``x`` it reads when it is one of (each optionally followed
   by an inference-form BatchNormalization with constant parameters, then by a ``Mul`` by a
   constant with one value per channel or one for all — a layer scale; a constant of another
   shape is refused with the reason):

   * ``Conv(x)`` with a constant weight and bias — any kernel: ``k×k``, ``1×1``, ``1×k``,
     ``k×1`` (ACNet);
   * ``Conv_k×k(Conv_1×1(x))`` (DBB), the 1×1 Conv unpadded, stride 1, same ``group``, a BN
     between them allowed; exact when the k×k Conv does not pad or the 1×1 branch gives 0 on a
     zero input (otherwise the padded border would see 0 instead of its bias: refused);
   * ``AveragePool(x)`` counting padded zeros (``count_include_pad=1`` or no pads),
     ``ceil_mode=0`` (DBB);
   * ``x`` itself — a BN of ``x`` is the identity branch of RepVGG and MobileOne.

   A leaf ``Conv(x)`` (or its BN) that is the only branch of ``x`` in its sum is read as the
   identity branch of the Conv's output ``y`` instead when another leaf is a Conv of ``y``:
   RepGhost's ``BN(DWConv(y)) + BN(y)`` and FastViT's ``MobileOneBlock`` after a Conv, where
   ``y = Conv(x)`` is read by both; a ``Mul``/BN leaf sharing no source is read as the identity
   of its own output. FastViT's RepMixer, ``x + γ·(BN(DWConv(x)) + BN(x) − BN(x))``, merges in
   two sites: the difference, then the residual around its scaled Conv.

3. The branches of one ``x`` in one sum merge when at least one of them is a Conv reading ``x``
   directly: the one with the largest kernel is the *reference*. Every other branch must read
   the same windows, centred in the reference's kernel: equal strides, equal ``group`` and
   channel counts, equal dilations where its kernel is larger than 1, and pads of the reference
   less ``dilation·(K − k)/2`` on each side (:func:`normfold.math.branches.sub_kernel_offsets`).
   The identity and the average pool need as many output as input channels and take the
   reference's ``group`` (a diagonal kernel of that group layout).
4. The merged Conv has the reference's attributes, the sum of the branches' kernels (each
   zero-padded to the reference's size, centred) and of their biases, computed in float64 from
   the stored tensors and cast once to the reference weight's dtype — refused when that cast
   overflows, flushes a nonzero value to 0, or computes farther from the sum of the branches
   than the precision rule allows (``normfold.math.fold_precision``). It replaces the merged
   leaves in the sum (the signs are in its kernel); other leaves stay, added to it or
   subtracted from it in their order, except a constant 0 of one value, which is dropped.

A branch that does not fit (mismatched padding or stride, other groups, an intermediate value
that another node reads, non-constant weights, a training-form BN, …) stays in the sum and is
refused with the reason, recorded against the node at its end; the rest of its group still
merges. A sum with nothing to merge is refused with the reason against its root ``Add``.

BatchNormalization inside the branches is handled here, so the pass is complete on its own; in
the default list it runs after ``fold-bn``, which has by then folded each Conv's BN into it and
left only the identity (and average pool) BNs, which only this pass can fold. A BN *after* the
sum is ``fold-bn``'s.

Preconditions: none; ``cleanup`` usually runs first (constants as initializers). Sites inside
model functions are left alone (a function cannot hold the new initializers). The rewrite
removes the nodes of merged branches that nothing else reads.

Why no rewriter rule: a sum of ``n`` branches is a variadic tree; a pairwise rule would merge
it in ``n − 1`` steps and round the merged kernel to the model's dtype at each one.
"""

from __future__ import annotations

__all__ = ["FoldBranchesPass"]

import collections
import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from normfold.catalog import pass_info
from normfold.math import branches as bm
from normfold.math import fold_precision as fp
from normfold.math import batchnorm as fm
from normfold.passes.base import NormfoldPass
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    FreshNames,
    Reads,
    attribute,
    conv_pads_of,
    batchnorm_affine,
    cast_tensor,
    describe,
    freeze,
    opset_of,
    read_constant,
    require_castable,
    require_precise,
    tensor_dtype,
)

_SUMS = frozenset({"Add", "Sum", "Sub"})


@dataclasses.dataclass
class _Branch:
    """One leaf of a sum read as ``Conv(pad(x), kernel) + bias`` (kernel None: built per group)."""

    leaf: ir.Value
    source: ir.Value
    label: str
    kind: str  # conv | pointwise+conv | pool | identity
    nodes: list[ir.Node]
    kernel: np.ndarray | None
    bias: np.ndarray | None
    window: tuple[int, ...] | None
    strides: tuple[int, ...] | None
    pads: tuple[int, ...] | None
    dilations: tuple[int, ...] | None
    group: int | None
    affine: tuple[np.ndarray, np.ndarray] | None
    weight_value: ir.Value | None = None
    bias_value: ir.Value | None = None
    conv: ir.Node | None = None
    reads: Reads | None = None
    post: np.ndarray | None = None  # the leaf's sign times a Mul by constants: () or (C,)

    @property
    def end(self) -> ir.Node | None:
        """The node whose output is the leaf (where refusals are recorded)."""
        return self.leaf.producer()


@dataclasses.dataclass
class _Fit:
    """The branches of one sum that fit in ``reference`` (check) and what the rewrite sums."""

    reference: _Branch
    parts: list[tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]]  # (kernel, bias, affine)
    used: list[_Branch]  # the branches ``parts`` come from, in the same order
    refusals: list[tuple[_Branch, Refusal]]  # the branches that do not fit, and why


def _ints(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = attribute(node, name, None)
    return default if value is None else tuple(int(v) for v in value)


def _geometry(node: ir.Node, window: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """``(strides, pads, dilations)`` of a Conv/AveragePool, its pads by the one padding rule."""
    rank = len(window)
    pads = conv_pads_of(node, window)
    if pads is None:
        raise Refusal(
            f"{describe(node)} has auto_pad={attribute(node, 'auto_pad', 'NOTSET')!s} with a stride above 1: "
            "its pads depend on an input size that is not known"
        )
    return _ints(node, "strides", (1,) * rank), pads, _ints(node, "dilations", (1,) * rank)


def _only_reader(value: ir.Value, reader: ir.Node) -> None:
    if value.is_graph_output():
        raise Refusal(f"'{value.name}' is also a graph output")
    for user, _ in value.uses():
        if user is not reader:
            raise Refusal(
                f"{describe(value.producer())} output '{value.name}' is also read by "
                f"{describe(user)}: merging would keep it and add a Conv"
            )


def _conv(node: ir.Node, reads: Reads) -> tuple[np.ndarray, np.ndarray | None, tuple[Any, ...]]:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        raise Refusal(f"{describe(node)} has no weight")
    weight = read_constant(node.inputs[1], "Conv weight", reads)
    if weight.ndim < 3:
        raise Refusal(f"{describe(node)} has a weight of rank {weight.ndim}")
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None if bias_value is None else read_constant(bias_value, "Conv bias", reads)
    window = tuple(weight.shape[2:])
    declared = _ints(node, "kernel_shape", window)
    if declared != window:
        raise Refusal(f"{describe(node)} declares kernel_shape {list(declared)}, weight has {list(window)}")
    return weight, bias, (window, *_geometry(node, window))


def _scale(leaf: ir.Value, reads: Reads) -> tuple[ir.Value, ir.Node, np.ndarray] | None:
    """``leaf = Mul(v, c)`` with ``c`` constant: ``(v, the Mul, c)``; None for any other leaf.
    Whether ``c`` has one value per channel is checked once the branch's rank is known."""
    producer = leaf.producer()
    if producer is None or producer.op_type != "Mul" or producer.domain != "":
        return None
    for index in (0, 1):
        probe = Reads(reads.freeze_inputs)
        try:
            constant = read_constant(producer.inputs[index], "scale", probe)
        except Refusal:
            continue
        reads.frozen.extend(v for v in probe.frozen if v not in reads.frozen)
        return producer.inputs[1 - index], producer, constant
    return None


def _read_branch(leaf: ir.Value, model: ir.Model, reads: Reads, sign: float = 1.0, *,
                 identity: bool = False) -> _Branch:
    """``leaf`` (added with ``sign``) as a branch, a per-channel ``Mul`` by constants at its end
    included; ``identity``: read it as the identity branch of what is under that Mul and BN.
    Raises :class:`Refusal` for a linear-looking leaf that cannot be a branch."""
    read = _identity_branch if identity else _read_unscaled
    scaled = _scale(leaf, reads)
    if scaled is None:
        branch = read(leaf, model, reads)
        branch.post = None if sign == 1.0 else np.asarray(sign)
        return branch
    inner, mul, scale = scaled
    branch = read(inner, model, reads)
    branch.leaf, branch.nodes = leaf, [*branch.nodes, mul]
    branch.post = sign * scale
    branch.label = f"{branch.label} × {describe(mul)}"
    return branch


def _read_unscaled(leaf: ir.Value, model: ir.Model, reads: Reads) -> _Branch:
    """``leaf`` as a branch without a scale of its own."""
    nodes: list[ir.Node] = []
    inner, affine = leaf, None
    producer = leaf.producer()
    if producer is not None and producer.op_type == "BatchNormalization" and producer.domain == "":
        affine = batchnorm_affine(producer, opset_of(producer, model), reads)
        nodes.append(producer)
        inner = producer.inputs[0]
        producer = inner.producer()
    if producer is None or producer.domain != "" or producer.op_type not in ("Conv", "AveragePool"):
        return _identity_branch(leaf, model, reads)
    nodes.insert(0, producer)
    if producer.op_type == "AveragePool":
        window = _ints(producer, "kernel_shape", ())
        strides, pads, dilations = _geometry(producer, window)
        if any(d != 1 for d in dilations):
            raise Refusal(f"{describe(producer)} is dilated")
        if attribute(producer, "ceil_mode", 0):
            raise Refusal(f"{describe(producer)} has ceil_mode=1: its last window may be partial")
        if any(pads) and not attribute(producer, "count_include_pad", 0):
            raise Refusal(
                f"{describe(producer)} pads without count_include_pad: its border windows divide "
                "by fewer taps, which no kernel reproduces"
            )
        return _Branch(leaf, producer.inputs[0], describe(producer), "pool", nodes, None, None,
                       window, strides, pads, dilations, None, affine, reads=reads)
    weight, bias, (window, strides, pads, dilations) = _conv(producer, reads)
    group = attribute(producer, "group", 1)
    branch = _Branch(leaf, producer.inputs[0], describe(producer), "conv", nodes, weight, bias,
                     window, strides, pads, dilations, group, affine,
                     weight_value=producer.inputs[1],
                     bias_value=producer.inputs[2] if len(producer.inputs) > 2 else None,
                     conv=producer, reads=reads)
    _compose_pointwise(branch, model, reads)
    return branch


def _identity_branch(leaf: ir.Value, model: ir.Model, reads: Reads, *, strip: bool = True
                     ) -> _Branch:
    """``leaf`` as ``x`` or ``BN(x)``: the identity branch of ``x``, whatever produces ``x``
    (``strip=False``: the identity branch of ``leaf`` itself)."""
    producer = leaf.producer() if strip else None
    if producer is not None and producer.op_type == "BatchNormalization" and producer.domain == "":
        affine = batchnorm_affine(producer, opset_of(producer, model), reads)
        return _Branch(leaf, producer.inputs[0], f"identity {describe(producer)}", "identity",
                       [producer], None, None, None, None, None, None, None, affine, reads=reads)
    return _Branch(leaf, leaf, f"identity '{leaf.name}'", "identity", [], None, None, None, None,
                   None, None, None, None, reads=reads)


def _compose_pointwise(branch: _Branch, model: ir.Model, reads: Reads) -> None:
    """Make a k×k Conv reading a 1×1 Conv (through a BN, maybe) a branch of the 1×1's input."""
    conv = branch.conv
    middle, mid_affine, extra = conv.inputs[0], None, []
    first = middle.producer()
    if first is not None and first.op_type == "BatchNormalization" and first.domain == "":
        try:
            mid_affine = batchnorm_affine(first, opset_of(first, model), reads)
        except Refusal:
            return
        extra.append(first)
        middle = first.inputs[0]
        first = middle.producer()
    if first is None or first.op_type != "Conv" or first.domain != "":
        return
    try:
        weight, bias, (window, strides, pads, _) = _conv(first, reads)
    except Refusal:
        return  # not a pointwise Conv we can read: the k×k Conv is the branch on its own
    if any(w != 1 for w in window) or any(s != 1 for s in strides) or any(pads):
        return
    if attribute(first, "group", 1) != branch.group:
        return
    chain = [first, *extra, conv]
    for node, reader in zip(chain, chain[1:]):
        value = node.outputs[0]
        if value.is_graph_output() or any(user is not reader for user, _ in value.uses()):
            return  # the 1×1 result is needed elsewhere: the k×k Conv is the branch on its own
    branch.kernel, branch.bias = bm.prepend_pointwise(
        weight, bias, mid_affine, branch.kernel, branch.bias, branch.group,
        padded=any(branch.pads), first_name=describe(first), second_name=describe(conv),
    )
    branch.nodes[:0] = [first, *extra]
    branch.source = first.inputs[0]
    branch.label = f"{describe(first)} → {branch.label}"
    branch.kind = "pointwise+conv"


def _check_readers(branch: _Branch, tree: set[ir.Node]) -> None:
    """Values inside a branch feed only the next node; the leaf only the sum."""
    for node, following in zip(branch.nodes, branch.nodes[1:]):
        _only_reader(node.outputs[0], following)
    if not branch.nodes:
        return  # the leaf is ``x`` itself, which the other branches read too
    if branch.leaf.is_graph_output():
        raise Refusal(f"'{branch.leaf.name}' is also a graph output")
    for user, _ in branch.leaf.uses():
        if user not in tree:
            raise Refusal(
                f"'{branch.leaf.name}' is also read by {describe(user)}: merging would keep its "
                "branch and add a Conv"
            )


def _sum_tree(root: ir.Node) -> tuple[list[ir.Node], list[tuple[ir.Value, float]]]:
    """The Add/Sum/Sub nodes of the sum rooted at ``root`` and its leaves with their signs
    (a ``Sub``'s second input is subtracted), in input order."""
    nodes, leaves = [root], []

    def visit(node: ir.Node, sign: float) -> None:
        for index, value in enumerate(node.inputs):
            term = -sign if node.op_type == "Sub" and index == 1 else sign
            inner = value.producer() if value is not None else None
            if (inner is not None and inner.op_type in _SUMS and inner.domain == ""
                    and not value.is_graph_output() and len(value.uses()) == 1):
                nodes.append(inner)
                visit(inner, term)
            elif value is not None:
                leaves.append((value, term))

    visit(root, 1.0)
    return nodes, leaves


def _is_zero(leaf: ir.Value, total: ir.Value) -> bool:
    """``leaf`` is one constant 0 that broadcasts into ``total`` without adding axes: a term
    that changes nothing (timm's MobileOneBlock starts its sum at ``0``; dynamo keeps it)."""
    if leaf.const_value is None or leaf.is_graph_input():
        return False
    rank = len(total.shape) if total.shape is not None else None
    constant = leaf.const_value.numpy()
    fits = constant.ndim == 0 or (rank is not None and constant.ndim <= rank)
    return fits and constant.size == 1 and not np.any(constant)


def _is_root(node: ir.Node) -> bool:
    if node.op_type not in _SUMS or node.domain != "":
        return False
    output = node.outputs[0]
    uses = output.uses()
    return output.is_graph_output() or len(uses) != 1 or uses[0][0].op_type not in _SUMS \
        or uses[0][0].domain != ""


class FoldBranchesPass(NormfoldPass):
    """Merge parallel Conv/BN/AvgPool/identity branches that a sum adds into one Conv."""

    name = "fold-branches"
    summary = pass_info(name).summary

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        roots = [node for node in graph if _is_root(node)]
        if not roots:
            return False
        common.NameFixPass()(model)
        self._fresh = FreshNames(model)
        merged = 0
        for root in roots:
            merged += self._fold_sum(model, root)
        if merged:
            common.RemoveUnusedNodesPass()(model)
        return merged > 0

    def _fold_sum(self, model: ir.Model, root: ir.Node) -> int:
        tree_nodes, leaves = _sum_tree(root)
        tree = set(tree_nodes)
        groups: dict[int, list[_Branch]] = {}
        sources: dict[int, ir.Value] = {}
        read: list[_Branch] = []
        signs = {id(leaf): sign for leaf, sign in leaves}
        for leaf, sign in leaves:
            try:
                read.append(_read_branch(leaf, model, Reads(self.options.freeze_initializer_inputs),
                                         sign))
            except Refusal as refusal:
                self._refuse_leaf(leaf, refusal.reason)
        # (BN of) Conv(x) is also the identity branch of the Conv's output y: read it so when it
        # is the only branch of x and other leaves are Conv branches of y (rule 2).
        counts = collections.Counter(id(branch.source) for branch in read)
        conv_sources = {id(branch.source) for branch in read if branch.kind == "conv"}
        for index, branch in enumerate(read):
            if counts[id(branch.source)] > 1:
                continue
            for alternative in self._alternatives(model, branch, signs[id(branch.leaf)]):
                if id(alternative.source) in conv_sources:
                    read[index] = alternative
                    break
        for branch in read:
            groups.setdefault(id(branch.source), []).append(branch)
            sources[id(branch.source)] = branch.source
        replacements: dict[int, tuple[ir.Value, list[_Branch]]] = {}
        new_nodes: list[ir.Node] = []
        for key, branches in groups.items():
            if len(branches) < 2 or not any(b.kind == "conv" for b in branches):
                continue
            result = self._merge(branches, tree, sources[key])
            if result is not None:
                node, used = result
                new_nodes.append(node)
                replacements[key] = (node.outputs[0], used)
        if not replacements:
            return 0
        # The merged Conv takes the place of its first leaf; the group's other leaves go.
        merged_leaves = {id(b.leaf) for _, used in replacements.values() for b in used}
        first_leaf = {id(used[0].leaf): value for value, used in replacements.values()}
        terms: list[tuple[ir.Value, float]] = []
        for leaf, sign in leaves:
            if id(leaf) in first_leaf:
                terms.append((first_leaf.pop(id(leaf)), 1.0))  # the signs are in its kernel
            elif id(leaf) not in merged_leaves and not _is_zero(leaf, root.outputs[0]):
                terms.append((leaf, sign))
        terms.sort(key=lambda term: term[1] < 0)  # a merged Conv (added) comes before any Sub
        dtype = new_nodes[0].outputs[0].dtype
        total = terms[0][0]
        for index, (term, sign) in enumerate(terms[1:], 1):
            add = ir.node("Add" if sign > 0 else "Sub", [total, term], name=f"{root.name}/sum{index}")
            add.outputs[0].dtype = dtype
            new_nodes.append(add)
            total = add.outputs[0]
        if root.outputs[0].shape is not None:
            total.shape = root.outputs[0].shape
        ir.convenience.replace_nodes_and_values(
            model.graph, root, [root], new_nodes, [root.outputs[0]], [total]
        )
        return len(replacements)

    def _alternatives(self, model: ir.Model, branch: _Branch, sign: float) -> list[_Branch]:
        """Other readings of a leaf that is the only branch of its source: the identity branch
        of the value under its Mul and BN (when it is read as a Conv), then of the leaf itself."""
        readings = []
        if branch.kind != "identity":
            try:
                readings.append(_read_branch(branch.leaf, model,
                                             Reads(self.options.freeze_initializer_inputs), sign,
                                             identity=True))
            except Refusal:
                pass
        if branch.nodes:
            plain = _identity_branch(branch.leaf, model, Reads(False), strip=False)
            plain.post = None if sign == 1.0 else np.asarray(sign)
            readings.append(plain)
        return readings

    def _refuse_leaf(self, leaf: ir.Value, reason: str) -> None:
        producer = leaf.producer()
        if producer is not None:
            self.record.refuse(Refusal(f"not merged with the other branches: {reason}"), producer)

    def _merge(self, branches: list[_Branch], tree: set[ir.Node], source: ir.Value
               ) -> tuple[ir.Node, list[_Branch]] | None:
        ready = []
        for branch in branches:
            try:
                _check_readers(branch, tree)
            except Refusal as refusal:
                self._refuse_leaf(branch.leaf, refusal.reason)
                continue
            ready.append(branch)
        convs = [b for b in ready if b.kind == "conv"]
        if not convs:
            return None
        # The largest kernels are the candidates; the one most branches fit in is the reference.
        largest = max(int(np.prod(b.window)) for b in convs)
        attempts = [self._fit(ready, candidate) for candidate in convs
                    if int(np.prod(candidate.window)) == largest]
        fit = max(attempts, key=lambda a: len(a.used))
        reference, parts, used = fit.reference, fit.parts, fit.used
        for branch, refusal in fit.refusals:
            self._refuse_leaf(branch.leaf, refusal.reason)
        group = reference.group
        if len(used) < 2:
            return None
        folded = [fm.fold_after_conv(k, b, *affine) if affine else (k, b) for k, b, affine in parts]
        weight = np.sum([k for k, _ in folded], axis=0)
        bias = np.sum([b for _, b in folded], axis=0)
        dtype = tensor_dtype(reference.weight_value)
        bias_dtype = dtype if reference.bias_value is None else tensor_dtype(reference.bias_value)
        try:
            require_castable({"kernel": weight}, dtype)
            require_castable({"bias": bias}, bias_dtype)
            require_precise(lambda: _probe_outputs(parts, weight, bias, dtype), dtype)
        except Refusal as refusal:
            self.record.refuse(Refusal(f"the branches stay: {refusal.reason}"), reference.end)
            return None
        base = reference.weight_value.name or reference.conv.name
        weight_tensor = cast_tensor(weight, dtype, self._fresh(f"{base}_branches"))
        bias_tensor = cast_tensor(bias, bias_dtype, self._fresh(f"{base}_branches_bias"))
        values = []
        for tensor in (weight_tensor, bias_tensor):
            value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape),
                             type=ir.TensorType(tensor.dtype), const_value=tensor)
            reference.conv.graph.register_initializer(value)
            values.append(value)
        for branch in used:
            freeze(branch.reads, self.record)
        attributes: dict[str, Any] = {
            "kernel_shape": list(reference.window),
            "strides": list(reference.strides),
            "pads": list(reference.pads),
            "dilations": list(reference.dilations),
            "group": group,
        }
        name = f"{reference.conv.name}/branches"
        node = ir.node("Conv", [source, *values], attributes, name=name)
        node.outputs[0].dtype = dtype
        node.outputs[0].shape = reference.leaf.shape
        self.record.site(
            reference.end.name,
            op="Conv",
            into=name,
            how="branches",
            branches=[b.label for b in used],
        )
        return node, used

    def _fit(self, branches: list[_Branch], reference: _Branch) -> _Fit:
        """The branches that fit in ``reference``, each part its ``(kernel, bias, affine)`` with
        the kernel padded to the reference's size."""
        out_channels, in_per_group = reference.kernel.shape[:2]
        parts, used, refusals = [], [], []
        for branch in branches:
            try:
                kernel, bias = _branch_kernel(branch, reference, out_channels, in_per_group,
                                              reference.group, len(reference.window))
            except Refusal as refusal:
                refusals.append((branch, refusal))
                continue
            try:
                affine = _with_post(branch, out_channels, len(reference.window) + 2)
            except Refusal as refusal:
                refusals.append((branch, refusal))
                continue
            parts.append((kernel, bias, affine))
            used.append(branch)
        return _Fit(reference, parts, used, refusals)


def _with_post(branch: _Branch, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The branch's BN affine followed by its sign and constant scale (``post``), which must
    hold one value per channel of a rank-``rank`` tensor (or one for all)."""
    if branch.post is None:
        return branch.affine
    post = branch.post
    if post.size == 1:
        post = np.full(channels, float(post.reshape(())))
    else:
        shape = (1,) * (rank - post.ndim) + post.shape  # broadcast: aligned to the right
        if post.ndim > rank or shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
            raise Refusal(
                f"{branch.label} multiplies by a constant of shape {list(branch.post.shape)}, not "
                f"one value per channel of its {channels}: no kernel holds it"
            )
        post = post.reshape(-1)
    if branch.affine is None:
        return post, np.zeros(channels)
    scale, shift = branch.affine
    return post * scale, post * shift


def _branch_kernel(branch: _Branch, reference: _Branch, out_channels: int, in_per_group: int,
                   group: int, spatial: int) -> tuple[np.ndarray, np.ndarray]:
    """``branch``'s kernel padded to the reference's, and its bias (float64; before the
    branch's BN)."""
    if branch.kind == "identity":
        window, strides = (1,) * spatial, (1,) * spatial
        pads, dilations = (0,) * (2 * spatial), (1,) * spatial
    else:
        window, strides, pads, dilations = (branch.window, branch.strides, branch.pads,
                                            branch.dilations)
    if strides != reference.strides:
        raise Refusal(
            f"{branch.label} has strides {list(strides)}, {reference.label} "
            f"{list(reference.strides)}"
        )
    if branch.kind in ("identity", "pool"):
        if out_channels != in_per_group * group:
            raise Refusal(
                f"{branch.label} keeps {in_per_group * group} channels, {reference.label} "
                f"makes {out_channels}"
            )
        if branch.kind == "identity":
            kernel = bm.identity_kernel(out_channels, group, spatial)
        else:
            kernel = bm.average_pool_kernel(out_channels, group, window)
        bias = np.zeros(out_channels)
    else:
        if branch.group != group or branch.kernel.shape[:2] != (out_channels, in_per_group):
            raise Refusal(
                f"{branch.label} has a {list(branch.kernel.shape)} weight in "
                f"{branch.group} group(s), {reference.label} a "
                f"{list(reference.kernel.shape)} one in {group}"
            )
        kernel = branch.kernel
        bias = np.zeros(out_channels) if branch.bias is None else branch.bias
    try:
        offsets = bm.sub_kernel_offsets(window, pads, dilations, reference.window,
                                        reference.pads, reference.dilations)
    except Refusal as refusal:  # the offsets' reason, said of these two branches
        raise Refusal(f"{branch.label} does not fit in {reference.label}: {refusal.reason}") from None
    return bm.pad_kernel(kernel, offsets, reference.window), np.asarray(bias, np.float64)


def _probe_outputs(parts: list[tuple[np.ndarray, np.ndarray, Any]], weight: np.ndarray,
                   bias: np.ndarray, dtype: ir.DataType) -> tuple[np.ndarray, np.ndarray]:
    """``(reference, merged)`` probe outputs: the branches summed, each rounded to float32 before
    its BN (``fold_precision.site_outputs``, same probes for all), and the merged Conv."""
    merged_rows = weight.reshape(weight.shape[0], -1)
    reference, merged = 0.0, None
    for kernel, raw_bias, affine in parts:
        after = None if affine is None else fp.Affine(*affine)
        branch, merged = fp.site_outputs(kernel.reshape(kernel.shape[0], -1), raw_bias,
                                         merged_rows, bias, dtype.numpy(), after=after)
        reference = reference + branch
    return reference, merged
