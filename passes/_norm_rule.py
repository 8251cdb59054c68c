"""The base of every ``fuse-norm`` rule: the checks all fusions share, and the survey mode.

A :class:`NormRule` is a :class:`RecordingRule` whose ``check`` ends with :meth:`NormRule.accept`:

1. every intermediate of the site is read only inside the site (the rewrite leaves the old
   nodes for dead-code removal, so a reader outside would keep computing them: refused);
2. the opset the rule's output needs (its ``opset`` in :mod:`normfold.passes.rules`:
   LayerNormalization 17, GroupNormalization 21, RMSNormalization 23 on target ``onnx``; none
   on target ``onnxruntime``, whose ONNX-domain LayerNormalization and
   SimplifiedLayerNormalization run at every opset) is available: the model's default-domain
   opset is at least that, or — in the survey run, before the pass raises the opset — it may be
   raised that far (``max_opset`` allows it). A site that needs more than ``max_opset`` allows
   is refused with that reason.

The survey run (``FusionState.survey``) performs every check but rewrites nothing and records
nothing; it only collects the opsets the sites want, so the pass can convert the model once
to the highest of them before the real run. Once a site wants ``FusionState.enough`` (the
highest opset the survey can lead to), the rest cannot change the outcome: :meth:`accept`
raises :class:`SurveyComplete`, which ends the survey.

Shapes. While the model's shapes are still to be completed by onnxruntime's inference
(``FusionState.shapes`` pending: :class:`~normfold.passes._shapes.Completion`), a check that
does not accept its site after reading a shape onnx's inference left incomplete
(:func:`~normfold.passes._norm_checks.watch_unknown_shapes`) has the shapes completed and runs
again; only that second run's outcome counts (and is recorded). So a site is decided on the
shapes it would have been decided on had the completion run first, and a model whose sites
never read an incomplete shape never pays for it.

A check that finds the pattern matched something else by accident (a Div whose numerator is
no constant 1, a Mul of two activations) returns a failed ``MatchResult``: no site, nothing
recorded. Every other failure raises :class:`~normfold.errors.Refusal` with its reason, which
:class:`~normfold.passes.base.RecordingRule` records against the site.

Rules never delete nodes themselves (``remove_nodes=False``): matches stay checkable (the
rewriter would otherwise silently skip a site whose intermediates have other readers, and we
want to say so), and the rule set removes dead nodes after each sweep.
"""

from __future__ import annotations

__all__ = ["FusionState", "NormRule", "SurveyComplete"]

import dataclasses
from collections.abc import Iterable
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks
from normfold.passes.base import PassOptions, PassRecord, RecordingRule
from normfold.passes._fold_graph import FreshNames
from normfold.passes._norm_spec import FusedNorm
from normfold.passes._shapes import Completion
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
    # The survey ends at the first site that wants this opset, the highest a survey rule can
    # want within max_opset (None: it runs to the end).
    enough: int | None = None
    shapes: Completion | None = None


class SurveyComplete(Exception):
    """A survey site wants ``FusionState.enough``: no other site can raise the outcome."""


class NormRule(RecordingRule):
    """A fusion rule of ``fuse-norm``; subclasses end ``check`` with :meth:`accept`."""

    def __init__(self, record: PassRecord, options: PassOptions, state: FusionState) -> None:
        super().__init__(record, options)
        self.remove_nodes = False
        self.state = state
        self._spec: FusedNorm | None = None
        self._accepted = False

    def _recording_check(self, context, **bindings: Any) -> MatchResult | bool:
        shapes = self.state.shapes
        if shapes is None or not shapes.pending:
            return super()._recording_check(context, **bindings)
        self._accepted = False
        with checks.watch_unknown_shapes() as reads:
            try:
                outcome: MatchResult | bool | Refusal = self.check(context, **bindings)
            except Refusal as refusal:
                outcome = refusal
        if self._accepted or not reads.unknown:
            return self._refused(outcome, context, bindings) if isinstance(outcome, Refusal) else outcome
        # Decided against the site on a shape onnx left incomplete: complete them, check again.
        shapes.run()
        return super()._recording_check(context, **bindings)

    def accept(self, context, spec: FusedNorm, kept: Iterable[ir.Value]) -> MatchResult:
        """Run the shared checks; on success remember ``spec`` for ``rewrite``."""
        reader = checks.outside_reader(context.nodes, kept)
        if reader is not None:
            raise Refusal(reader)
        # onnxruntime runs every op fuse-norm writes for it at any opset (ort_contrib).
        required = self.opset if self.options.target == "onnx" else 1
        current = model_opset(context.model)
        self._accepted = True
        if self.state.survey:
            self.state.wants.setdefault(context.root, required)
            if required == self.state.enough:
                raise SurveyComplete
            return MatchResult().fail("survey: sites are counted, not rewritten")
        if required > current:
            ceiling = self.options.max_opset
            if ceiling is not None and required > ceiling:
                raise Refusal(
                    f"{spec.op_type} needs opset {required}; the model is at opset {current} "
                    f"and max_opset {ceiling} forbids raising it"
                )
            why = f": {self.state.raise_error}" if self.state.raise_error else ""
            raise Refusal(f"{spec.op_type} needs opset {required}; raising the model from {current} failed{why}")
        self._spec = spec
        return MatchResult()

    @property
    def spec(self) -> FusedNorm:
        assert self._spec is not None
        return self._spec
