"""The ordered table of rewrite rules: which pass runs each rule, in which sweep, for which
target, and what default-domain opset the rule's output needs.

Adding a rule to ``fold-bn``, ``fold-affine`` or ``fuse-norm`` is one file and one line:

1. Write the rule in its own module in ``passes/``, a
   :class:`~normfold.passes.base.RecordingRule` (:class:`~normfold.passes._fold_graph.FoldRule`
   for a fold, :class:`~normfold.passes._norm_rule.NormRule` for a norm fusion) whose docstring
   states the rule and its preconditions. ``pattern()`` is written as the ONNX ops it matches;
   ``check()`` returns a failed ``MatchResult`` when a match is no site at all, raises
   :class:`~normfold.errors.Refusal` with the reason for a site it cannot rewrite exactly, and
   leaves what ``rewrite()`` needs in a dataclass; ``rewrite()`` emits the replacement and
   records the site. Its constructor takes ``(record, options, shared)``: the pass's record and
   options, and what the pass's rules share (fresh initializer names for the folds, the
   :class:`~normfold.passes._norm_rule.FusionState` for fuse-norm); other arguments are bound in
   the table with ``functools.partial``.
2. Add a :class:`Rule` line to :data:`RULES` where it must run. A pass runs its sweeps in table
   order; a sweep is one onnxscript rewrite over the whole model in which its rules are tried
   in table order on each site (the first that accepts a site rewrites it). ``opset`` is what
   the op the rule writes needs on target ``onnx``: ``fuse-norm`` surveys the sites of its
   ``survey`` rules first and raises the model's opset once to the highest they need (unless
   ``--max-opset`` forbids it: then those sites are refused with that reason). onnxruntime
   runs every op the rules write for target ``onnxruntime`` at any opset.

Tests then go in ``tests/`` beside the pass's (numbers checked through onnxruntime with
optimizations off, every refusal reason asserted); ``docs/contributing.md`` walks through an
example.
"""

from __future__ import annotations

__all__ = ["RULES", "Rule", "sweeps"]

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

from normfold.options import Target
from normfold.passes.base import PassOptions, PassRecord, RecordingRule
from normfold.passes.fold_affine_producer import FoldAffineIntoProducer
from normfold.passes.fold_bn_consumer import FoldBnIntoConsumer
from normfold.passes.fold_bn_lower import LowerBatchNorm
from normfold.passes.fold_bn_producer import FoldBnIntoProducer
from normfold.passes.fold_bn_producer_route import FoldBnThroughShapes
from normfold.passes.fuse_group_norm import GroupNormFusion, GroupNormToInstanceForm
from normfold.passes.fuse_layer_norm import LayerNormFusion
from normfold.passes.fuse_norm_affine import AbsorbBias, AbsorbCast, AbsorbScale
from normfold.passes.fuse_norm_near_misses import L2Normalize, LocalResponseNorm
from normfold.passes.fuse_rms_norm import RMSNormFusion
from normfold.passes.fuse_skip_norm import SkipBiasNormFusion, SkipNormFusion

_BOTH: tuple[Target, ...] = ("onnx", "onnxruntime")
_ORT: tuple[Target, ...] = ("onnxruntime",)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of the table: ``make(record, options, shared)`` builds the rule."""

    pass_name: str
    sweep: str
    make: Callable[[PassRecord, PassOptions, Any], RecordingRule]
    opset: int = 1
    targets: tuple[Target, ...] = _BOTH
    survey: bool = False
    # The PassOptions flag that switches the rule on (None: always on).
    option: str | None = None

    def create(self, record: PassRecord, options: PassOptions, shared: Any) -> RecordingRule:
        rule = self.make(record, options, shared)
        rule.opset = self.opset
        return rule


def _mul_div(first: bool) -> Callable[..., RecordingRule]:
    return partial(FoldAffineIntoProducer, ops=frozenset({"Mul"} if first else {"Mul", "Div"}), constant_first=first)


def _add_sub(first: bool) -> Callable[..., RecordingRule]:
    return partial(FoldAffineIntoProducer, ops=frozenset({"Add", "Sub"}), constant_first=first)


RULES: tuple[Rule, ...] = (
    # fold-bn: into the producer, through shape ops, into the readers; then, if asked, lower the rest.
    Rule("fold-bn", "fold", FoldBnIntoProducer),
    Rule("fold-bn", "fold", FoldBnThroughShapes),
    Rule("fold-bn", "fold", FoldBnIntoConsumer),
    Rule("fold-bn", "lower", LowerBatchNorm, option="lower_standalone_bn"),
    # fold-affine: Mul/Div by a constant second, Mul by a constant first, then Add/Sub.
    Rule("fold-affine", "fold", _mul_div(first=False)),
    Rule("fold-affine", "fold", _mul_div(first=True)),
    Rule("fold-affine", "fold", _add_sub(first=False)),
    Rule("fold-affine", "fold", _add_sub(first=True)),
    # fuse-norm: GroupNorm first (a hand-written GroupNorm holds a LayerNorm-shaped core) ...
    Rule("fuse-norm", "groupnorm", GroupNormFusion, opset=21, survey=True),
    Rule("fuse-norm", "groupnorm", GroupNormToInstanceForm, targets=_ORT),
    # ... then LayerNorm and RMSNorm in their three root forms, and the look-alikes refused ...
    *(Rule("fuse-norm", "norm", partial(LayerNormFusion, form=form), opset=17, survey=True)
      for form in ("div", "mul", "rmul")),
    *(Rule("fuse-norm", "norm", partial(RMSNormFusion, form=form), opset=23, survey=True)
      for form in ("div", "mul", "rmul")),
    Rule("fuse-norm", "norm", L2Normalize),
    Rule("fuse-norm", "norm", LocalResponseNorm),
    # ... then the cast back, scale and bias after a fused op ...
    Rule("fuse-norm", "affine", AbsorbCast),
    *(Rule("fuse-norm", "affine", partial(AbsorbScale, order=order)) for order in ("nw", "wn")),
    *(Rule("fuse-norm", "affine", partial(AbsorbBias, order=order)) for order in ("nb", "bn")),
    # ... and for onnxruntime, residual Add + norm into its Skip ops (refused unless skip_ops),
    # a residual sum plus a constant bias first (the op's bias input), then the plain sum.
    *(Rule("fuse-norm", "skip", partial(SkipBiasNormFusion, norm=norm, keep_sum=keep_sum, bias_first=first),
           targets=_ORT)
      for norm in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
      for keep_sum in (False, True)
      for first in (False, True)),
    *(Rule("fuse-norm", "skip", partial(SkipNormFusion, norm=norm, keep_sum=keep_sum), targets=_ORT)
      for norm in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
      for keep_sum in (False, True)),
)


def sweeps(
    pass_name: str, record: PassRecord, options: PassOptions, shared: Any, *, survey: bool = False
) -> list[tuple[str, list[RecordingRule]]]:
    """``pass_name``'s sweeps in table order, each with its rules built for ``options`` (the
    target, the option flags) and ``shared``; with ``survey``, only fuse-norm's survey rules."""
    result: dict[str, list[RecordingRule]] = {}
    for line in RULES:
        if (
            line.pass_name == pass_name
            and options.target in line.targets
            and (line.option is None or getattr(options, line.option))
            and (line.survey or not survey)
        ):
            result.setdefault(line.sweep, []).append(line.create(record, options, shared))
    return list(result.items())
