"""The trap benchmark's models build, and normfold gets every trap right on both targets.

Each trap's model goes through ``normfold.optimize`` (no verification inside, so the test's
own judgement decides) and is judged the way the benchmark judges every tool: onnxruntime with
optimizations off on the trap's exposing inputs, the interface compared by name and type, and
``onnx.checker`` on the output. The other tools are not run here (they belong to the benchmark).

The normalization-op benchmark (``benchmarks.norm_ops``) runs at small sizes: every spelling of
every case loads, runs and computes what the case's first spelling computes; no speed asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import normfold
from benchmarks import norm_ops
from benchmarks.traps import TRAPS, judge


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
@pytest.mark.parametrize("trap", TRAPS, ids=[trap.name for trap in TRAPS])
def test_normfold_gets_the_trap_right(trap, target: str, tmp_path: Path) -> None:
    model, feeds = trap.make()
    source, out = tmp_path / "trap.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    normfold.optimize(source, target=target, verify=False).save(out)
    verdict = judge(source, out, feeds)
    assert verdict.status in ("ok", "kept"), f"{trap.name}: {verdict.status}: {verdict.detail}"
    assert verdict.checker, f"{trap.name}: the output fails onnx.checker"


def test_a_wrong_candidate_is_caught(tmp_path: Path) -> None:
    # The judge must be able to fail: drop the eps of the BERT trap by hand.
    trap = next(t for t in TRAPS if t.name == "ln-eps-1e-12@14")
    model, feeds = trap.make()
    source, out = tmp_path / "trap.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    eps = next(t for t in model.graph.initializer if t.name.startswith("eps"))
    eps.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(eps)), eps.name))
    onnx.save(model, out)
    verdict = judge(source, out, feeds)
    assert verdict.status == "WRONG" and verdict.nan


def test_a_dropped_initializer_input_is_an_interface_change(tmp_path: Path) -> None:
    trap = next(t for t in TRAPS if t.name.startswith("bn-params-inputs"))
    model, feeds = trap.make()
    source, out = tmp_path / "trap.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    del model.graph.input[1:]
    onnx.save(model, out)
    assert judge(source, out, feeds).status == "iface"


def test_norm_ops_times_every_spelling_and_they_agree(tmp_path: Path, capsys) -> None:
    out = tmp_path / "norm_ops.json"
    argv = ["--sizes", "small", "--runs", "1", "--warmup", "0", "--threads", "1", "--block-ms", "2", "--json", str(out)]
    assert norm_ops.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    for case in norm_ops.CASES.values():
        assert any(line.startswith(f"{case.name} ") for line in printed.splitlines()), case.name
        for spelling in case.spellings:
            mine = [r for r in rows if r["case"] == case.name and r["spelling"] == spelling.name]
            assert [(r["opt"], r["threads"]) for r in mine] == [("off", 1), ("on", 1)], (case.name, spelling.name)
            for row in mine:
                assert row["error"] is None, (case.name, spelling.name, row["error"])
                assert row["median_us"] > 0 and row["vs_first"] > 0
                assert row["max_rel"] < 1e-4, (case.name, spelling.name, row["max_rel"])


def test_norm_ops_lists_a_failing_or_disagreeing_spelling() -> None:
    # The check must be able to fail: a spelling onnxruntime cannot run, one that computes
    # something else.
    rms = norm_ops.CASES["rmsnorm"]
    case = norm_ops.Case("broken", ("x",), rms.sizes, (
        rms.spellings[0],
        norm_ops.Spelling("times-two", 17, lambda g, size: g.op("Mul", "x", g.const(2.0))),
        norm_ops.Spelling("unknown-op", 17, lambda g, size: g.op("NoSuchNormalization", "x")),
    ))
    size = case.sizes["small"]
    results = norm_ops.measure([(case, size)], threads=(1,), runs=1, warmup=0, block_ms=1)
    rows = {(r.spelling, r.opt): r for r in results["broken"]}
    assert rows["times-two", "off"].max_rel > 0.1 and rows["times-two", "off"].error is None
    assert "NoSuchNormalization" in rows["unknown-op", "off"].error
    assert not rows["unknown-op", "on"].times_us
    assert "fails: " in norm_ops.table(results, {"broken": size})


@pytest.mark.slow
def test_the_collapse_benchmark_runs_every_method_on_a_small_task(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from benchmarks import collapse as bench

    out = tmp_path / "collapse.json"
    assert bench.main(["--tasks", "digits/resnet18", "--seeds", "0", "--epochs", "1", "--finetune-epochs", "1",
                       "--max-steps", "1", "--repeats", "3", "--json", str(out), "--plot",
                       str(tmp_path / "collapse.png")]) == 0
    result = json.loads(out.read_text())["digits/resnet18"]["0"]
    for method in bench.METHODS:
        for step in result[method]["steps"]:
            timing = step["ort"]
            assert timing["rounds"] == 3 and timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"]
    # DepthShrinker's fixed choice: the inner ReLU of each of the 8 BasicBlocks, merged
    (shrunk,) = result["depthshrinker"]["steps"]
    assert shrunk["removed"] == 8 and shrunk["layers_merged"] >= 8
    assert shrunk["blocks"] == {"blocks": 8, "one_conv": 8, "none": 0}  # each block now one conv
    assert shrunk["max_merge_error"] <= 1e-10
    for method in bench.METHODS:
        for step in result[method]["steps"]:  # the ONNX export matches the module (ORT, optimizations off)
            assert step["onnx_check"]["max_rel"] <= 1e-4 and step["onnx_check"]["argmax_agreement"] == 1.0
    (reference,) = result["reference"]["steps"] or [{"blocks": {"blocks": 8, "one_conv": 0, "none": 0}}]
    assert reference["blocks"]["one_conv"] == 0  # identity replacement merges nothing
    for method in ("normfold", "random", "entropy"):  # why each collapse run ended, its undone steps listed
        assert result[method]["stopped"] and isinstance(result[method]["undone"], list)


def test_the_speed_benchmark_times_whole_commands_and_compares_with_the_peer(tmp_path: Path) -> None:
    from benchmarks import speed
    from tests.conftest import conv_bn_relu_model

    source = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_relu_model(), source)
    folder = tmp_path / "out"
    folder.mkdir()
    tools = ["normfold --no-verify", "normfold"]
    results = speed.measure({"conv": source}, 1, tools, folder)
    summary = speed.summarize(results)
    for tool in tools:
        row = summary["conv"][tool]
        assert "error" not in row, row
        assert row["median_s"] > 0 and row["peak_rss_mb"] > 10
        assert "ratio" not in row  # its peer was not run
    assert list(folder.iterdir()) == []  # each output is removed after its run
    table = speed.table(summary, 1)
    assert "normfold --no-verify" in table and "median of 1 runs" in table


def test_the_scale_benchmark_moves_weights_out_and_reports_each_tool_its_own_peak(tmp_path: Path) -> None:
    import argparse

    import numpy as np

    from benchmarks import scale
    from normfold import io, runtime
    from tests.conftest import conv_bn_relu_model

    source = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_relu_model(), source)
    args = argparse.Namespace(memory_limit_gb=4.0, timeout=120.0)
    copy = scale.with_external_data(source, tmp_path, args)
    assert io.external_data_files(io.load(copy)) == {(tmp_path / (copy.name + ".data")).resolve()}
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(runtime.run(copy, {"x": x})["y"], runtime.run(source, {"x": x})["y"])
    # This process holds 400 MB more than a tool needs: a child's wait4 peak would show it.
    ballast = np.ones(100_000_000, dtype=np.float32)
    row = scale.ToolRow("conv", "onnx-ir")
    assert scale.run_tool(row, copy, tmp_path / "out.onnx", args), row.detail
    assert len(row.seconds) == 1
    assert 10 < row.peak_rss_mb < ballast.nbytes / 2**20
    assert row.files == 2  # OUT and OUT.data


def test_the_scale_benchmark_runs_the_tools_round_robin(tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    from benchmarks import scale
    from tests.conftest import conv_bn_relu_model

    source = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_relu_model(), source)
    monkeypatch.setitem(scale.LARGE_MODELS, "conv", scale.LargeModel("conv", {}, 1))
    args = argparse.Namespace(memory_limit_gb=4.0, timeout=120.0, repeat=2, no_latency=True)
    rows = scale.bench_model("conv", source, ["onnx-ir", "normfold"], tmp_path, args)
    assert [(r.tool, r.status, len(r.seconds)) for r in rows] == [("onnx-ir", "ok", 2), ("normfold", "ok", 2)]
    order = [line.split()[1] for line in capsys.readouterr().err.splitlines() if line.startswith("conv")]
    assert order == ["onnx-ir", "normfold", "onnx-ir", "normfold"]
    assert not list(tmp_path.glob("conv-*"))  # each output removed after its run


def test_the_timm_benchmark_counts_multi_branch_sums() -> None:
    """Its ``sums`` column: a RepVGG block is one sum of branches of x, none once merged; a
    residual around a Conv of another tensor is none."""
    import numpy as np
    import onnx_ir as ir

    from benchmarks.timm_reparam import branch_sums
    from normfold import io
    from normfold.passes.fold_branches import FoldBranchesPass
    from tests.test_fold_branches import block_model, conv, repvgg_block

    block = io.load(block_model(*repvgg_block(np.random.default_rng(0))))
    assert branch_sums(block) == 1
    FoldBranchesPass()(block)
    assert branch_sums(block) == 0
    nodes, inits = conv("x", "a", np.random.default_rng(1), (3, 3), name="c")
    other, other_inits = conv("a", "b", np.random.default_rng(2), (3, 3), name="d")
    residual = nodes + other + [onnx.helper.make_node("Add", ["b", "x"], ["y"], name="add")]
    assert branch_sums(ir.from_proto(block_model(residual, inits + other_inits))) == 0


@pytest.mark.slow
def test_real_timm_models_are_reparameterized_like_timm_does(tmp_path: Path) -> None:
    """timm's RepVGG, MobileOne, LeViT, FastViT and RepGhost, exported with TorchScript and
    dynamo: every BN folded, every multi-branch block one Conv (as many Convs as timm's own
    ``reparameterize_model`` leaves), verified in onnxruntime with optimizations off."""
    from benchmarks import timm_reparam, torchvision_schemas

    torchvision_schemas.define()  # before timm imports torchvision
    pytest.importorskip("timm")

    models = {name: size for name, size in timm_reparam.DEFAULT_MODELS.items() if name != "mobileone_s1"}
    rows = timm_reparam.run(models, ("ts17-nofold", "dynamo18"), tmp_path, progress=False)
    assert len(rows) == 2 * len(models)
    for row in rows:
        assert row.failures == [], (row.model, row.variant, row.failures)
        assert row.bn[1] == 0, (row.model, row.variant, row.refused)
        assert row.convs == row.timm_convs, (row.model, row.variant)


@pytest.mark.parametrize(("pick", "expected"), [("_4_conv_2+_4_conv_5", (1, 0)), ("prune add", (0, 1))],
                         ids=["merged", "pruned"])
def test_block_counts_tell_a_block_merged_into_one_conv_from_a_pruned_one(pick, expected):
    from benchmarks import collapse as bench
    from tests.test_collapse_segments import _run, _small_mbv2

    model = _small_mbv2()  # three inverted residuals with expansion, one with a residual (block 3)
    result = _run(model, max_steps=1, rank=lambda gm, labels: next(label for label in labels if pick in label))
    (step,) = result.history
    counts = bench.block_counts(model, step.model, step.merges)
    assert (counts["blocks"], counts["one_conv"], counts["none"]) == (3, *expected)
    assert bench.block_counts(model, model, []) == {"blocks": 3, "one_conv": 0, "none": 0}
