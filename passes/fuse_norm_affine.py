"""What follows a fused normalization and belongs in it: a cast back, the scale, the bias.

These rules act only on normalizations this pass has just fused (the producer carries a
:class:`~normfold.passes._norm_spec.FusedNorm`), and only when that result has no other
reader. Each re-emits the fused op with a changed spec; the old one is left for dead-code
removal. When one does not apply, the normalization stays fused as it is: a constant that
cannot be taken in is recorded as refused, with the reason (a per-row scale is no LayerNorm
scale); a run-time operand is not (DiT's LayerNorm without affine keeps its modulation
``* (1 + scale) + shift``, which varies per sample).

1. **Cast**: ``Cast(norm(x), to=T)`` where T is already norm's dtype is dropped (exporters cast
   float32 to float32). ``Cast(norm(Cast(x0, to=float)), to=T)`` with x0 of dtype T (float16 or
   bfloat16) becomes ``norm(x0)`` with ``stash_type=1``: the op computes in float32 and casts its
   result to T once, as the source graph did. Its scale and bias are cast to T, so they must be
   exactly representable in T (ones always are).
2. **Scale**: ``norm(x) * w`` (either order) multiplies the scale by ``w`` (float64, then one
   cast) and the bias too, when ``w`` is a constant that varies only along the axes the fused
   op's scale covers (the normalized axes; the channels for GroupNormalization) and does not
   enlarge the result; a run-time ``w`` of exactly the scale's shape becomes the scale input
   of a normalization that has none yet.
3. **Bias**: ``norm(x) + b`` (either order) adds ``b`` to the bias, under the same conditions;
   RMSNormalization (SimplifiedLayerNormalization) has no bias input, so a bias after it stays an Add.
4. A constant scale or bias after a **Cast that stayed** (``Cast(norm(x), to=float16) * w``, where
   rule 1 could not take the Cast in) cannot reach the op either: it stays apart, and is recorded
   as refused with that reason, like any other constant that cannot be taken in.

A scale or bias whose cast to the input's dtype would overflow (or flush a nonzero value to 0)
is not absorbed: the operand stays apart, with the reason (``fold_precision.cast_problem``).
"""

from __future__ import annotations

__all__ = ["AbsorbBias", "AbsorbCast", "AbsorbScale"]

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.math import fold_precision
from normfold.passes import _norm_checks as checks
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._norm_rule import FusionState, NormRule
from normfold.passes._norm_spec import RMS_OPS, FusedNorm, emit, fused_of


class _AbsorbRule(NormRule):
    """A failed absorption leaves a correct fusion in place. Only a constant scale or bias that
    cannot be taken in is recorded (a user may expect it to be); run-time operands (DiT's
    modulation) and a Cast that is no upcast round trip are not sites at all."""

    def fused_input(self, n: ir.Value, context) -> FusedNorm | None:
        """The spec of the normalization this pass fused into ``n``, when the match may absorb
        into it; None (no site) when ``n`` is no fused normalization or has other readers."""
        spec = fused_of(n)
        if spec is None or n.is_graph_output() or any(c not in context.nodes for c in n.consumers()):
            return None
        return spec

    def rewrite(self, op, **_):
        return emit(op, self.spec, self.state.namer)


def _exact_in(values: np.ndarray | ir.Value | None, dtype: ir.DataType) -> bool:
    if values is None:
        return True
    if isinstance(values, ir.Value):
        return values.dtype == dtype
    cast = np.asarray(values).astype(dtype.numpy()).astype(np.float64)
    return bool(np.array_equal(cast, values))


class AbsorbCast(_AbsorbRule):
    """``Cast(norm(x))``: a no-op cast dropped, or the float32 upcast of half input folded in."""

    def pattern(self, op, n):
        return op.Cast(n, _allow_other_attributes=True, _outputs=["cast"])

    def check(self, context, n, cast, **_) -> MatchResult:
        spec = self.fused_input(n, context)
        if spec is None:
            return MatchResult().fail("not the only reader of a normalization fused by this pass")
        target = ir.DataType(cast.producer().attributes.get_int("to"))
        if target == n.dtype:
            return self.accept(context, spec, kept=[cast])
        upcast = spec.x.producer()
        if (
            upcast is None
            or upcast.op_type != "Cast"
            or spec.x.dtype != ir.DataType.FLOAT
            or upcast.inputs[0] is None
            or upcast.inputs[0].dtype != target
            or target not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        ):
            return MatchResult().fail("the cast does not undo a float32 upcast of the input")
        if not (_exact_in(spec.scale, target) and _exact_in(spec.bias, target)):
            raise Refusal(
                f"the cast back to {target.name} stays apart: the scale or bias is not exactly "
                f"representable in {target.name}"
            )
        merged = dataclasses.replace(spec, x=upcast.inputs[0], stash_type=1)
        return self.accept(context, merged, kept=[cast])


class _AbsorbOperand(_AbsorbRule):
    """``norm(x) <op> c`` (``order`` starting with "n") or ``c <op> norm(x)``, for the
    ``op_type`` of the subclass; ``c`` may come through a CastLike to the normalized dtype."""

    op_type: str

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState, order: str) -> None:
        super().__init__(record, options, state)
        self.order = order
        self.name = f"{type(self).__name__}[{order}]"

    def pattern(self, op, n, c):
        # dynamo writes CastLike(c, n) for a parameter: a cast to n's dtype.
        operand = pattern.OrValue([op.CastLike(c, n), c])
        combine = getattr(op, self.op_type)
        return combine(n, operand) if self.order.startswith("n") else combine(operand, n)

    def not_fused(self, n: ir.Value, c: ir.Value) -> MatchResult:
        """``n`` is no fused normalization of which this op is the only reader: no site, unless
        (rule 4) ``n`` is a Cast of one, or a constant affine of such a Cast, and ``c`` a constant."""
        spec = _behind_kept_cast(n)
        if spec is None or checks.constant(c) is None:
            return MatchResult().fail("not the only reader of a normalization fused by this pass")
        scale = self.op_type == "Mul"
        target = n.dtype.name if n.dtype is not None else "another type"
        raise Refusal(
            f"the constant {'multiplier' if scale else 'addend'} after the {spec.op_type} stays apart: the Cast "
            f"to {target} between them stays (see that Cast's refusal), so it cannot enter the op's "
            f"{'scale' if scale else 'bias'}"
        )


