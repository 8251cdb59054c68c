"""Residual Add + LayerNorm/RMSNorm becomes onnxruntime's Skip op (target ``onnxruntime`` only).

Off by default, because it is slower. Measured with onnxruntime 1.32's CPU provider
(``python -m benchmarks.norm_ops``: 1x128x768 float32, one thread, graph optimizations off),
com.microsoft SkipLayerNormalization takes 812 us where Add + LayerNormalization take 108 us:
7.5x slower (6.4x at two threads; float16 alike, with or without beta/bias, any eps). With
``ORT_ENABLE_ALL`` onnxruntime makes that fusion itself, so there every spelling takes about
900 us. SkipSimplifiedLayerNormalization takes 134 us where Add + SimplifiedLayerNormalization
or Add + RMSNormalization-23 take 74 us (1.8x; onnxruntime does not make that fusion on CPU).
So by default every site that would qualify is refused with that reason;
``FuseNormPass(skip_ops=True)`` emits the ops.

Rule. For ``y = LayerNormalization(a + b, gamma, beta)`` (``SimplifiedLayerNormalization(a + b,
gamma)`` or ``RMSNormalization(a + b, gamma)``) over the last axis — fused by this pass or
already in the graph — emit com.microsoft
``SkipLayerNormalization(a, b, gamma, beta, epsilon)`` (``SkipSimplifiedLayerNormalization(a,
b, gamma, epsilon)``). When the sum ``a + b`` is also read elsewhere or is a graph output (the
residual stream of a pre-norm transformer), those readers get the op's fourth output,
``input_skip_bias_sum``, which is exactly ``a + b``.

With a bias (:class:`SkipBiasNormFusion`). For ``y = Norm((a + b) + bias)`` (or
``Norm(bias + (a + b))``) where ``bias`` is a constant of shape (hidden,), the op's ``bias``
input takes it: ``Skip…(a, b, gamma, beta, bias)`` (``Skip…Simplified…(a, b, gamma, bias)``).
onnxruntime's kernel adds in that order, input plus skip, then bias, so the result is the
graph's, as exact as the fusion without a bias; its fourth output is then ``(a + b) + bias``.
The inner sum ``a + b`` must have no other reader (the op does not output it). ``(a + bias) +
b``, the order a MatMul's bias and a residual usually come in, is another sum in floating point
and is not rewritten this way.

Sites kept because the ops are slower are refused with ``by_design=True`` in their report line,
so reports count them apart from sites the graph rules out.

Preconditions, from onnxruntime's kernel (checked; each refused with its reason): the input is
2-D (tokens, hidden) or 3-D (batch, seq, hidden) float or float16; ``a`` and ``b`` have the
same shape, dim by dim (symbolic dims by name); gamma (and beta) have shape (hidden,) with a
static hidden size; the normalization is over the last axis only, with ``stash_type=1``; its
mean/inv-std outputs are unused.
"""

from __future__ import annotations

__all__ = ["SkipBiasNormFusion", "SkipNormFusion"]

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks
from normfold.passes.base import PassOptions, PassRecord
from normfold.passes._norm_rule import FusionState, NormRule
from normfold.passes._norm_spec import META_KEY, FusedNorm, fused_of

_SKIP_OP = {
    "LayerNormalization": "SkipLayerNormalization",
    "RMSNormalization": "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
}
_SKIP_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_SLOWER = {
    "SkipLayerNormalization": "measured 7.5x slower on onnxruntime 1.32's CPU provider (812 vs 108 us at 1x128x768)",
    "SkipSimplifiedLayerNormalization": "measured 1.8x slower on onnxruntime 1.32's CPU provider "
    "(134 vs 74 us at 1x128x768)",
}


