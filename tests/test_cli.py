"""The command line as a user's shell and CI scripts see it: exit codes, one-line errors, files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold.errors import InputError
from tests.conftest import Cli, conv_bn_relu_model, run_cli


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_clean_failure(result, folder: Path, before: set[str], *, code: int, names: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert names in lines[0]
    assert {p.name for p in folder.iterdir()} == before, "something was written"


def _reshape_failing_model() -> onnx.ModelProto:
    """Valid for onnx.checker, but Reshape(x[batch, 4] -> [3, -1]) fails at run time for batch 2."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fails_at_run_time",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BAD_MODELS = {
    "not_onnx": lambda p: p.write_text("hello, I am a text file"),
    "truncated": lambda p: p.write_bytes(conv_bn_relu_model().SerializeToString()[:150]),
    "folder": lambda p: p.mkdir(),
    "checker": lambda p: onnx.save(_with(conv_bn_relu_model(), lambda m: m.graph.node[2].input.__setitem__(0, "nope")), p),
    "domain": lambda p: onnx.save(_with(conv_bn_relu_model(), _custom_domain), p),
    "fails_to_run": lambda p: onnx.save(_reshape_failing_model(), p),
}


def _with(model: onnx.ModelProto, change) -> onnx.ModelProto:
    change(model)
    return model


def _custom_domain(model: onnx.ModelProto) -> None:
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_optimize_bad_input_exits_2_and_writes_nothing(tmp_path: Path, kind: str, cli: Cli) -> None:
    path = tmp_path / "in.onnx"
    BAD_MODELS[kind](path)
    before = {p.name for p in tmp_path.iterdir()}
    result = cli("optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"))
    _assert_clean_failure(result, tmp_path, before, code=2, names=str(path))


def test_missing_input_file(tmp_path: Path, cli: Cli) -> None:
    result = cli("optimize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "out.onnx"))
    _assert_clean_failure(result, tmp_path, set(), code=2, names="absent.onnx")


def test_external_data_outside_folder_is_refused(tmp_path: Path, cli: Cli) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "in.onnx"
    onnx.save(conv_bn_relu_model(), path, save_as_external_data=True, location="in.data", size_threshold=0)
    shutil.move(folder / "in.data", tmp_path / "in.data")
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../in.data"
    onnx.save(model, path)
    before = {p.name for p in folder.iterdir()}
    result = cli("optimize", str(path), "-o", str(folder / "out.onnx"))
    _assert_clean_failure(result, folder, before, code=2, names="outside the model's folder")


def test_output_equal_to_input_is_refused(conv_bn_path: Path, cli: Cli) -> None:
    digest = _digest(conv_bn_path)
    result = cli("optimize", str(conv_bn_path), "-o", str(conv_bn_path))
    _assert_clean_failure(result, conv_bn_path.parent, {conv_bn_path.name}, code=2, names="refusing to overwrite")
    assert _digest(conv_bn_path) == digest


def test_unknown_pass_and_bad_dims_are_usage_errors(conv_bn_path: Path, cli: Cli) -> None:
    folder = conv_bn_path.parent
    out = str(folder / "out.onnx")
    result = cli("optimize", str(conv_bn_path), "-o", out, "--passes", "fold-everything")
    _assert_clean_failure(result, folder, {conv_bn_path.name}, code=2, names="unknown pass 'fold-everything'")
    for nothing in ("", " , "):  # a list naming no pass is a slip, not a request to run none
        result = cli("optimize", str(conv_bn_path), "-o", out, "--passes", nothing)
        _assert_clean_failure(result, folder, {conv_bn_path.name}, code=2, names="--passes names no pass")
    result = cli("optimize", str(conv_bn_path), "-o", out, "--dims", "batch:2")
    _assert_clean_failure(result, folder, {conv_bn_path.name}, code=2, names="--dims")


def test_optimize_refuses_the_approximate_pass_and_points_to_its_command(conv_bn_path: Path, cli: Cli) -> None:
    folder = conv_bn_path.parent
    result = cli("optimize", str(conv_bn_path), "-o", str(folder / "out.onnx"), "--passes", "fold-bn,collapse")
    _assert_clean_failure(result, folder, {conv_bn_path.name}, code=2, names="`normfold collapse`")
    with pytest.raises(InputError, match="normfold collapse"):
        normfold.optimize(conv_bn_path, passes=["collapse"])


def test_optimize_writes_model_and_report(conv_bn_path: Path, cli: Cli) -> None:
    folder = conv_bn_path.parent
    digest = _digest(conv_bn_path)
    out, report_path = folder / "out.onnx", folder / "report.json"
    result = cli("optimize", str(conv_bn_path), "-o", str(out), "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    assert _digest(conv_bn_path) == digest
    onnx.checker.check_model(onnx.load(out))
    report = json.loads(report_path.read_text())
    for key in ("input", "output", "target", "opset_before", "opset_after", "nodes_before", "nodes_after",
                "passes", "verification"):
        assert key in report, key
    assert report["verification"]["passed"] is True
    assert report["passes"][0]["name"] == "cleanup"
    assert {p.name for p in folder.iterdir()} == {"conv_bn.onnx", "out.onnx", "report.json"}


def test_verify_exit_codes(tmp_path: Path, conv_bn_path: Path, cli: Cli) -> None:
    same = cli("verify", str(conv_bn_path), str(conv_bn_path), "--report", str(tmp_path / "v.json"))
    assert same.returncode == 0, same.stderr
    assert "PASSED" in same.stdout
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True

    other = conv_bn_relu_model()
    other.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(other.graph.initializer[0]) * 1.01, other.graph.initializer[0].name)
    )
    onnx.save(other, tmp_path / "other.onnx")
    different = cli("verify", str(conv_bn_path), str(tmp_path / "other.onnx"))
    assert different.returncode == 1
    assert "FAILED" in different.stdout


