"""The rule table (normfold.passes.rules) and the one refusal idiom (normfold.errors.Refusal)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxscript.rewriter._basics import MatchResult

from normfold import io
from normfold.errors import Refusal
from normfold.passes import PassOptions, create_passes
from normfold.passes import rules as registry
from normfold.passes.base import PassRecord, RecordingRule
from tests.conftest import conv_bn_relu_model


def _sweep_names(pass_name: str, options: PassOptions) -> list[str]:
    return [name for name, _ in registry.sweeps(pass_name, PassRecord(pass_name), options, None)]


def test_sweeps_follow_the_table_for_each_target_and_option() -> None:
    assert _sweep_names("fuse-norm", PassOptions(target="onnx")) == ["groupnorm", "norm", "affine"]
    assert _sweep_names("fuse-norm", PassOptions(target="onnxruntime")) == ["groupnorm", "norm", "affine", "skip"]
    assert _sweep_names("fold-bn", PassOptions()) == ["fold"]
    assert _sweep_names("fold-bn", PassOptions(lower_standalone_bn=True)) == ["fold", "lower"]


def test_the_table_carries_the_opset_of_what_each_rule_writes() -> None:
    needs = {line.make.func.__name__ if hasattr(line.make, "func") else line.make.__name__: line.opset
             for line in registry.RULES if line.survey}
    assert needs == {"GroupNormFusion": 21, "LayerNormFusion": 17, "RMSNormFusion": 23}
    built = [rule for _, rules in registry.sweeps("fuse-norm", PassRecord("fuse-norm"), PassOptions(), None)
             for rule in rules]
    assert {type(rule).__name__: rule.opset for rule in built}["RMSNormFusion"] == 23


class _RefuseRelu(RecordingRule):
    """A rule as a contributor would write one: it refuses every Relu after a BatchNorm (the
    conv_bn_relu model's one Relu) and finds no site anywhere else."""

    def __init__(self, record: PassRecord, options: PassOptions, _shared: Any) -> None:
        super().__init__(record, options)

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Relu(x, _outputs=["y"])

    def check(self, context: Any, x: ir.Value, y: ir.Value, **_: Any) -> MatchResult:
        producer = x.producer()
        if producer is None or producer.op_type != "BatchNormalization":
            return MatchResult().fail("not after a BatchNorm: no site")
        raise Refusal("a Relu after a BatchNorm is refused by this test rule", measured=1.5)

    def rewrite(self, op: Any, **_: Any) -> None:
        raise AssertionError("a refused site is never rewritten")


def test_a_rule_added_to_the_table_runs_and_its_refusal_is_one_report_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "RULES", registry.RULES + (registry.Rule("fold-affine", "fold", _RefuseRelu),))
    model = io.load(conv_bn_relu_model())
    fold_affine = create_passes(["fold-affine"], PassOptions())[1]
    fold_affine(model)
    assert fold_affine.record.refused == [
        {"node": "relu", "reason": "a Relu after a BatchNorm is refused by this test rule", "measured": 1.5}
    ]


def test_a_refusal_without_a_node_is_reported_against_the_site() -> None:
    record = PassRecord("demo")
    with record.refusing("site_a"):
        raise Refusal("no exact rewrite")
    with record.refusing("site_b"):
        raise Refusal("said of another node", node="other")
    with record.refusing("site_c"):
        pass
    record.refuse(Refusal("a second reason is not kept"), "site_a")
    assert record.refused == [
        {"node": "site_a", "reason": "no exact rewrite"},
        {"node": "other", "reason": "said of another node"},
    ]


def _pattern_ops(line: registry.Rule, target: str) -> set[str]:
    rule = line.create(PassRecord(line.pass_name), PassOptions(target=target), None).as_rule()
    # A node matching any of several ops (``any_op``) prints them as "Div|Mul".
    return {op for node in rule._target_pattern for op in str(node.op_type).split("|")}


def test_each_rule_needs_ops_its_pattern_is_written_with() -> None:
    # A misspelled op in `needs` would switch the rule off for every model.
    for line in registry.RULES:
        ops = _pattern_ops(line, line.targets[0])
        for wanted in line.needs:
            assert wanted & ops or wanted == registry.FUSED_OPS, (line, wanted, ops)


def test_a_model_without_the_ops_builds_no_rule_and_fuse_norm_does_nothing() -> None:
    model = io.load(conv_bn_relu_model())  # Conv, BatchNormalization, Relu
    options = PassOptions()
    fuse = list(registry.sweeps("fuse-norm", PassRecord("fuse-norm"), options, None, model=model))
    assert fuse == [] and not registry.may_apply("fuse-norm", options, model)
    fold = list(registry.sweeps("fold-bn", PassRecord("fold-bn"), options, None, model=model))
    assert [(sweep, len(rules)) for sweep, rules in fold] == [("fold", 3)]
    assert list(registry.sweeps("fold-affine", PassRecord("fold-affine"), options, None, model=model)) == []
    # Without a model every rule is built, as before.
    assert _sweep_names("fuse-norm", options) == ["groupnorm", "norm", "affine"]


def test_a_rule_reaches_the_matcher_only_at_nodes_of_its_root_op() -> None:
    # apply_rules's rules test the pattern root's op type before matching (the matcher's own
    # first test): a node of another op type is one the matcher fails anyway.
    ops = sorted({op for line in registry.RULES for target in line.targets for op in _pattern_ops(line, target)})
    x = ir.Value(name="x")
    nodes = [ir.Node("", op, [x, x], num_outputs=1, name=op) for op in [*ops, "Relu"]]
    graph = ir.Graph([x], [node.outputs[0] for node in nodes], nodes=nodes, opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)
    for line in registry.RULES:
        for target in line.targets:
            rule = line.create(PassRecord(line.pass_name), PassOptions(target=target), None).as_rule()
            roots = set(str(rule._target_pattern.output_nodes[0].op_type).split("|"))
            assert rule._root_op is not None, line
            for node in graph:
                if node.op_type not in roots:
                    assert rule.try_rewrite(model, graph, node) is None
                    assert not rule.match(model, graph, node), (line, node.op_type)


def test_a_model_without_sub_or_instance_norm_builds_no_group_norm_rule() -> None:
    # An RMSNorm then a Reshape (a LLaMA's ops): a GroupNorm normalizes with InstanceNormalization
    # or centres with a Sub, so its sweep is not built; the RMSNorm's is.
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
        helper.make_node("Div", ["x", "ms"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "rms_reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [16])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [16])],
    )
    model = io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    options = PassOptions()
    sweeps = registry.sweeps("fuse-norm", PassRecord("fuse-norm"), options, None, model=model)
    assert [sweep for sweep, _ in sweeps] == ["norm"]
    model.graph.node(0).op_type = "Sub"
    sweeps = registry.sweeps("fuse-norm", PassRecord("fuse-norm"), options, None, model=model)
    assert [sweep for sweep, _ in sweeps] == ["groupnorm", "norm"]


def test_a_later_sweep_sees_the_ops_an_earlier_one_wrote() -> None:
    model = io.load(conv_bn_relu_model())
    sweeps = registry.sweeps("fold-bn", PassRecord("fold-bn"), PassOptions(lower_standalone_bn=True), None,
                             model=model)
    assert next(sweeps)[0] == "fold"
    for node in list(model.graph):
        if node.op_type == "BatchNormalization":
            model.graph.remove(node, safe=False)
    assert list(sweeps) == [], "the lower sweep is built when reached: no BatchNorm is left for it"
