"""The optimize summary a person reads at a glance, and ``--example`` listing the zoo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normfold.cli import main
from normfold.report import format_passes_table
from tests.test_fuse_gaps import _residual_bias_ln


def test_summary_shows_interface_size_ops_time_and_kept_sites_apart(tmp_path: Path, capsys) -> None:
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_residual_bias_ln(bias_first=False, sum_read=False), source)
    assert main(["optimize", str(source), "-o", str(out), "--target", "onnxruntime", "--report", str(report),
                 "-q"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[1] == "in      a: float[batch,seq,8], b: float[batch,seq,8]"
    assert lines[2] == "out     y: float[batch,seq,8]"
    assert "weights 96 B -> 96 B" in lines[3] and lines[3].rstrip().endswith(" s")
    assert lines[4] == "ops     unchanged"
    kept = [line for line in lines if "kept 1 site by design:" in line]
    assert len(kept) == 1 and "SkipLayerNormalization measured" in kept[0]
    assert not any(": left " in line for line in lines)
    refusal = json.loads(report.read_text())["passes"][-1]["refused"][0]
    assert refusal["by_design"] is True and not refusal["reason"].startswith("by design")


def test_long_refusal_lists_are_capped_with_a_count_and_the_json_keeps_all() -> None:
    refused = [{"node": f"n{k}", "reason": "shape unknown"} for k in range(20)]
    refused += [{"node": f"s{k}", "reason": "slower", "by_design": True} for k in range(5)]
    text = format_passes_table([{"name": "fuse-norm", "applied": 0, "refused": refused}])
    assert sum(": left n" in line for line in text.splitlines()) == 8
    assert "fuse-norm: and 12 more refusals (see --report)" in text
    assert "fuse-norm: kept 5 sites by design: slower" in text
    assert text.splitlines()[2].split()[:4] == ["fuse-norm", "0", "20", "5"]


def test_op_changes_and_changed_interface_are_shown(tmp_path: Path, capsys) -> None:
    """BN parameters listed as graph inputs: --freeze-initializer-inputs drops them (before -> after)."""
    rng = np.random.default_rng(0)
    params = {name: rng.uniform(0.5, 1.5, 4).astype(np.float32) for name in ("g", "b", "m", "v")}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in params],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")]
        + [numpy_helper.from_array(value, name) for name, value in params.items()],
    )
    source = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), source)
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--freeze-initializer-inputs", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("in      x: float[1,3,4,4], g: float[4]") and lines[1].endswith("->  x: float[1,3,4,4]")
    assert lines[4] == "ops     BatchNormalization 1 -> 0"


def test_example_without_a_value_lists_the_zoo(capsys) -> None:
    for argv in (["optimize", "--example"], ["optimize", "--example", "list"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "resnet" in out and "ts13-keepbn" in out and "NAME[:VARIANT]" in out


def test_example_takes_a_variant(tmp_path: Path, capsys) -> None:
    assert main(["optimize", "--example", "resnet:nosuch", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "unknown export variant 'nosuch'" in capsys.readouterr().err


def _many_refusals(path: Path, count: int = 11) -> None:
    """``count`` LayerNorms, each after an Add of a [1, 1, 8] constant: no Skip op can take it."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "a"
    for i in range(count):
        inits += [numpy_helper.from_array(rng.normal(size=(1, 1, 8)).astype(np.float32), f"p{i}"),
                  numpy_helper.from_array(np.ones(8, np.float32), f"g{i}"),
                  numpy_helper.from_array(np.zeros(8, np.float32), f"b{i}")]
        nodes += [helper.make_node("Add", [current, f"p{i}"], [f"s{i}"], name=f"add{i}"),
                  helper.make_node("LayerNormalization", [f"s{i}", f"g{i}", f"b{i}"], [f"n{i}"], name=f"ln{i}")]
        current = f"n{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_long_refusal_list_is_capped_in_the_table_and_whole_in_the_json(tmp_path: Path, capsys) -> None:
    source, report = tmp_path / "many.onnx", tmp_path / "r.json"
    _many_refusals(source)
    flags = ["--target", "onnxruntime"]
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), *flags, "--report", str(report), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("  fuse-norm: left ln") for line in lines) == 8
    assert "  fuse-norm: and 3 more refusals (see --report)" in lines
    refused = json.loads(report.read_text())["passes"][-1]["refused"]
    assert sorted(r["node"] for r in refused) == sorted(f"ln{i}" for i in range(11))
    # inspect writes its JSON with --json, and says so.
    assert main(["inspect", str(source), *flags]) == 0
    text = capsys.readouterr().out
    assert "fuse-norm: and 3 more refusals (see --json)" in text and "(see --report)" not in text
    assert main(["inspect", str(source), *flags, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["passes"][-1]["refused"]) == 11


def test_example_names_a_variant_and_an_empty_one_is_refused(tmp_path: Path, capsys) -> None:
    import pytest

    pytest.importorskip("torch")
    assert main(["optimize", "--example", "resnet:", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "unknown export variant ''" in capsys.readouterr().err
    out = tmp_path / "r.onnx"
    assert main(["optimize", "--example", "resnet:ts13-keepbn", "-o", str(out), "--no-verify", "-q"]) == 0
    assert "resnet-ts13-keepbn-" in capsys.readouterr().out.splitlines()[0] and out.exists()


def test_a_long_signature_is_capped_and_the_json_keeps_it(tmp_path: Path, capsys) -> None:
    """Ten inputs (a decoder with its KV cache has dozens): six named, then the count."""
    names = [f"past_{k}" for k in range(10)]
    graph = helper.make_graph(
        [helper.make_node("Sum", names, ["y"], name="sum")], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4]) for name in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    source, report = tmp_path / "in.onnx", tmp_path / "r.json"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line == "in      " + ", ".join(f"past_{k}: float[batch,4]" for k in range(6)) + ", and 4 more"
    assert list(json.loads(report.read_text())["signature_after"]["inputs"]) == names


def test_inspect_previews_the_rewrite_flags_of_optimize(tmp_path: Path, capsys) -> None:
    """A site kept by design becomes a rewrite under --skip-ops, and the heading says so."""
    source = tmp_path / "in.onnx"
    onnx.save(_residual_bias_ln(bias_first=False, sum_read=False), source)
    assert main(["inspect", str(source), "--target", "onnxruntime"]) == 0
    plain = capsys.readouterr().out
    assert "fuse-norm: kept 1 site by design" in plain
    assert main(["inspect", str(source), "--target", "onnxruntime", "--skip-ops", "--max-opset", "17"]) == 0
    text = capsys.readouterr().out
    assert "what `normfold optimize --target onnxruntime --skip-ops --max-opset 17` would do (nodes 3 -> 1" in text
    assert "fuse-norm: would rewrite ln into SkipLayerNormalization" in text
    assert main(["inspect", str(source), "--skip-ops"]) == 2
    assert "needs --target onnxruntime" in capsys.readouterr().err