def test_inspect_json_and_table(conv_bn_path: Path, cli: Cli) -> None:
    result = cli("inspect", str(conv_bn_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ops_before"] == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert [p["name"] for p in report["passes"]][0] == "cleanup"
    table = cli("inspect", str(conv_bn_path))
    assert table.returncode == 0 and "BatchNormalization 1" in table.stdout


def test_passes_lists_registry(cli: Cli) -> None:
    from normfold.passes import REGISTRY

    result = cli("passes")
    assert result.returncode == 0
    for name in REGISTRY:
        assert name in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("normfold")
    assert script.is_file(), "pip install should provide the `normfold` command"
    result = subprocess.run([str(script), "passes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "cleanup" in result.stdout


def test_missing_external_data_is_refused(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn_relu_model(), path, save_as_external_data=True, location="in.data", size_threshold=0)
    (tmp_path / "in.data").unlink()
    result = cli("optimize", str(path), "-o", str(tmp_path / "out.onnx"))
    _assert_clean_failure(result, tmp_path, {"in.onnx"}, code=2, names="missing external data")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "'y'"),
        ({"x": np.zeros((2, 3, 8), np.float32)}, "'x'"),
        ({"x": np.zeros((2, 3, 8, 9), np.float32)}, "'x'"),
        ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "'x'"),
    ],
    ids=["wrong-name", "wrong-rank", "wrong-dim", "wrong-dtype"],
)
def test_mismatched_inputs_file(tmp_path: Path, conv_bn_path: Path, arrays, message: str, cli: Cli) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **arrays)
    before = {p.name for p in tmp_path.iterdir()}
    result = cli("optimize", str(conv_bn_path), "-o", str(tmp_path / "out.onnx"), "--inputs", str(npz))
    _assert_clean_failure(result, tmp_path, before, code=2, names=message)
    result = cli("verify", str(conv_bn_path), str(conv_bn_path), "--inputs", str(npz))
    _assert_clean_failure(result, tmp_path, before, code=2, names="inputs.npz")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("optimize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "o.onnx"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
