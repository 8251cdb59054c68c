"""What every normfold pass shares: options, the record of what it did, and rule plumbing.

A normfold pass is an ``onnx_ir`` in-place pass (so users can put it in their own
``PassManager``) that also keeps a :class:`PassRecord`: the sites it rewrote and the sites it
refused, each refusal with a reason a user can read. The optimize job turns records into the
report and ``normfold inspect`` prints them.

Refusing, the one idiom: anything a site's check calls raises
:class:`~normfold.errors.Refusal` (reason, optionally the node to report it against);
:meth:`PassRecord.refuse` is the one place that turns it into a report line. A rule's ``check``
raises it (:class:`RecordingRule` catches it); a pass that walks sites itself wraps each site in
``with record.refusing(node):``. A match that is no site at all (the pattern matched something
else by accident) is not refused: ``check`` returns a failed ``MatchResult`` (or False), and
nothing is recorded.

Pattern fusions are onnxscript rewriter rules. :func:`apply_rules` runs a list of
:class:`RecordingRule` instances and counts their rewrites; :meth:`PassRecord.keep_refusals_of`
drops refusals of nodes that a later rule (or another pass) rewrote after all.
"""

from __future__ import annotations

__all__ = [
    "NormfoldPass",
    "PassOptions",
    "PassRecord",
    "RecordingRule",
    "apply_rules",
]

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter import pattern as _pattern
from onnxscript.rewriter._basics import MatchResult

from normfold.errors import Refusal
from normfold.options import PassOptions

@dataclasses.dataclass
class PassRecord:
    """What one pass did to one model: rewritten sites and refused sites with reasons."""

    name: str
    applied: int = 0
    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    by_op: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Refusals are looked up per site: a set keeps that linear in large graphs.
    _refused_nodes: set[str] = dataclasses.field(default_factory=set, repr=False, compare=False)

    def site(self, node: str, *, op: str | None = None, **details: Any) -> None:
        """Count one rewrite of ``node`` (the node that disappeared or was replaced)."""
        self.applied += 1
        self.sites.append({"node": node, **details})
        if op is not None:
            self.by_op[op] = self.by_op.get(op, 0) + 1

    def refuse(self, refusal: Refusal, where: ir.Node | str) -> None:
        """Record a refused site: the report line ``{"node", "reason", **details}``, against
        ``refusal.node``, else ``where`` (the first reason given for a node wins)."""
        node = refusal.node if refusal.node is not None else where
        name = node if isinstance(node, str) else (node.name or node.op_type)
        if name not in self._refused_nodes:
            self._refused_nodes.add(name)
            self.refused.append({"node": name, "reason": refusal.reason, **refusal.details})

    @contextlib.contextmanager
    def refusing(self, where: ir.Node | str) -> Iterator[None]:
        """Check one site: a :class:`Refusal` raised in the block is recorded (against ``where``
        unless it names its node) and ends the block; the caller goes on with the next site."""
        try:
            yield
        except Refusal as refusal:
            self.refuse(refusal, where)

    def keep_refusals_of(self, remaining: set[str]) -> None:
        """Forget refusals of nodes that no longer exist: something rewrote them after all."""
        self.refused = [r for r in self.refused if r["node"] in remaining]
        self._refused_nodes = {r["node"] for r in self.refused}

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name,
            "applied": self.applied,
            "sites": self.sites,
            "refused": self.refused,
        }
        if self.by_op:
            result["by_op"] = dict(sorted(self.by_op.items()))
        if self.notes:
            result["notes"] = self.notes
        return result