class SkipNormFusion(NormRule):
    """``norm(Add(a, b))`` -> Skip op; ``keep_sum`` variants also hand the sum to its readers."""

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState, norm: str, keep_sum: bool) -> None:
        super().__init__(record, options, state)
        self.norm = norm
        self.keep_sum = keep_sum
        # Off by default: the Skip ops were measured slower, so the sites are only refused.
        self.enabled = options.skip_ops
        self.name = f"SkipNormFusion[{norm}{', sum read' if keep_sum else ''}]"

    def pattern(self, op, a, b):
        total = op.Add(a, b, _outputs=["total"])
        return self._normalize(op, total)

    def _normalize(self, op, total):
        normalized = getattr(op, self.norm)(
            total, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["normalized"]
        )
        return (normalized, total) if self.keep_sum else normalized

    def check(self, context, a, b, total, normalized, **_) -> MatchResult:
        return self._check(context, a, b, total, normalized, None)

    def _check(self, context, a, b, total, normalized, bias: ir.Value | None) -> MatchResult:
        if bias is not None and checks.constant(bias) is None:
            return MatchResult().fail("the last addend is no constant: a plain residual sum")
        node = normalized.producer()
        read_elsewhere = total.is_graph_output() or len(total.consumers()) > 1
        if read_elsewhere != self.keep_sum:
            return MatchResult().fail("the other variant of this rule handles this site")
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise Refusal(f"{node.op_type}'s mean/inv-std outputs are read")
        if node.attributes.get_int("stash_type", 1) != 1:
            raise Refusal("stash_type is not float32")
        if total.dtype not in _SKIP_TYPES:
            raise Refusal(f"onnxruntime's Skip ops take float or float16, not {total.dtype}")
        shape_a, shape_b = checks.dims(a), checks.dims(b)
        if shape_a is None or shape_b is None or len(shape_a) not in (2, 3):
            raise Refusal(f"the residual input has shape {shape_a}; the Skip ops take 2-D or 3-D inputs")
        if len(shape_a) != len(shape_b) or not all(checks.same_dim(p, q) for p, q in zip(shape_a, shape_b)):
            raise Refusal(f"the residual operands have shapes {shape_a} and {shape_b}, not provably the same")
        hidden = shape_a[-1]
        axis = node.attributes.get_int("axis", -1)
        if not isinstance(hidden, int) or axis not in (-1, len(shape_a) - 1):
            raise Refusal(f"normalizes from axis {axis} of {shape_a}; the Skip ops normalize the last, static axis")
        params = list(node.inputs[1:3]) if self.norm == "LayerNormalization" else list(node.inputs[1:2])
        if bias is not None:
            if bias.dtype != total.dtype:
                raise Refusal(f"the added bias {bias.name!r} is {bias.dtype}, not the sum's {total.dtype}")
            params += [None] * (2 - len(params)) if self.norm == "LayerNormalization" else []
            params.append(bias)
        for value in params:
            if value is not None and checks.dims(value) != [hidden]:
                raise Refusal(f"scale/bias {value.name!r} has shape {checks.dims(value)}, not ({hidden},)")
        while params and params[-1] is None:
            params.pop()
        spec = fused_of(normalized) or FusedNorm(
            op_type=self.norm, x=total, axes=(len(shape_a) - 1,), affine_axes=(len(shape_a) - 1,),
            affine_shape=(hidden,), epsilon=node.attributes.get_float("epsilon", 1e-5),
            site=node.name or node.op_type, spelling=f"{self.norm} already in the graph",
        )
        self._params = params
        kept = [normalized, total] if self.keep_sum else [normalized]
        result = self.accept(context, spec, kept=kept)
        if result and not self.enabled:
            skip_op = _SKIP_OP[self.norm]
            raise Refusal(
                f"residual Add + {self.norm} left apart: {skip_op} {_SLOWER[skip_op]} (--skip-ops emits it)",
                by_design=True,
            )
        return result

    def rewrite(self, op, a, b, normalized, **_):
        node = normalized.producer()
        spec = self.spec
        skip_op = _SKIP_OP[self.norm]
        outputs = op.op(
            skip_op,
            a,
            b,
            *self._params,
            epsilon=node.attributes.get_float("epsilon", 1e-5),
            _domain="com.microsoft",
            _outputs=4 if self.keep_sum else 1,
        )
        y = outputs[0] if self.keep_sum else outputs
        y.type, y.shape = normalized.type, normalized.shape
        y.producer().meta[META_KEY] = dataclasses.replace(
            spec, op_type=skip_op, spelling=f"residual Add + {spec.spelling}" if spec.spelling else "residual Add"
        )
        if not self.keep_sum:
            return y
        outputs[3].type, outputs[3].shape = normalized.type, normalized.shape
        return y, outputs[3]


class SkipBiasNormFusion(SkipNormFusion):
    """``norm((a + b) + bias)`` -> Skip op with its bias input; ``bias_first``: ``bias + (a + b)``."""

    def __init__(
        self, record: PassRecord, options: PassOptions, state: FusionState, norm: str, keep_sum: bool,
        bias_first: bool,
    ) -> None:
        super().__init__(record, options, state, norm, keep_sum)
        self.bias_first = bias_first
        self.name = f"SkipNormFusion[{norm}, bias{' first' if bias_first else ''}{', sum read' if keep_sum else ''}]"

    def pattern(self, op, a, b, bias):
        inner = op.Add(a, b)
        total = op.Add(bias, inner, _outputs=["total"]) if self.bias_first else op.Add(inner, bias, _outputs=["total"])
        return self._normalize(op, total)

    def check(self, context, a, b, bias, total, normalized, **_) -> MatchResult:
        return self._check(context, a, b, total, normalized, bias)
