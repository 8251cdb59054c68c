"""``fuse-norm``: every exact decomposed LayerNorm, RMSNorm and GroupNorm becomes one op.

Rule. The pass runs its rules in sweeps, each an onnxscript rewrite over the whole model
followed by dead-code removal; the rules, their sweeps and order, and the opset each needs are
the ``fuse-norm`` lines of :mod:`normfold.passes.rules`:

1. GroupNorm (:mod:`~normfold.passes.fuse_group_norm`), first, because a hand-written
   GroupNorm holds a LayerNorm-shaped core that must not be fused on its own;
2. LayerNorm and RMSNorm (:mod:`~normfold.passes.fuse_layer_norm`,
   :mod:`~normfold.passes.fuse_rms_norm`), with the look-alikes that are refused
   (:mod:`~normfold.passes.fuse_norm_near_misses`);
3. the cast back, scale and bias that follow a fused op (:mod:`~normfold.passes.fuse_norm_affine`);
4. for target ``onnxruntime``, residual Add + LayerNorm/RMSNorm into com.microsoft Skip ops
   (:mod:`~normfold.passes.fuse_skip_norm`) — only with ``skip_ops=True``: measured several
   times slower than Add + the standard op on onnxruntime 1.32's CPU provider, so by default
   those sites are refused with the measurement.

Targets: ``onnx`` emits LayerNormalization-17, RMSNormalization-23 and GroupNormalization-21;
``onnxruntime`` emits what its CPU provider runs, at the model's opset: LayerNormalization
(onnxruntime's ONNX-domain contrib below opset 17), SimplifiedLayerNormalization for RMSNorm,
GroupNorm kept in (or rewritten to) the Reshape + InstanceNormalization form (measured 2x
faster than GroupNormalization-21), and the Skip ops of step 4 when asked for. So target
``onnxruntime`` never changes the model's opset.

Opset. Before rewriting, a survey run of the ``survey`` rules (steps 1-2) checks every site
without changing anything and collects the opsets the fusions need; if that is more than the model has, the model is
converted once (:func:`~normfold.opset.raise_opset`), unless ``max_opset`` forbids it:
then those sites are refused with that reason. The survey is skipped where it cannot lead to a
raise: target ``onnxruntime``, a model already at the highest opset a survey rule needs, or
``max_opset`` at or below the model's. The survey sweeps run highest opset first and stop at
the first site that wants the highest opset they can lead to (no other site can change the
raise). Shapes are inferred first (onnx shape inference with data propagation), since
TorchScript exports carry none for intermediates; onnxruntime's symbolic inference, which
completes what onnx leaves unknown, runs only when a check needs it
(:class:`~normfold.passes._norm_rule.NormRule`); a site whose shapes stay unknown is refused,
not guessed. A raise keeps every value's shape, so after it only the constants the converter
added are shaped (:func:`~normfold.passes._shapes.shape_after_conversion`), not the whole model
again.

Record: ``sites`` (one per fused op in the output: the ``node`` it replaced, ``into`` the op,
``axes``, ``epsilon``, the ``spelling`` matched), ``by_op`` (fused ops by type), ``refused``
(node and reason), and a note when the opset was raised.
"""

from __future__ import annotations

__all__ = ["FuseNormPass"]

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes.common as common

from normfold.catalog import pass_info
from normfold.errors import NormfoldError, first_line
from normfold.opset import model_opset, raise_opset
from normfold.passes import rules as registry
from normfold.passes._fold_graph import FreshNames
from normfold.passes._norm_rule import FusionState, SurveyComplete
from normfold.passes._norm_spec import META_KEY, FusedNorm
from normfold.passes._shapes import Completion, infer_shapes, shape_after_conversion
from normfold.passes.base import NormfoldPass, PassOptions, PassRecord, apply_rules

logger = logging.getLogger(__name__)


