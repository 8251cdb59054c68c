"""GroupNorm: a grouped view normalized and viewed back becomes ``GroupNormalization`` (opset 21).

Rule. For ``y = Reshape(norm(Reshape(x, (N, G, ...))), shape of x)`` where ``norm`` is
``InstanceNormalization`` (TorchScript's and dynamo's ``nn.GroupNorm`` spelling) or a
mean-centred normalization over every axis after the group axis (hand-written ``view``,
``mean``, ``var``, ``view``), replace y by ``GroupNormalization(x, scale, bias, num_groups=G,
epsilon=eps, stash_type=1)``. InstanceNormalization's per-group scale and bias become per-channel
ones; the per-channel affine that follows (``* w[C,1,1] + b[C,1,1]``) is absorbed by
:mod:`normfold.passes.fuse_norm_affine`. ``GroupNorm(1, C)`` is the case G = 1.

Target ``onnxruntime``: its CPU provider runs GroupNormalization-21 as a function of primitive
ops, measured 2.5x slower than Reshape + InstanceNormalization + Reshape (4057 vs 1591 us at
1x320x64x64 with 32 groups, one thread, optimizations off and on alike; the hand-written graph
2579 us; ``python -m benchmarks.norm_ops``); com.microsoft GroupNorm has no CPU kernel. So for
that target a hand-written GroupNorm becomes the InstanceNormalization form (``by_op``:
InstanceNormalization), the InstanceNormalization spelling is left as it is (refused with
that reason), and a float32 GroupNormalization-21 an exporter wrote (dynamo at opset 23) is
respelled in that form (:class:`GroupNormToInstanceForm`).

Preconditions (each refused with its reason): x has a known rank of at least 3 and a static
channel count C; the first Reshape's result has x's batch dim (same int or symbol), G groups
(static) with C divisible by G; the normalization covers every axis after the group axis; the
second Reshape gives back x's shape dim by dim; InstanceNormalization's scale/bias are constants;
eps is an exact scalar constant; intermediates have no outside readers; opset 21 is available
(target onnx).
"""

from __future__ import annotations

