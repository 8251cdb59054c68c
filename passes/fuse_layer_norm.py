"""LayerNorm: a decomposed mean-centred normalization becomes ``LayerNormalization`` (opset 17).

Rule. For ``y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` over axes A of x, in any
of the spellings of :mod:`normfold.passes._norm_patterns` (Pow 2 or Mul(d, d); Div, Reciprocal
times, ``1 / sqrt`` times or ``Pow(., -0.5)`` times; ReduceMean axes as attribute or input;
omitted default attributes; ``torch.var_mean``; a constant scale applied before the division),
replace y by ``LayerNormalization(x, scale, axis=-|A|, epsilon=eps, stash_type=1)`` with a scale
of ones (or the constant applied before the division). The following scale, bias and cast back
to half precision are absorbed by :mod:`normfold.passes.fuse_norm_affine`.

Preconditions (each refused with its reason): x is a float tensor of known rank; every
reduction reduces the same axes A and keeps its dims (or is re-expanded to x's shape); a
ReduceSum is divided by exactly the number of reduced elements; eps is a scalar constant,
carried over exactly (an absent eps becomes 0, which computes what the graph computes); the
sizes of x along A are static; every intermediate has no reader outside the site; opset 17 is
available (target ``onnx``; onnxruntime runs LayerNormalization at every opset, see
:mod:`normfold.ort_contrib`). Near misses refused: the unbiased variance (``x.var()``/``x.std()``: times
n/(n-1)) and eps added to the standard deviation.

Axes A need not be the last ones: ConvNeXt's channels-first LayerNorm over axis 1 of NCHW is
emitted as ``Transpose -> LayerNormalization -> Transpose``. Measured with onnxruntime 1.32's
CPU provider (one thread, graph optimizations off and on alike), that form is faster than the
decomposed graph: 491 vs 770 us at 1x96x56x56, 89 vs 185 us at 1x384x14x14, 9 vs 13 us at
1x16x8x8, 920 vs 1000 us at 8x64x32x32. A normalization over axis 1 is never emitted as a
last-axis LayerNormalization.
"""

from __future__ import annotations

__all__ = ["LayerNormFusion"]

from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks
from normfold.passes import _norm_patterns as patterns
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._norm_rule import FusionState, NormRule
from normfold.passes._norm_spec import FusedNorm, emit

FORMS = ("div", "mul", "rmul")


class LayerNormFusion(NormRule):
    """One root form (``div``, ``mul`` or ``rmul``) of the LayerNorm rule."""

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState, form: str) -> None:
        super().__init__(record, options, state)
        self.form = form
        self.name = f"LayerNormFusion[{form}]"

    def pattern(self, op, x):
        num = patterns.numerator(op, patterns.centred(op, x, "mn"))
        return patterns.normalized(op, num, patterns.variance(op, x), self.form)

    def check(self, context, x, **bindings) -> MatchResult:
        site = patterns.read_site(bindings, x, "LayerNorm")
        if site is None:
            return MatchResult().fail("not a normalization")
        return self.accept_site(context, x, site, "LayerNormalization")

    def accept_site(self, context, x, site: patterns.Site, op_type: str) -> MatchResult:
        sizes = checks.static_dims(x, site.axes)
        if sizes is None:
            raise Refusal(
                f"the normalized axes {list(site.axes)} of {x.name!r} have no static sizes "
                f"(shape {checks.dims(x)}), so no scale of that shape can be built"
            )
        root = context.root
        spec = FusedNorm(
            op_type=op_type,
            x=x,
            axes=site.axes,
            affine_axes=site.axes,
            affine_shape=sizes,
            epsilon=site.epsilon,
            scale=site.pre_scale,
            stash_type=11 if x.dtype.name == "DOUBLE" else 1,
            site=root.name or root.op_type,
            spelling=", ".join(p for p in (f"{self.form} form", site.spelling) if p),
        )
        return self.accept(context, spec, kept=root.outputs)

    def rewrite(self, op, **_):
        return emit(op, self.spec, self.state.namer)