class FuseNormPass(NormfoldPass):
    """Fuse decomposed LayerNorm / RMSNorm / GroupNorm; ``skip_ops`` also emits onnxruntime's
    Skip ops for residual blocks (target ``onnxruntime``; slower today, see ``fuse_skip_norm``)."""

    name = "fuse-norm"
    summary = pass_info(name).summary

    def __init__(self, options: PassOptions | None = None, *, skip_ops: bool = False) -> None:
        super().__init__(options)
        if skip_ops:
            self.options = dataclasses.replace(self.options, skip_ops=True)

    def apply(self, model: ir.Model) -> bool:
        if not registry.may_apply(self.name, self.options, model):
            # No rule's ops are in the model (a CNN): no shapes to infer, nothing to survey.
            return False
        shapes = infer_shapes(model, defer=True)
        raised, raise_error = self._survey_and_raise_opset(model, shapes)
        state = FusionState(FreshNames(model), raise_error=raise_error, shapes=shapes)
        count = 0
        for sweep, rules in registry.sweeps(self.name, self.record, self.options, state, model=model):
            done = apply_rules(model, rules)
            if done and sweep == "groupnorm":
                # Shapes downstream of a fused GroupNorm may now be inferable (opset 13 has no
                # data propagation through Shape).
                state.shapes = infer_shapes(model, defer=True)
            count += done
        if count:
            # A Skip op hands the residual sum to readers that may come before it; and the new
            # nodes sit where the rewriter put them.
            common.TopologicalSortPass()(model)
        self._record_sites(model)
        return bool(count) or raised

    def _survey_and_raise_opset(self, model: ir.Model, shapes: Completion) -> tuple[bool, str | None]:
        """Survey the sites; raise the opset once to what they need (as far as allowed).

        Returns whether the opset was raised, and why raising failed (None if it did not).
        """
        if self.options.target == "onnxruntime":
            # Every op this target emits runs at any opset: no survey.
            return False, None
        current = model_opset(model)
        ceiling = self.options.max_opset
        opsets = [line.opset for line in registry.RULES if line.pass_name == self.name and line.survey]
        highest = max(opsets, default=current)
        if highest <= current or (ceiling is not None and ceiling <= current):
            # No site can need (or be allowed) more than the model has: nothing to survey.
            return False, None
        enough = max((v for v in opsets if ceiling is None or v <= ceiling), default=None)
        survey = FusionState(FreshNames(model), survey=True, enough=enough, shapes=shapes)
        scratch = PassRecord(self.name)
        # Highest opset first: once a site wants `enough`, the other sweeps cannot change the raise.
        sweeps = registry.sweeps(self.name, scratch, self.options, survey, survey=True, model=model)
        for _, rules in sorted(sweeps, key=lambda sweep: -max(rule.opset for rule in sweep[1])):
            try:
                apply_rules(model, rules)
            except SurveyComplete:
                break
        allowed = [v for v in survey.wants.values() if ceiling is None or v <= ceiling]
        needed = max(allowed, default=current)
        if needed <= current:
            return False, None
        try:
            # The proto shape inference serialized describes the model still, unless a survey
            # check completed its shapes since.
            raise_opset(model, needed, proto=shapes.inferred_proto())
        except NormfoldError as error:
            logger.warning("fuse-norm: %s", first_line(error))
            return False, first_line(error)
        self.record.notes.append(f"opset raised from {current} to {needed} for the fused ops")
        shape_after_conversion(model, shapes)
        return True, None

    def _record_sites(self, model: ir.Model) -> None:
        remaining: set[str] = set()
        for node in model.graph.all_nodes():
            remaining.add(node.name or node.op_type)
            spec = node.meta.get(META_KEY)
            if isinstance(spec, FusedNorm):
                self.record.site(
                    spec.site,
                    op=spec.op_type,
                    into=spec.op_type,
                    axes=list(spec.axes),
                    epsilon=spec.epsilon,
                    spelling=spec.spelling,
                )
        self.record.keep_refusals_of(remaining)
