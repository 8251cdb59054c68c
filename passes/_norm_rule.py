"""The base of every ``fuse-norm`` rule: the checks all fusions share, and the survey mode.

A :class:`NormRule` is a :class:`RecordingRule` whose ``check`` ends with :meth:`NormRule.accept`:

1. every intermediate of the site is read only inside the site (the rewrite leaves the old
   nodes for dead-code removal, so a reader outside would keep computing them: refused);
2. the fused op's opset (LayerNormalization 17, GroupNormalization 21, RMSNormalization 23;
   none for onnxruntime's ONNX-domain LayerNormalization and SimplifiedLayerNormalization on
   target ``onnxruntime``) is available: the model's default-domain opset is at least that, or — in the survey run,
   before the pass raises the opset — it may be raised that far (``max_opset`` allows it). A
   site that needs more than ``max_opset`` allows is refused with that reason.

The survey run (``FusionState.survey``) performs every check but rewrites nothing and records
nothing; it only collects the opsets the sites want, so the pass can convert the model once
to the highest of them before the real run.

A failure that only means the pattern matched something else by accident (a Div whose
numerator is no constant 1, a Mul of two activations) is returned with :meth:`NormRule.mismatch`
and not recorded; every other failure is a refusal with its reason.

Rules never delete nodes themselves (``remove_nodes=False``): matches stay checkable (the
rewriter would otherwise silently skip a site whose intermediates have other readers, and we
want to say so), and the rule set removes dead nodes after each sweep.
"""

from __future__ import annotations

__all__ = ["FusionState", "NormRule"]

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult

from normfold.passes import _norm_checks as checks
from normfold.passes.base import PassOptions, PassRecord, RecordingRule
from normfold.passes._fold_graph import FreshNames
from normfold.passes._norm_spec import FusedNorm, required_opset
from normfold.opset import model_opset


@dataclasses.dataclass
class FusionState:
    """What the rules of one ``fuse-norm`` run share.

    ``wants`` maps a site's root node to the opset its fusion needs, from the first rule (in
    rule order, as the rewriter tries them) that accepts the site in the survey run.
    """

    namer: FreshNames
    survey: bool = False
    wants: dict[ir.Node, int] = dataclasses.field(default_factory=dict)
    raise_error: str | None = None


class NormRule(RecordingRule):
    """A fusion rule of ``fuse-norm``; subclasses end ``check`` with :meth:`accept`."""

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState) -> None:
        super().__init__(record, options)
        self.remove_nodes = False
        self.state = state
        self._spec: FusedNorm | None = None

    @staticmethod
    def mismatch(reason: str) -> MatchResult:
        """A failure that means the pattern matched something else by accident: not recorded."""
        return MatchResult().fail(checks.MISMATCH + reason)

    def _recording_check(self, context, **bindings):
        result = self.check(context, **bindings)
        reason = getattr(result, "reason", "") or ""
        if not result and not reason.startswith(checks.MISMATCH):
            self.record.refuse(context.root.name or context.root.op_type, reason or f"{self.name} does not apply")
        return result

    def accept(self, context, spec: FusedNorm, kept: Iterable[ir.Value]) -> MatchResult:
        """Run the shared checks; on success remember ``spec`` for ``rewrite``."""
        result = MatchResult()
        reader = checks.outside_reader(context.nodes, kept)
        if reader is not None:
            return result.fail(reader)
        required = required_opset(spec.op_type, self.options.target)
        current = model_opset(context.model)
        if self.state.survey:
            self.state.wants.setdefault(context.root, required)
            return self.mismatch("survey")
        if required > current:
            ceiling = self.options.max_opset
            if ceiling is not None and required > ceiling:
                return result.fail(
                    f"{spec.op_type} needs opset {required}; the model is at opset {current} "
                    f"and max_opset {ceiling} forbids raising it"
                )
            why = f": {self.state.raise_error}" if self.state.raise_error else ""
            return result.fail(f"{spec.op_type} needs opset {required}; raising the model from {current} failed{why}")
        self._spec = spec
        return result

    @property
    def spec(self) -> FusedNorm:
        assert self._spec is not None
        return self._spec
