"""Large models: weights stay memory-mapped, big outputs get external data, progress and --quiet.

The billion-parameter numbers are in ``benchmarks/scale.py``; here small models with the same
layout (every tensor in one external data file) check the mechanisms: no weight that no pass
rewrites is ever read (neither by load, the passes, the checker nor the sessions of
verification), a result over the size threshold (lowered for the test) is written with one
data file, and progress shows on a terminal unless ``--quiet``.
"""

from __future__ import annotations

import io as _io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold import io, progress, runtime
from normfold.jobs import common
from normfold.cli import main as cli_main

HIDDEN = 64
WEIGHTS = ("w_in", "w_out")


def _decoder_block() -> onnx.ModelProto:
    """x -> MatMul(w_in) -> HF-style RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul) ->
    MatMul(w_out), opset 18: weights no exact pass has a reason to change."""
    rng = np.random.default_rng(0)
    tensors = {
        "w_in": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
        "w_out": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, size=HIDDEN).astype(np.float32),
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "axes": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"], name="up"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="mean", keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Reciprocal", ["std"], ["inv"], name="inv"),
        helper.make_node("Mul", ["h", "inv"], ["normed"], name="scale"),
        helper.make_node("Mul", ["gamma", "normed"], ["n"], name="gamma_mul"),
        helper.make_node("MatMul", ["n", "w_out"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [numpy_helper.from_array(value, name) for name, value in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.fixture
def external_path(tmp_path: Path) -> Path:
    """The decoder block with its weights (tensors over 1 kB, as exporters do) in ``model.data``."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(_decoder_block(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.data", size_threshold=1024)
    return path


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of the external tensors whose data gets read (memory-mapped) from now on."""
    names: list[str] = []
    load = ir.ExternalTensor._load  # the one place an ExternalTensor maps its file

    def counting_load(self):
        names.append(self.name)
        return load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", counting_load)
    return names


def test_load_passes_check_and_verification_read_no_weight(external_path: Path, reads: list[str]) -> None:
    result = normfold.optimize(external_path)  # all default passes, onnx.checker, verification
    assert result.verified, result.verification.format_table()
    assert not set(WEIGHTS) & set(reads), f"read: {sorted(reads)}"
    for name in WEIGHTS:
        assert isinstance(result.model.graph.initializers[name].const_value, ir.ExternalTensor)
    assert set(result.report["seconds"]) >= {"load", "cleanup", "check", "verify"}
    assert result.report["peak_rss_mb"]["verify"] > 0
    assert set(result.report["verification"]["peak_rss_mb"]) == {"inputs", "reference", "candidate"}


def test_a_session_of_a_loaded_model_reads_no_weight(external_path: Path, reads: list[str]) -> None:
    x = {"x": np.random.default_rng(1).normal(size=(2, 3, HIDDEN)).astype(np.float32)}
    expected = runtime.run(external_path, x)["y"]
    model = io.load(external_path)
    np.testing.assert_array_equal(runtime.run(model, x)["y"], expected)
    assert reads == []


def test_a_session_of_weights_in_two_folders_goes_through_a_file(external_path: Path, tmp_path: Path) -> None:
    x = {"x": np.random.default_rng(2).normal(size=(2, 3, HIDDEN)).astype(np.float32)}
    expected = runtime.run(external_path, x)["y"]
    model = io.load(external_path)
    other = tmp_path / "other"
    other.mkdir()
    weight = model.graph.initializers["w_out"].const_value
    weight.numpy().tofile(other / "w_out.bin")
    model.graph.initializers["w_out"].const_value = ir.ExternalTensor(
        "w_out.bin", 0, weight.nbytes, weight.dtype, shape=weight.shape, name="w_out", base_dir=other
    )
    np.testing.assert_array_equal(runtime.run(model, x)["y"], expected)


def test_weightless_proto_leaves_out_weights_and_leaves_the_model_alone(external_path: Path, reads: list[str]) -> None:
    model = io.load(external_path)
    initializers, inputs = list(model.graph.initializers), [v.name for v in model.graph.inputs]
    proto = io.weightless_proto(model)
    onnx.checker.check_model(proto)
    assert {t.name for t in proto.graph.initializer}.isdisjoint(WEIGHTS)
    assert {"x", *WEIGHTS} <= {v.name for v in proto.graph.input}
    assert list(model.graph.initializers) == initializers
    assert [v.name for v in model.graph.inputs] == inputs
    assert reads == []


def test_a_broken_result_with_external_data_still_fails_the_check(external_path: Path) -> None:
    model = io.load(external_path)
    node = next(n for n in model.graph if n.name == "down")
    node.replace_input_with(0, ir.Value(name="undefined"))
    with pytest.raises(RuntimeError, match="fails onnx.checker"):
        common.check_output(model, "block")


def test_a_large_result_is_written_with_one_data_file(external_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)  # the block holds 33 kB of tensors
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    written: list[int] = []
    result = normfold.optimize(external_path, verify=False)
    io.save(result.model, out, progress=written.append)
    # One data file, under a fresh name each save (OUT and its data switch together).
    data, model = sorted(p.name for p in out.parent.iterdir())
    assert model == "big.onnx" and data.startswith("big.nf-") and data.endswith(".data")
    assert sum(written) == io.tensor_bytes(result.model)
    assert onnx.load(out, load_external_data=False).ByteSize() < 10_000
    x = {"x": np.random.default_rng(3).normal(size=(1, 4, HIDDEN)).astype(np.float32)}
    np.testing.assert_allclose(runtime.run(out, x)["y"], runtime.run(external_path, x)["y"], rtol=1e-4, atol=1e-4)


def test_an_external_data_input_keeps_that_layout_named_or_not(external_path: Path, tmp_path: Path) -> None:
    result = normfold.optimize(external_path, verify=False)
    result.save(tmp_path / "one.onnx")
    result.save(tmp_path / "two.onnx", external_data="two.weights")
    names = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert {"one.onnx", "two.onnx"} < names and len(names) == 4
    one_data, two_data = sorted(names - {"one.onnx", "two.onnx"})
    assert one_data.startswith("one.nf-") and one_data.endswith(".data")  # OUT's stem by default
    assert two_data.startswith("two.nf-") and two_data.endswith(".weights")  # a fresh name each save
    assert result.report["seconds"]["save"] >= 0 and result.report["peak_rss_mb"]["save"] > 0


class _Terminal(_io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_on_a_terminal_unless_quiet(external_path: Path, tmp_path: Path, monkeypatch, capsys, quiet: bool) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)  # every step counts as slow
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["optimize", str(external_path), "-o", str(out), "--report", str(report)] + (["--quiet"] if quiet else [])
    assert cli_main(args) == 0
    shown = terminal.getvalue()
    if quiet:
        assert shown == ""
    else:
        for step in ("load", "cleanup", "check", "verify: reference", "verify: candidate", "save"):
            assert step in shown, shown
        assert f"/{len(json.loads(report.read_text())['seconds'])}]" in shown  # "[k/n] step"
    assert "wrote" in capsys.readouterr().out


def test_progress_is_off_when_stderr_is_no_terminal(capsys) -> None:
    steps = progress.Steps(["a"], enabled=True)
    with steps.step("a", total=10) as bar:
        bar.update(10)
    steps.close()
    assert capsys.readouterr().err == ""
    assert set(steps.seconds) == {"a"} and steps.peak_rss_mb["a"] > 0


def test_steps_add_up_and_keep_the_larger_peak() -> None:
    steps = progress.Steps(enabled=False)
    with steps.step("save"):
        pass
    first = steps.seconds["save"]
    with steps.step("save"):
        block = np.ones(8 << 20)  # 64 MB while the step runs
        inside = progress._current_rss_mb()
        # Below the process's high-water mark the step's peak is sampled: hold the block for
        # several sampling periods so the sampler sees it.
        time.sleep(10 * progress.SAMPLE_SECONDS)
        del block
    steps.close()
    assert list(steps.seconds) == ["save"] and steps.seconds["save"] > first
    assert steps.peak_rss_mb["save"] >= inside - 1


def test_raising_the_opset_below_18_reads_no_weight(tmp_path: Path, reads: list[str]) -> None:
    # onnx's converter runs on the weightless proto; the weights go back on the converted graph.
    from normfold.opset import model_opset, raise_opset

    proto = _decoder_block()
    mean = next(node for node in proto.graph.node if node.op_type == "ReduceMean")
    mean.CopyFrom(helper.make_node("ReduceMean", ["sq"], ["var"], name="mean", axes=[-1], keepdims=1))
    proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == "axes"))
    proto.opset_import[0].version = 13
    path = tmp_path / "block13.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="block13.data",
              size_threshold=1024)
    model = io.load(path)
    assert raise_opset(model, 23) and model_opset(model) == 23
    assert reads == []
    for name in WEIGHTS:
        assert isinstance(model.graph.initializers[name].const_value, ir.ExternalTensor)
    assert [v.name for v in model.graph.inputs] == ["x"]
    x = {"x": np.random.default_rng(3).normal(size=(2, 3, HIDDEN)).astype(np.float32)}
    np.testing.assert_array_equal(runtime.run(model, x)["y"], runtime.run(path, x)["y"])