class AbsorbScale(_AbsorbOperand):
    """``norm(x) * w`` (``order`` "nw") or ``w * norm(x)`` ("wn")."""

    op_type = "Mul"

    def check(self, context, n, c, **_) -> MatchResult:
        spec = self.fused_input(n, context)
        if spec is None:
            return self.not_fused(n, c)
        array = checks.constant(c)
        if array is None:
            if spec.scale is None and spec.bias is None and _runtime_fits(c, spec):
                return self.accept(context, dataclasses.replace(spec, scale=c), kept=context.root.outputs)
            return MatchResult().fail("the multiplier is computed at run time")
        laid_out = checks.affine_operand(
            _as(array, n), checks.dims(n) or [], spec.affine_axes,
            f"the constant multiplier after the {spec.op_type} stays apart",
        )
        if isinstance(spec.scale, ir.Value) or isinstance(spec.bias, ir.Value):
            raise Refusal("the scale or bias is computed at run time")
        factor = laid_out.astype(np.float64)
        scale = factor if spec.scale is None else spec.scale * factor
        bias = None if spec.bias is None else spec.bias * factor
        if (problem := _cast_problem(spec, scale=scale, bias=bias)) is not None:
            raise Refusal(f"the constant multiplier after the {spec.op_type} stays apart: {problem}")
        return self.accept(context, dataclasses.replace(spec, scale=scale, bias=bias), kept=context.root.outputs)


class AbsorbBias(_AbsorbOperand):
    """``norm(x) + b`` (``order`` "nb") or ``b + norm(x)`` ("bn")."""

    op_type = "Add"

    def check(self, context, n, c, **_) -> MatchResult:
        spec = self.fused_input(n, context)
        if spec is None:
            return self.not_fused(n, c)
        array = checks.constant(c)
        if spec.op_type in RMS_OPS:
            if array is None:
                return MatchResult().fail(f"{spec.op_type} has no bias input")
            raise Refusal(f"the constant added after the {spec.op_type} stays apart: it has no bias input")
        if array is None:
            if spec.bias is None and _runtime_fits(c, spec):
                return self.accept(context, dataclasses.replace(spec, bias=c), kept=context.root.outputs)
            return MatchResult().fail("the bias is computed at run time")
        laid_out = checks.affine_operand(
            _as(array, n), checks.dims(n) or [], spec.affine_axes,
            f"the constant added after the {spec.op_type} stays apart",
        )
        if isinstance(spec.bias, ir.Value):
            raise Refusal("the bias is computed at run time")
        added = laid_out.astype(np.float64)
        bias = added if spec.bias is None else spec.bias + added
        if (problem := _cast_problem(spec, bias=bias)) is not None:
            raise Refusal(f"the constant added after the {spec.op_type} stays apart: {problem}")
        return self.accept(context, dataclasses.replace(spec, bias=bias), kept=context.root.outputs)


def _cast_problem(spec: FusedNorm, **arrays: np.ndarray | None) -> str | None:
    """Why the absorbed scale/bias would not survive the cast to the input's dtype, or None."""
    if spec.x.dtype is None:
        return None
    for what, array in arrays.items():
        if array is not None and (problem := fold_precision.cast_problem(array, spec.x.dtype.numpy(), what)):
            return problem
    return None


def _behind_kept_cast(value: ir.Value) -> FusedNorm | None:
    """The fused normalization ``value`` is a Cast of, through constant Mul/Add steps, if any."""
    node = value.producer()
    while node is not None and node.op_type in ("Mul", "Add") and len(node.inputs) == 2:
        # Which operand is computed, told without reading any weight (this runs on every Mul
        # and Add after a non-fused value: reading them cost 22 s on a 150 M LLaMA).
        operands = [v for v in node.inputs if v is not None and not _stored(v)]
        if len(operands) != 1:
            return None
        node = operands[0].producer()
    if node is None or node.op_type != "Cast" or not node.inputs or node.inputs[0] is None:
        return None
    return fused_of(node.inputs[0])


def _stored(value: ir.Value) -> bool:
    """An initializer (not a graph input) or a Constant's output."""
    producer = value.producer()
    if producer is not None:
        return producer.op_type == "Constant"
    return value.const_value is not None and not value.is_graph_input()


def _as(array: np.ndarray, like: ir.Value) -> np.ndarray:
    """``array`` as the graph uses it: in the normalized value's dtype (a CastLike's result)."""
    assert like.dtype is not None
    return array.astype(like.dtype.numpy()).astype(np.float64)


def _runtime_fits(value: ir.Value, spec: FusedNorm) -> bool:
    """A run-time scale/bias can be the op's input only with exactly the scale's shape and dtype."""
    return (
        spec.trailing
        and spec.op_type in ("LayerNormalization", *RMS_OPS)
        and value.dtype == spec.x.dtype
        and checks.dims(value) == list(spec.affine_shape)
    )
