"""The property-based graph generator (``benchmarks.fuzz``): 500 seeded graphs over every pass,
both targets, float32 and float16, opsets 13-23, judged by onnxruntime with optimizations off
(float16 by the low-precision rule). ``python -m benchmarks.fuzz`` runs 10,000."""

from __future__ import annotations

import collections

import onnx_ir as ir

import normfold
from benchmarks import fuzz


def test_500_generated_graphs_come_out_right() -> None:
    outcomes = fuzz.run(500, seed=0)
    assert len(outcomes) >= 500
    violations = [o for o in outcomes if o.violation]
    assert not violations, fuzz.summary(violations, 0.0)
    # The generator reaches what it promises (and makes graphs onnxruntime runs).
    assert sum(o.category == "skipped" for o in outcomes) < 25
    families = collections.Counter(o.case.family for o in outcomes)
    assert set(families) == set(fuzz.FAMILIES) and min(families.values()) >= 30
    rewritten = collections.Counter(o.case.family for o in outcomes if o.rewrites)
    assert all(rewritten[family] >= families[family] // 3 for family in families), rewritten
    assert {o.case.dtype for o in outcomes} == {"float32", "float16"}
    assert {o.case.target for o in outcomes} == {"onnx", "onnxruntime"}
    assert {o.case.opset for o in outcomes} == set(range(13, 24))


def test_a_wrong_graph_is_a_violation(monkeypatch) -> None:
    """The judge is not blind: a pass result with its weights scaled by 1.5 is a wrong output."""
    case = next(o.case for o in fuzz.run(30, seed=1) if o.category == "ok" and o.case.family == "fold-affine")
    optimize = normfold.optimize

    def corrupt(model, **kwargs):
        result = optimize(model, **kwargs)
        for value in result.model.graph.initializers.values():
            if value.const_value.dtype.is_floating_point():
                value.const_value = ir.tensor(value.const_value.numpy() * 1.5, name=value.name)
        return result

    monkeypatch.setattr(normfold, "optimize", corrupt)
    assert fuzz.judge(case).category == "wrong-output"