class NormfoldPass(ir.passes.InPlacePass, abc.ABC):
    """An in-place onnx_ir pass that records its sites and refusals in ``self.record``.

    Subclasses set ``name`` (stable: users and reports refer to it), ``summary`` (one line for
    ``normfold passes``) and ``exact`` (False for approximate passes, which never run unless
    asked), and implement :meth:`apply`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True

    def __init__(self, options: PassOptions | None = None) -> None:
        super().__init__()
        self.options = options or PassOptions()
        self.record = PassRecord(self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.record = PassRecord(self.name)
        modified = self.apply(model)
        return ir.passes.PassResult(model, modified=bool(modified))

    @abc.abstractmethod
    def apply(self, model: ir.Model) -> bool:
        """Rewrite ``model`` in place, filling ``self.record``; return whether it changed."""


class RecordingRule(_pattern.RewriteRuleClassBase):
    """A rewriter rule that reports to a :class:`PassRecord`.

    ``check`` returns a failed ``MatchResult`` (or False) when the match is no site at all, and
    raises :class:`~normfold.errors.Refusal` when it is a site that cannot be rewritten exactly:
    the refusal is recorded against its node, else :meth:`refused_node`. State that ``rewrite``
    needs is handed over in a named dataclass, never a positional tuple. ``rewrite``
    implementations call ``self.record.site``.

    ``opset`` is the default-domain opset the rule's output needs on target ``onnx``; the rule
    table (:mod:`normfold.passes.rules`) sets it.
    """

    opset: int = 1

    def __init__(self, record: PassRecord, options: PassOptions) -> None:
        super().__init__(name=type(self).__name__)
        self.record = record
        self.options = options

    def as_rule(self) -> _pattern.RewriteRule:
        return _RootFirstRule(
            self.pattern,
            self.rewrite,
            self._recording_check,
            name=self.name,
            remove_nodes=self.remove_nodes,
            graph_pre_visitor=self.setup,
            graph_post_visitor=self.cleanup,
            as_function=self.as_function,
        )

    def _recording_check(self, context, **bindings: Any) -> MatchResult | bool:
        try:
            return self.check(context, **bindings)
        except Refusal as refusal:
            return self._refused(refusal, context, bindings)

    def _refused(self, refusal: Refusal, context, bindings: dict[str, Any]) -> MatchResult:
        """Record ``refusal`` against its site; the failed match the rewriter gets instead."""
        self.record.refuse(refusal, self.refused_node(context, **bindings))
        return MatchResult().fail(refusal.reason)

    def refused_node(self, context, **bindings: Any) -> ir.Node:
        """The site a refusal that names no node is reported against: the match's root. A rule
        rooted at one node that refuses on behalf of another (a BN folded into the Conv that
        reads it) overrides this."""
        return context.root

    def check(self, context, **bindings: Any) -> MatchResult | bool:
        return MatchResult()

    def after_sweep(self, model: ir.Model) -> None:
        """Called once the sweep that ran this rule is over (tidy-ups a rewrite defers)."""


class _RootFirstRule(_pattern.RewriteRule):
    """onnxscript's rewrite rule, matched only at nodes its pattern's root op can be.

    A rule set tries every rule at every node. The matcher's first test at a node is the op
    type of the pattern's root (its one output node), and a node that fails it still costs a
    failed match built with its reason, ~4 us: 0.05 s of the 150 M LLaMA's ~12,000 tries, nearly
    all of them that. The same test (the root pattern's own op matcher) runs here first; a node
    it rejects is no match, as the matcher would have said. Patterns with several output nodes,
    and runs with a tracer, go to the matcher as they are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pattern = self._target_pattern
        self._root_op = pattern.output_nodes[0].op if pattern.has_single_output_node else None

    def try_rewrite(self, model, graph_or_function, node, *, verbose=None, tracer=None):
        if self._root_op is not None and tracer is None and not self._root_op.matches(node.op_type):
            return None
        return super().try_rewrite(model, graph_or_function, node, verbose=verbose, tracer=tracer)


def apply_rules(model: ir.Model, rules: list[RecordingRule]) -> int:
    """Apply ``rules`` to every graph and function of ``model`` in one sweep; return the
    rewrite count."""
    rule_set = _pattern.RewriteRuleSet([rule.as_rule() for rule in rules])
    count = rule_set.apply_to_model(model)
    for rule in rules:
        rule.after_sweep(model)
    return count