__all__ = ["GroupNormFusion", "GroupNormToInstanceForm"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks
from normfold.passes import _norm_patterns as patterns
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._fold_graph import opset_of
from normfold.passes._norm_rule import FusionState, NormRule
from normfold.passes._norm_spec import FusedNorm, emit


def _groups(view: ir.Value, x_dims: list) -> tuple[int, int]:
    """(G, rank of the view) when ``view = Reshape(x)`` is ``(N, G, ...)``, x's N, C divisible by G."""
    node = view.producer()
    target = checks.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    view_dims = checks.dims(view)
    channels = x_dims[1]
    keeps_batch, groups, rank = False, 0, 0
    if view_dims is not None and len(view_dims) >= 3:
        keeps_batch = checks.same_dim(view_dims[0], x_dims[0])
        groups, rank = (view_dims[1] if isinstance(view_dims[1], int) else 0), len(view_dims)
    if target is not None and target.ndim == 1 and len(target) >= 3:
        # Reshape copies a 0 from the input unless allowzero=1.
        copies = target[0] == 0 and not node.attributes.get_int("allowzero", 0)
        keeps_batch = keeps_batch or bool(copies) or target[0] == x_dims[0]
        groups, rank = int(target[1]), len(target)
    if not rank:
        raise Refusal(f"cannot tell what the Reshape of {x_dims} gives: its shape is unknown")
    if not keeps_batch:
        raise Refusal(f"cannot prove that the Reshape to {view_dims} keeps the batch dim of {x_dims}")
    if groups < 1 or channels % groups:
        raise Refusal(f"the Reshape to {view_dims} does not split {channels} channels into groups")
    return groups, rank


def _restores_shape(reshape: ir.Node, x: ir.Value, x_dims: list) -> bool:
    """Whether ``reshape`` gives back x's shape: by inferred dims, or by ``Shape(x)`` itself."""
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    source = None if shape is None else shape.producer()
    if source is not None and source.op_type == "Shape" and source.inputs[0] is x:
        # Shape's end is clamped to the rank; a missing end means the rank.
        start = source.attributes.get_int("start", 0)
        if start == 0 and source.attributes.get_int("end", len(x_dims)) >= len(x_dims):
            return True
    out_dims = checks.dims(reshape.outputs[0])
    return (
        out_dims is not None
        and len(out_dims) == len(x_dims)
        and all(checks.same_dim(p, q) for p, q in zip(out_dims, x_dims))
    )


class GroupNormFusion(NormRule):
    """Reshape -> (InstanceNormalization | centred normalization) -> Reshape."""

    def pattern(self, op, x):
        view = op.Reshape(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["view"])
        by_instance = op.InstanceNormalization(
            view, pattern.Var("in_scale"), pattern.Var("in_bias"), _allow_other_attributes=True, _outputs=["inorm"]
        )
        by_hand = patterns.normalized(op, patterns.centred(op, view, "mn"), patterns.variance(op, view), "any")
        normed = pattern.OrValue([by_instance, by_hand])
        return op.Reshape(normed, _allow_other_inputs=True, _allow_other_attributes=True)

    def check(self, context, x, view, **bindings) -> MatchResult:
        if bindings.get("inorm") is not None and self.options.target == "onnxruntime":
            raise Refusal(
                "already Reshape + InstanceNormalization + Reshape, the form onnxruntime's CPU provider "
                "runs fastest (GroupNormalization-21 measured 2.5x slower)"
            )
        x_dims = checks.dims(x)
        if x.dtype not in checks.FLOAT_TYPES:
            raise Refusal(f"input {x.name!r} is not a float tensor")
        if x_dims is None or len(x_dims) < 3 or not isinstance(x_dims[1], int):
            raise Refusal(f"input {x.name!r} has shape {x_dims}: no (N, C, ...) with a static C")
        channels = x_dims[1]
        groups, view_rank = _groups(view, x_dims)
        if not _restores_shape(context.root, x, x_dims):
            raise Refusal(f"cannot prove that the second Reshape gives back the input's shape {x_dims}")
        inorm = bindings.get("inorm")
        scale = bias = None
        if inorm is not None:
            epsilon = inorm.producer().attributes.get_float("epsilon", 1e-5)
            in_scale, in_bias = checks.constant(bindings["in_scale"]), checks.constant(bindings["in_bias"])
            if in_scale is None or in_bias is None or in_scale.size != groups or in_bias.size != groups:
                raise Refusal("InstanceNormalization's scale and bias are not constants with one value per group")
            per_group = channels // groups
            scale = np.repeat(in_scale.reshape(-1).astype(np.float64), per_group)
            bias = np.repeat(in_bias.reshape(-1).astype(np.float64), per_group)
            if np.all(scale == 1.0):
                scale = None
            if np.all(bias == 0.0):
                bias = None
            spelling = "Reshape, InstanceNormalization, Reshape"
        else:
            site = patterns.read_site(bindings, view, "GroupNorm")
            if site is None:
                return MatchResult().fail("not a normalization")
            if site.axes != tuple(range(2, view_rank)):
                raise Refusal(
                    f"normalizes axes {list(site.axes)} of the grouped view, not all axes after the group axis"
                )
            epsilon = site.epsilon
            spelling = ", ".join(p for p in ("grouped view, mean/variance by hand", site.spelling) if p)
        if not checks.float32_exact(epsilon):
            raise Refusal(f"eps {epsilon!r} is not exactly representable in the float attribute epsilon")
        root = context.root
        spec = FusedNorm(
            op_type="InstanceNormalization" if self.options.target == "onnxruntime" else "GroupNormalization",
            x=x,
            axes=tuple(range(1, len(x_dims))),
            affine_axes=(1,),
            affine_shape=(channels,),
            epsilon=epsilon,
            scale=scale,
            bias=bias,
            groups=groups,
            site=root.name or root.op_type,
            spelling=spelling,
        )
        return self.accept(context, spec, kept=root.outputs)

    def rewrite(self, op, **_):
        return emit(op, self.spec, self.state.namer)


class GroupNormToInstanceForm(NormRule):
    """Target ``onnxruntime``: a float32 GroupNormalization-21 becomes the InstanceNormalization form.

    Preconditions (refused with the reason): the node is GroupNormalization-21 or later (18's
    scale and bias are per group); x is float32 (the form computes in x's dtype, the op in
    ``stash_type``'s) of known rank >= 3 with a static channel count; scale and bias are constants
    of shape (C,); eps is exact in a float attribute.
    """

    def pattern(self, op, x, scale, bias):
        return op.GroupNormalization(x, scale, bias, _allow_other_attributes=True)

    def check(self, context, x, scale, bias, **_) -> MatchResult:
        node = context.root
        if opset_of(node, context.model) < 21:
            raise Refusal("GroupNormalization before opset 21 scales per group, not per channel: left as it is")
        if x.dtype != ir.DataType.FLOAT:
            raise Refusal(f"GroupNormalization of {x.dtype} computes in its stash_type: left as it is")
        x_dims = checks.dims(x)
        if x_dims is None or len(x_dims) < 3 or not isinstance(x_dims[1], int):
            raise Refusal(f"input {x.name!r} has shape {x_dims}: no (N, C, ...) with a static C")
        channels, groups = x_dims[1], node.attributes.get_int("num_groups", 0)
        gamma, beta = checks.constant(scale), checks.constant(bias)
        if gamma is None or beta is None or gamma.shape != (channels,) or beta.shape != (channels,):
            raise Refusal(f"scale and bias are not constants of shape ({channels},)")
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        if groups < 1 or channels % groups or not checks.float32_exact(epsilon):
            raise Refusal(f"num_groups {groups} does not split {channels} channels, or eps {epsilon!r} is not exact")
        spec = FusedNorm(
            op_type="InstanceNormalization",
            x=x,
            axes=tuple(range(1, len(x_dims))),
            affine_axes=(1,),
            affine_shape=(channels,),
            epsilon=epsilon,
            scale=gamma.astype(np.float64),
            bias=beta.astype(np.float64),
            groups=groups,
            site=node.name or node.op_type,
            spelling="GroupNormalization-21 in the graph",
        )
        return self.accept(context, spec, kept=node.outputs)

    def rewrite(self, op, **_):
        return emit(op, self.spec, self.state.namer)
