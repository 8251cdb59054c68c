"""Look-alikes of LayerNorm/RMSNorm that no fused op computes: matched only to be refused.

These rules never rewrite; their ``check`` always fails with the reason, which the pass
records for the site (and ``normfold inspect`` shows). The near misses inside the LayerNorm and
RMSNorm rules themselves (unbiased variance, eps on the standard deviation, Filter Response
Norm) are refused there; these are the ones with a different shape altogether:

1. **L2 normalization** ``x / max(||x||_2, eps)`` (``F.normalize``; ``F.normalize(x) *
   sqrt(d) * g``; cosine normalization, which normalizes both operands of a product): the norm
   is clamped below by eps, where RMSNorm adds eps to the mean square inside the root, so
   ``F.normalize(x) * sqrt(d)`` is not ``RMSNorm(x)`` (they differ wherever ||x||^2 / d is not
   much larger than eps). Spelled ``ReduceL2`` (or ``Sqrt`` of ``ReduceSumSquare`` or of
   ``ReduceSum(x * x)``), then ``Clip``/``Max`` with eps, an optional ``Expand``, and ``Div``.
2. **Local response normalization** ``x / (k + alpha * local mean of x^2)^beta``: the mean runs
   over a window of neighbouring channels (an AveragePool over a unit axis), not over whole
   axes.
"""

from __future__ import annotations

__all__ = ["L2Normalize", "LocalResponseNorm"]

from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes.base import PassOptions, PassRecord, RecordingRule

_ANY = dict(_allow_other_inputs=True, _allow_other_attributes=True)


class _NearMiss(RecordingRule):
    """Matches a look-alike wherever it is, even when its intermediates have other readers."""

    def __init__(self, record: PassRecord, options: PassOptions, _shared: object = None) -> None:
        # _shared: the rule table builds every rule with what its pass's rules share; these
        # only refuse, and need none of it.
        super().__init__(record, options)
        self.remove_nodes = False

    def rewrite(self, op, **_):
        return None  # unreachable: check always refuses


class L2Normalize(_NearMiss):
    """``x / max(||x||_2, eps)`` in its spellings: refused."""

    def pattern(self, op, x):
        norm = pattern.OrValue(
            [
                op.ReduceL2(x, **_ANY),
                op.Sqrt(op.ReduceSumSquare(x, **_ANY)),
                op.Sqrt(op.ReduceSum(op.Mul(x, x), **_ANY)),
            ]
        )
        clamped = pattern.OrValue([op.Clip(norm, **_ANY), op.Max(norm, pattern.Var("floor")), norm])
        return op.Div(x, pattern.OrValue([op.Expand(clamped, **_ANY), clamped]))

    def check(self, context, **_) -> MatchResult:
        raise Refusal(
            "L2 normalization x / max(||x||, eps) (F.normalize, cosine normalization): eps clamps the norm "
            "instead of being added to the mean square, so it is no RMSNorm, and no standard op fuses it"
        )


class LocalResponseNorm(_NearMiss):
    """``x / (k + alpha * pooled(x^2))^beta``: refused."""

    def pattern(self, op, x):
        square = pattern.OrValue([op.Mul(x, x), op.Pow(x, pattern.Var("two"))])
        pooled = pattern.OrValue(
            [op.Squeeze(op.AveragePool(op.Unsqueeze(square, **_ANY), **_ANY), **_ANY), op.AveragePool(square, **_ANY)]
        )
        scaled = pattern.OrValue([op.Mul(pooled, pattern.Var("alpha")), op.Mul(pattern.Var("alpha"), pooled)])
        base = pattern.OrValue([op.Add(scaled, pattern.Var("k")), op.Add(pattern.Var("k"), scaled)])
        return op.Div(x, op.Pow(base, pattern.Var("beta")))

    def check(self, context, **_) -> MatchResult:
        raise Refusal(
            "local response normalization (LRN-like): x / (k + alpha * mean of x^2 over neighbouring "
            "channels)^beta is a windowed normalization, not a LayerNorm/RMSNorm/GroupNorm"
        )
