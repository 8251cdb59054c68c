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
   runs every op the rules write for target ``onnxruntime`` at any opset. ``needs`` names op
   types the rule's pattern cannot match without (one of each set): a model without them does
   not pay for building the rule (compiling its pattern) nor for a sweep of it.

Tests then go in ``tests/`` beside the pass's (numbers checked through onnxruntime with
optimizations off, every refusal reason asserted); ``docs/contributing.md`` walks through an
example.
"""

from __future__ import annotations

__all__ = ["FUSED_OPS", "RULES", "Rule", "may_apply", "op_types", "sweeps"]

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import onnx_ir as ir

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

# Op types for ``Rule.needs``: what the patterns' roots and reductions are written with.
_LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum"})
# What a fused normalization is emitted as (``_norm_spec.emit``): the affine rules' checks take
# only those, so they need one though their patterns are written with any producer.
FUSED_OPS = frozenset(
    {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization",
     "InstanceNormalization"}
)
_BN = (frozenset({"BatchNormalization"}),)


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
    # Op types the pattern cannot match without: the model holds one of each set, or the
    # rule is not built (empty: always built).
    needs: tuple[frozenset[str], ...] = ()

    def may_match(self, ops: frozenset[str]) -> bool:
        """Whether a model whose op types are ``ops`` can hold a site of this rule."""
        return all(ops & wanted for wanted in self.needs)

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
    Rule("fold-bn", "fold", FoldBnIntoProducer, needs=_BN),
    Rule("fold-bn", "fold", FoldBnThroughShapes, needs=_BN),
    Rule("fold-bn", "fold", FoldBnIntoConsumer, needs=_BN),
    Rule("fold-bn", "lower", LowerBatchNorm, option="lower_standalone_bn", needs=_BN),
    # fold-affine: Mul/Div by a constant second, Mul by a constant first, then Add/Sub.
    Rule("fold-affine", "fold", _mul_div(first=False), needs=(frozenset({"Mul", "Div"}), _LINEAR)),
    Rule("fold-affine", "fold", _mul_div(first=True), needs=(frozenset({"Mul"}), _LINEAR)),
    Rule("fold-affine", "fold", _add_sub(first=False), needs=(frozenset({"Add", "Sub"}), _LINEAR)),
    Rule("fold-affine", "fold", _add_sub(first=True), needs=(frozenset({"Add", "Sub"}), _LINEAR)),
    # fuse-norm: GroupNorm first (a hand-written GroupNorm holds a LayerNorm-shaped core) ...
    # (its normalization is an InstanceNormalization or a centred one, x - mean: a Sub)
    Rule("fuse-norm", "groupnorm", GroupNormFusion, opset=21, survey=True,
         needs=(frozenset({"Reshape"}), _REDUCTIONS | {"InstanceNormalization"},
                frozenset({"Sub", "InstanceNormalization"}))),
    Rule("fuse-norm", "groupnorm", GroupNormToInstanceForm, targets=_ORT, needs=(frozenset({"GroupNormalization"}),)),
    # ... then LayerNorm and RMSNorm in their three root forms, and the look-alikes refused ...
    *(Rule("fuse-norm", "norm", partial(LayerNormFusion, form=form), opset=17, survey=True,
           needs=(_REDUCTIONS, frozenset({"Sub"})))
      for form in ("div", "mul", "rmul")),
    *(Rule("fuse-norm", "norm", partial(RMSNormFusion, form=form), opset=23, survey=True, needs=(_REDUCTIONS,))
      for form in ("div", "mul", "rmul")),
    Rule("fuse-norm", "norm", L2Normalize,
         needs=(frozenset({"Div"}), frozenset({"ReduceL2", "ReduceSumSquare", "ReduceSum"}))),
    Rule("fuse-norm", "norm", LocalResponseNorm,
         needs=(frozenset({"Div"}), frozenset({"AveragePool"}), frozenset({"Pow"}))),
    # ... then the cast back, scale and bias after a fused op ...
    Rule("fuse-norm", "affine", AbsorbCast, needs=(frozenset({"Cast"}), FUSED_OPS)),
    *(Rule("fuse-norm", "affine", partial(AbsorbScale, order=order), needs=(frozenset({"Mul"}), FUSED_OPS))
      for order in ("nw", "wn")),
    *(Rule("fuse-norm", "affine", partial(AbsorbBias, order=order), needs=(frozenset({"Add"}), FUSED_OPS))
      for order in ("nb", "bn")),
    # ... and for onnxruntime, residual Add + norm into its Skip ops (refused unless skip_ops),
    # a residual sum plus a constant bias first (the op's bias input), then the plain sum.
    *(Rule("fuse-norm", "skip", partial(SkipBiasNormFusion, norm=norm, keep_sum=keep_sum, bias_first=first),
           targets=_ORT, needs=(frozenset({"Add"}), frozenset({norm})))
      for norm in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
      for keep_sum in (False, True)
      for first in (False, True)),
    *(Rule("fuse-norm", "skip", partial(SkipNormFusion, norm=norm, keep_sum=keep_sum), targets=_ORT,
           needs=(frozenset({"Add"}), frozenset({norm})))
      for norm in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
      for keep_sum in (False, True)),
)


def sweeps(
    pass_name: str,
    record: PassRecord,
    options: PassOptions,
    shared: Any,
    *,
    survey: bool = False,
    model: ir.Model | None = None,
) -> Iterator[tuple[str, list[RecordingRule]]]:
    """``pass_name``'s sweeps in table order, each with its rules built for ``options`` (the
    target, the option flags) and ``shared``; with ``survey``, only fuse-norm's survey rules.

    With ``model``, a rule whose ``needs`` the model lacks is not built, and a sweep left
    without rules is not yielded. Each sweep's rules are built when the loop reaches it, so its
    check sees the ops the sweeps before it wrote (the affine rules need a fused op).
    """
    chosen: dict[str, list[Rule]] = {}
    for line in _lines(pass_name, options, survey):
        chosen.setdefault(line.sweep, []).append(line)
    for sweep, lines in chosen.items():
        if model is not None:
            ops = op_types(model)
            lines = [line for line in lines if line.may_match(ops)]
        if lines:
            yield sweep, [line.create(record, options, shared) for line in lines]


def may_apply(pass_name: str, options: PassOptions, model: ir.Model) -> bool:
    """Whether any of ``pass_name``'s rules can match ``model`` as it is. When none can, no
    sweep rewrites anything, so no later sweep can match either: the pass has nothing to do."""
    ops = op_types(model)
    return any(line.may_match(ops) for line in _lines(pass_name, options, survey=False))


def op_types(model: ir.Model) -> frozenset[str]:
    """The op types of every node of ``model``: its graphs and its functions."""
    found = {node.op_type for node in model.graph.all_nodes()}
    for function in model.functions.values():
        found.update(node.op_type for node in function.all_nodes())
    return frozenset(found)


def _lines(pass_name: str, options: PassOptions, survey: bool) -> Iterator[Rule]:
    for line in RULES:
        if (
            line.pass_name == pass_name
            and options.target in line.targets
            and (line.option is None or getattr(options, line.option))
            and (line.survey or not survey)
        ):
            yield line
