"""``normfold collapse IN.onnx --target-latency R``: candidates costed whole-model, chosen jointly.

Numbers through onnxruntime with optimizations off; choices checked in MACs mode (deterministic),
latency mode checked for what a timing can promise (median and IQR, cache, predicted = dense −
chosen savings) with few runs so the default suite stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold import runtime
from normfold.jobs import collapse as collapse_job
from normfold.jobs.collapse import collapse_onnx
from normfold.math.collapse_scores import channel_plan
from normfold.passes import collapse as collapse_pass
from tests.conftest import Cli
from tests.test_collapse_pass import _feeds, _tlc_model

FAST = {"latency_runs": 3, "latency_repeats": 3}
# The DP's mechanics, without the default output bound (0.01) that would keep most removals out.
UNBOUNDED = {"max_deviation": float("inf")}


def _bn(name: str, source: str, beta: np.ndarray, gamma: np.ndarray) -> tuple[onnx.NodeProto, list]:
    channels = beta.size
    tensors = [
        numpy_helper.from_array(gamma.astype(np.float32), f"{name}_gamma"),
        numpy_helper.from_array(beta.astype(np.float32), f"{name}_beta"),
        numpy_helper.from_array(np.zeros(channels, np.float32), f"{name}_mean"),
        numpy_helper.from_array(np.ones(channels, np.float32), f"{name}_var"),
    ]
    node = helper.make_node("BatchNormalization", [source] + [t.name for t in tensors], [f"{name}_out"],
                            name=name, epsilon=1e-5)
    return node, tensors


def _model(nodes: list, tensors: list, channels: int, size: int, classes: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "budget", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])], tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _inverted_residual(seed: int = 0, channels: int = 8, expand: int = 6) -> onnx.ModelProto:
    """x → 1×1 expand → BN → ReLU6 → 3×3 depthwise → BN → ReLU6 → 1×1 project → BN → + x → GAP → Gemm."""
    rng = np.random.default_rng(seed)
    hidden = channels * expand
    tensors = [
        numpy_helper.from_array(rng.normal(size=(hidden, channels, 1, 1)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.normal(size=(hidden, 1, 3, 3)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.normal(size=(channels, hidden, 1, 1)).astype(np.float32) * 0.3, "w3"),
        numpy_helper.from_array(rng.normal(size=(10, channels)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.float32(0.0), "low"), numpy_helper.from_array(np.float32(6.0), "high"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="expand")]
    for name, source, beta, gamma in (("bn1", "a", 2.0, 0.5), ("bn2", "b", 2.0, 0.5)):
        bn, extra = _bn(name, source, np.full(hidden, beta), np.full(hidden, gamma))
        nodes.append(bn)
        tensors += extra
        clip = "clip1" if name == "bn1" else "clip2"
        nodes.append(helper.make_node("Clip", [f"{name}_out", "low", "high"], [f"{clip}_out"], name=clip))
        if name == "bn1":
            nodes.append(helper.make_node("Conv", ["clip1_out", "w2"], ["b"], name="depthwise", group=hidden,
                                          pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Conv", ["clip2_out", "w3"], ["c"], name="project"))
    bn, extra = _bn("bn3", "c", np.zeros(channels), np.ones(channels))
    nodes.append(bn)
    tensors += extra
    nodes += [
        helper.make_node("Add", ["bn3_out", "x"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="classifier", transB=1),
    ]
    return _model(nodes, tensors, channels, 8, 10)


def _chain(seed: int, widths: list[int], kernels: list[int], shifts: list[float]) -> onnx.ModelProto:
    """Unpadded Conv → BN → ReLU layers (so every merge is exact), then GAP → Gemm."""
    rng = np.random.default_rng(seed)
    nodes, tensors, source = [], [], "x"
    for k, (width, kernel, shift) in enumerate(zip(widths[1:], kernels, shifts)):
        weight = rng.normal(size=(width, widths[k], kernel, kernel)).astype(np.float32) * 0.5
        tensors.append(numpy_helper.from_array(weight, f"w{k}"))
        nodes.append(helper.make_node("Conv", [source, f"w{k}"], [f"c{k}"], name=f"conv{k}"))
        # β = shift·|γ| per channel, jittered: scores from near 0 (|shift| large) to 0.5 (shift 0).
        gamma = rng.uniform(0.5, 1.5, width)
        bn, extra = _bn(f"bn{k}", f"c{k}", (shift + rng.normal(size=width) * 0.2) * gamma, gamma)
        nodes.append(bn)
        tensors += extra
        nodes.append(helper.make_node("Relu", [f"bn{k}_out"], [f"r{k}"], name=f"relu{k}"))
        source = f"r{k}"
    tensors.append(numpy_helper.from_array(rng.normal(size=(3, widths[-1])).astype(np.float32), "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="classifier", transB=1),
    ]
    return _model(nodes, tensors, widths[0], 9, 3)


def _linearized(model: onnx.ModelProto, sites: list[str]) -> onnx.ModelProto:
    """``model`` with each Relu in ``sites`` replaced by its TLC channel plan as Mul/Add (BN mode), unmerged."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name not in sites:
            nodes.append(node)
            continue
        bn = next(n for n in model.graph.node if n.output[0] == node.input[0])
        plan = channel_plan("relu", weights[bn.input[2]], weights[bn.input[1]])
        for suffix, values in (("slope", plan.slope), ("offset", plan.offset)):
            model.graph.initializer.append(
                numpy_helper.from_array(values.reshape(-1, 1, 1).astype(np.float32), f"{node.name}_{suffix}"))
        nodes += [helper.make_node("Mul", [node.input[0], f"{node.name}_slope"], [f"{node.name}_m"]),
                  helper.make_node("Add", [f"{node.name}_m", f"{node.name}_offset"], [node.output[0]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _layers(model) -> int:
    return sum(1 for node in model.graph if node.op_type in ("Conv", "Gemm"))


def _chosen_runs_are_apart(selection: dict) -> None:
    """No two chosen runs share or touch a site (the fixtures here have no fan-out between sites)."""
    runs = [o["sites"] for o in selection["options"] if o.get("chosen")]
    sites = [s for run in runs for s in run]
    assert len(sites) == len(set(sites))


def test_the_two_activations_of_an_inverted_residual_go_together():
    job = collapse_onnx(_inverted_residual(), target_latency=0.7, measure_latency=False, **UNBOUNDED)
    summary, cost = job.report["collapse"], job.report["cost"]
    assert summary["chosen"] == ["clip1+clip2"] and summary["feasible"]
    options = {"+".join(o["sites"]): o for o in summary["options"]}
    # Each alone merges a 1×1 conv into the depthwise one: dense, the work grows.
    for alone in ("clip1", "clip2"):
        assert options[alone]["saving"] < 0 and "costs no fewer MACs" in options[alone]["refused"]
    assert options["clip1+clip2"]["saving"] > 0
    # Refused alone, removed together: not reported as refused.
    assert not {r["node"] for r in summary["refused"]} & {"clip1", "clip2"}
    assert _layers(job.model) == 1  # one conv: the block, its shortcut and the classifier
    assert cost["output"]["macs"] == cost["predicted"]["macs"] <= 0.7 * cost["dense"]["macs"]
    assert cost["output"]["latency"] is None  # --no-measure-latency: nothing timed


def test_macs_are_counted_from_the_shapes():
    # conv_a: 8 out × 8×8 positions × 3·3·3; conv_b: 4 × 6×6 × 8·3·3; the Gemms 3·4 and 3·3.
    expected = 8 * 64 * 27 + 4 * 36 * 72 + 12 + 9
    job = collapse_onnx(_tlc_model(), target_latency=1.0, measure_latency=False)
    assert job.report["cost"]["input"]["macs"] == job.report["cost"]["dense"]["macs"] == expected
    assert job.report["collapse"]["chosen"] == [] and job.report["collapse"]["feasible"]  # R = 1: nothing needed


def test_the_deviation_bound_refuses_what_the_budget_would_take(tmp_path: Path):
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **_feeds(1)[0])
    free = collapse_onnx(_tlc_model(), target_latency=0.4, measure_latency=False, calibration=calibration,
                         **UNBOUNDED)
    assert free.report["collapse"]["feasible"]
    assert "relu_b" in free.report["collapse"]["sites"]  # the budget needs relu_b, far from linear
    bound = collapse_onnx(_tlc_model(), target_latency=0.4, measure_latency=False, calibration=calibration,
                          max_deviation=0.01)
    summary = bound.report["collapse"]
    assert not summary["feasible"] and "relu_b" not in summary["sites"] and "relu_a" in summary["sites"]
    for option in summary["options"]:
        # With calibration data the loss is the measured deviation of the candidate alone.
        assert option["loss"] == option["deviation"]
        if "relu_b" in option["sites"]:
            assert "deviation would be" in option["refused"]
    assert bound.report["verification"]["max_rel_error"] <= 0.01
    assert any("not reached" in note for p in bound.report["passes"] for note in p.get("notes", []))


def test_a_budget_keeps_the_default_output_bound():
    # Without --max-deviation the budget is met only within 0.01: relu_b, far from linear, stays.
    job = collapse_onnx(_tlc_model(), target_latency=0.4, measure_latency=False)
    summary = job.report["collapse"]
    assert job.report["collapse"]["max_deviation"] == 0.01
    assert "relu_b" not in summary["sites"] and not summary["feasible"]
    assert any("relu_b" in option["sites"] and "deviation would be" in option.get("refused", "")
               for option in summary["options"])
    assert job.report["verification"]["max_rel_error"] <= 0.01


def test_latency_budget_reports_median_and_spread_and_predicts_from_savings():
    job = collapse_onnx(_tlc_model(), target_latency=0.8, **FAST, **UNBOUNDED)
    cost, summary = job.report["cost"], job.report["collapse"]
    for key in ("input", "dense", "output"):
        timing = cost[key]["latency"]
        assert timing["rounds"] == 3 and timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"]
        assert timing["iqr_ms"] == pytest.approx(timing["q3_ms"] - timing["q1_ms"])
    chosen = [o for o in summary["options"] if o.get("chosen")]
    assert [("+".join(o["sites"])) for o in chosen] == summary["chosen"]
    steps = {step["step"]: step for step in summary["steps"]}
    for option in summary["options"]:
        # Refused: no saving beyond the spread of its timings (there is no deviation bound here).
        spread = max(steps[option["step"]]["base_latency"]["iqr_ms"], option["latency"]["iqr_ms"])
        assert ("refused" in option) == (option["saving"] <= spread), option
    # The pass timed the dense model; the job's dense row is the same model from the cache.
    assert summary["steps"][0]["base_cost"] == cost["dense"]["latency"]["median_ms"]
    predicted = cost["dense"]["latency"]["median_ms"]
    for step in summary["steps"]:
        savings = sum(o["saving"] for o in chosen if o["step"] == step["step"])
        if step["chosen"] and "undone" not in step:
            assert step["predicted_cost"] == pytest.approx(step["base_cost"] - savings)
            predicted = step["predicted_cost"]
    assert cost["predicted"]["latency_ms"] == pytest.approx(predicted)
    assert cost["settings"]["models_timed"] <= len(summary["options"]) + 3
    _chosen_runs_are_apart(summary)
    assert len(summary["sites"]) == job.report["collapse"]["removed"]
    # Each step costs its candidates on top of the steps before; a kept step measured faster.
    for before, step in zip(summary["steps"], summary["steps"][1:]):
        assert step["base_cost"] == before["measured_cost"]
    for step in summary["steps"]:
        if "measured_cost" in step and "undone" not in step:
            assert step["measured_cost"] < step["base_cost"]


def test_the_deviation_is_measured_once(monkeypatch: pytest.MonkeyPatch):
    calls = {"selection": 0, "verify": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(collapse_pass, "_deviation", counting("selection", collapse_pass._deviation))
    monkeypatch.setattr(collapse_job, "verify", counting("verify", collapse_job.verify))
    for settings_ in ({"remove": 2}, {"target_latency": 0.8, "measure_latency": False, **UNBOUNDED}):
        calls.update(selection=0, verify=0)
        collapse_onnx(_tlc_model(), **settings_)
        assert calls == {"selection": 0, "verify": 1}, settings_


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    depth=st.integers(2, 4),
    target=st.floats(0.2, 1.0),
    data=st.data(),
)
def test_joint_choices_meet_the_macs_budget_and_merge_exactly(seed, depth, target, data):
    widths = data.draw(st.lists(st.integers(2, 6), min_size=depth + 1, max_size=depth + 1))
    kernels = data.draw(st.lists(st.sampled_from([1, 3]), min_size=depth, max_size=depth))
    shifts = data.draw(st.lists(st.sampled_from([-4.0, 0.0, 4.0]), min_size=depth, max_size=depth))
    source = _chain(seed, widths, kernels, shifts)
    job = collapse_onnx(source, target_latency=target, measure_latency=False, **UNBOUNDED)
    cost, summary = job.report["cost"], job.report["collapse"]
    # Savings of runs apart from each other add up exactly in MACs: the prediction is the result.
    assert cost["output"]["macs"] == cost["predicted"]["macs"]
    assert all(step["measured_cost"] == step["predicted_cost"] for step in summary["steps"] if "measured_cost" in step)
    assert len(summary["steps"]) <= 3
    if summary["feasible"]:
        assert cost["output"]["macs"] <= target * cost["dense"]["macs"] + 1e-9
    _chosen_runs_are_apart(summary)
    # Every merge is exact: the result computes the linearized, unmerged network.
    linear = _linearized(source, summary["sites"])
    feed = {"x": np.random.default_rng(seed).normal(size=(2, widths[0], 9, 9)).astype(np.float32)}
    want = runtime.run(linear, feed)["y"]
    got = runtime.run(job.model, feed)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_activations_either_side_of_a_removed_run_are_one_segment_in_the_next_step():
    # Step 1 removes relu1+relu2; then relu0 and relu3 bound one segment: removing both is one
    # run whose saving is measured together, not two savings that would be added (found by hypothesis).
    job = collapse_onnx(_chain(0, [2, 2, 3, 3, 4], [3, 1, 3, 3], [-4.0] * 4), target_latency=0.5,
                        measure_latency=False, **UNBOUNDED)
    steps = job.report["collapse"]["steps"]
    assert steps[0]["chosen"] == ["relu1+relu2"] and steps[1]["chosen"] == ["relu0+relu3"]
    assert job.report["cost"]["output"]["macs"] == job.report["cost"]["predicted"]["macs"]


def test_cli_target_latency_writes_model_table_and_report(tmp_path: Path, cli: Cli):
    source = tmp_path / "in.onnx"
    onnx.save(_tlc_model(), source)
    done = cli("collapse", str(source), "-o", str(tmp_path / "out.onnx"), "--target-latency", "0.8",
               "--latency-runs", "3", "--latency-repeats", "3", "--report", str(tmp_path / "r.json"), "-q")
    assert done.returncode == 0, done.stderr
    for row in ("input", "dense, BN folded", "predicted", "output"):
        assert any(line.startswith(row) for line in done.stdout.splitlines()), row
    assert "(IQR " in done.stdout and "target 0.8 x the dense model (latency)" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["collapse"]["mode"] == "target_latency"
    assert report["cost"]["output"]["latency"]["rounds"] == 3
    assert onnx.load(tmp_path / "out.onnx").graph.node


@pytest.mark.parametrize("argv, message", [
    (["--target-latency", "0"], "ratio in (0, 1]"),
    (["--target-latency", "1.5"], "ratio in (0, 1]"),
    (["--target-latency", "0.8", "--remove", "1"], "either --remove or --target-latency"),
    (["--target-latency", "0.8", "--latency-repeats", "2"], "--latency-repeats >= 3"),
    (["--target-latency", "0.8", "--max-segment-sites", "0"], "--max-segment-sites"),
    (["--target-latency", "0.8", "--max-steps", "0"], "--max-steps"),
])
def test_cli_bad_budget_exits_2_and_writes_nothing(tmp_path: Path, cli: Cli, argv: list[str], message: str):
    source = tmp_path / "in.onnx"
    onnx.save(_tlc_model(), source)
    before = source.read_bytes()
    done = cli("collapse", str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
               *argv)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"] and source.read_bytes() == before


@pytest.mark.slow
def test_zoo_mobilenetv2_merges_whole_inverted_residuals_under_a_macs_budget():
    from normfold.models.export import cached_export

    job = collapse_onnx(cached_export("mobilenetv2"), target_latency=0.7, measure_latency=False, **UNBOUNDED)
    summary, cost = job.report["collapse"], job.report["cost"]
    assert summary["feasible"] and cost["output"]["macs"] <= 0.7 * cost["dense"]["macs"]
    assert cost["output"]["macs"] == cost["predicted"]["macs"]
    pairs = [label for label in summary["chosen"] if label.count("+") == 1
             and label.split("+")[0].split("/conv/")[0] == label.split("+")[1].split("/conv/")[0]]
    assert pairs, summary["chosen"]  # both activations of one block, which alone would grow the work
