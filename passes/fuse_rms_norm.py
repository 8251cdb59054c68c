"""RMSNorm: ``x / sqrt(mean(x^2) + eps)`` becomes ``RMSNormalization`` (opset 23) or, for
target ``onnxruntime``, ``SimplifiedLayerNormalization``.

Rule. For ``y = x / sqrt(mean(x^2) + eps)`` over axes A of x — LLaMA's float32 upcast, rsqrt
and cast back, T5's (variance from a float32 copy, the input itself divided), Gemma's Mul(x, x)
square, torch ``nn.RMSNorm``/``F.rms_norm`` exports, TorchScript's ``Div(1, Sqrt)``, q/k-norm
over the head dim of a 4-D tensor, in the spellings of :mod:`normfold.passes._norm_patterns` —
replace y by ``RMSNormalization(x, ones, axis=-|A|, epsilon=eps, stash_type=1)``. The weight
(Gemma's ``1 + weight`` is one constant after clean-up), the cast back and a residual Add are
absorbed by the later rules of ``fuse-norm``.

Target ``onnxruntime`` gets ``SimplifiedLayerNormalization`` with the same inputs and
attributes instead: onnxruntime's own RMSNorm op, registered in the ONNX domain (its
com.microsoft spelling has no kernel; see :mod:`normfold.ort_contrib`), which its CPU provider
has run since long before opset 23, so the model keeps its opset. It is as fast as
RMSNormalization-23 (32.5 vs 32.6 us at 1x128x768 on onnxruntime 1.32, one thread; decomposed
105 us; ``python -m benchmarks.norm_ops``) and what onnxruntime's transformers optimizer writes.

Preconditions: those of ``fuse_layer_norm`` (float input of known rank, one set of axes, kept
dims, exact eps, static normalized sizes, no outside readers, opset 23 available for target
``onnx``); the input
of the square and the normalized input are the same tensor (up to a Cast both share, or a
constant factor on the latter, which becomes the scale). Refused: the unbiased mean square,
eps on the root-mean-square, and a normalization over trailing spatial axes followed by a
per-channel affine (Filter Response Norm: there is no standard op for it).
"""

from __future__ import annotations

__all__ = ["RMSNormFusion", "rms_op"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks
from normfold.passes import _norm_patterns as patterns
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._norm_rule import FusionState
from normfold.passes.fuse_layer_norm import FORMS, LayerNormFusion


def rms_op(target: str) -> str:
    """The op an RMSNorm becomes on ``target``."""
    return "SimplifiedLayerNormalization" if target == "onnxruntime" else "RMSNormalization"


def _same_source(a: ir.Value, b: ir.Value) -> bool:
    a, b = checks.strip_noop_cast(a), checks.strip_noop_cast(b)
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    return (
        pa is not None
        and pb is not None
        and pa.op_type == pb.op_type == "Cast"
        and pa.inputs[0] is pb.inputs[0]
        and pa.attributes.get_int("to") == pb.attributes.get_int("to")
    )


def _pre_scale(xm: ir.Value, xs: ir.Value) -> np.ndarray | None:
    """The constant c when ``xm = xs * c`` (a scale applied before the division), else None."""
    node = xm.producer()
    if node is None or node.op_type != "Mul":
        return None
    for this, other in (node.inputs, reversed(node.inputs)):
        value = checks.constant(other)
        if value is not None and this is not None and _same_source(this, xs):
            return value
    return None


def _per_channel_affine(root: ir.Value, rank: int, axes: tuple[int, ...]) -> list[int] | None:
    """The axes a constant multiplier of ``root`` (a normalized tensor of rank ``rank``) varies
    along, when none of them is normalized."""
    consumers = root.consumers()
    if len(consumers) != 1 or consumers[0].op_type != "Mul":
        return None
    for operand in consumers[0].inputs:
        array = checks.constant(operand)
        if array is None or array.ndim > rank:
            continue
        full = array.reshape((1,) * (rank - array.ndim) + array.shape)
        varying = [a for a in range(rank) if full.shape[a] != 1]
        if varying and not set(varying) & set(axes):
            return varying
    return None


def _centred_over(value: ir.Value, axes: tuple[int, ...]) -> bool:
    """Whether ``value = a - ReduceMean(a)`` over ``axes``: a LayerNorm site, not an RMSNorm one."""
    node = value.producer()
    if node is None or node.op_type != "Sub" or node.inputs[1] is None:
        return False
    mean = node.inputs[1].producer()
    source = node.inputs[0]
    if mean is None or mean.op_type != "ReduceMean" or mean.inputs[0] is not source or source is None:
        return False
    rank = checks.rank(source)
    if rank is None:
        return False
    try:
        return checks.reduce_axes(mean, rank) == axes
    except Refusal:  # axes that cannot be read are not these axes
        return False


class RMSNormFusion(LayerNormFusion):
    """One root form (``div``, ``mul`` or ``rmul``) of the RMSNorm rule."""

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState, form: str) -> None:
        super().__init__(record, options, state, form)
        self.name = f"RMSNormFusion[{form}]"

    def pattern(self, op, xs, xm):
        return patterns.normalized(op, xm, patterns.mean_square(op, xs), self.form)

    def check(self, context, xs, xm, **bindings) -> MatchResult:
        pre = None
        if not _same_source(xs, xm):
            pre = _pre_scale(xm, xs)
            if pre is None:
                return MatchResult().fail("the divided tensor is not the tensor whose mean square is taken")
        x = checks.strip_noop_cast(xs)
        site = patterns.read_site(bindings, x, "RMSNorm")
        if site is None:
            return MatchResult().fail("not a normalization")
        if _centred_over(x, site.axes):
            # The LayerNorm rule saw this site first and said why it refused it.
            return MatchResult().fail("the input is mean-centred over the same axes")
        if pre is not None:
            laid_out = checks.affine_operand(pre, checks.dims(x) or [], site.axes, "the scale applied before the division")
            site = patterns.Site(site.axes, site.epsilon, laid_out.astype(np.float64), site.spelling)
        # read_site refused an x of unknown rank.
        varying = _per_channel_affine(context.root.outputs[0], checks.rank(x) or 0, site.axes)
        if varying is not None:
            raise Refusal(
                f"normalizes over axes {list(site.axes)} and then applies a constant affine that varies "
                f"along axes {varying} only (Filter Response Norm-like): no standard op computes it"
            )
        return self.accept_site(context, x, site, rms_op(self.options.target))
