"""verify --localize: the first tensor the graphs share by name that differs, and where it comes from.

Every case corrupts one Conv weight of a folded model (the candidate) and checks that localize
names the first shared tensor downstream of that Conv, in the candidate's order, with the
nodes that produce it in each graph; and that a correct candidate reports no divergence.
Also here: --save-inputs, the error percentiles, --dims naming no dim of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import normfold
from normfold.cli import main


def _chain_model(stages: int = 4, channels: int = 4) -> onnx.ModelProto:
    """x -> (Conv 3x3 -> BatchNorm -> Relu) x stages, with a residual Add after stage 2."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(stages):
        cin = 3 if i == 0 else channels
        inits += [
            numpy_helper.from_array(rng.normal(size=(channels, cin, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"bias{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), f"gamma{i}"),
            numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"beta{i}"),
            numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"mean{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), f"var{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [current, f"w{i}", f"bias{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                             [f"b{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        current = f"r{i}"
        if i == 2:
            nodes.append(helper.make_node("Add", [current, "r1"], ["skip"], name="add"))
            current = "skip"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _corrupt(model: ir.Model, conv: ir.Node) -> None:
    weight = conv.inputs[1]
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor(-3 * array + 1, name=weight.name)


def _expected(model: ir.Model, reference: ir.Model, conv: ir.Node) -> str:
    """The first tensor in the candidate's order that both graphs produce and that depends on ``conv``."""
    produced = {value.name for node in reference.graph for value in node.outputs}
    tainted = {id(value) for value in conv.outputs}
    for node in model.graph:
        if node is not conv and not any(v is not None and id(v) in tainted for v in node.inputs):
            continue
        for value in node.outputs:
            tainted.add(id(value))
            if value.name in produced:
                return value.name
    raise AssertionError("nothing downstream is shared")


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    path = tmp_path / "chain.onnx"
    onnx.save(_chain_model(), path)
    return path


def test_a_correct_fold_has_no_divergence_and_no_key_without_localize(chain: Path) -> None:
    folded = normfold.optimize(chain, verify=False).model
    report = normfold.verify(chain, folded, localize=True)
    assert report.passed and report.first_divergence is None
    assert report.to_dict()["first_divergence"] is None
    assert "first_divergence" not in normfold.verify(chain, folded).to_dict()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_corrupted_conv_is_found_where_its_output_is_shared(chain: Path, stage: int) -> None:
    folded = normfold.optimize(chain, verify=False).model
    conv = next(n for n in folded.graph if n.op_type == "Conv" and n.outputs[0].name == f"b{stage}")
    _corrupt(folded, conv)
    report = normfold.verify(chain, folded, localize=True)
    assert not report.passed
    divergence = report.first_divergence
    # The folded Conv writes the BatchNorm's output name: that is the first shared tensor.
    assert divergence["tensor"] == f"b{stage}"
    assert divergence["reference_node"] == f"bn{stage}"
    assert divergence["candidate_node"] == conv.name
    assert divergence["max_abs_error"] > 1e-2 and divergence["max_rel_error"] > 1e-3


def test_cli_localize_prints_one_line_and_writes_the_key(chain: Path, tmp_path: Path, capsys) -> None:
    folded = normfold.optimize(chain, verify=False).model
    _corrupt(folded, next(n for n in folded.graph if n.op_type == "Conv" and n.outputs[0].name == "b2"))
    candidate = tmp_path / "cand.onnx"
    normfold.save(folded, candidate)
    report = tmp_path / "r.json"
    code = main(["verify", str(chain), str(candidate), "--localize", "--report", str(report), "-q"])
    out = capsys.readouterr().out
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("first divergence:")]
    assert len(lines) == 1 and "'b2'" in lines[0] and "'bn2'" in lines[0]
    data = json.loads(report.read_text())
    assert data["first_divergence"]["tensor"] == "b2"
    assert set(data["first_divergence"]) == {"tensor", "reference_node", "candidate_node", "max_abs_error",
                                             "max_rel_error"}


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_zoo_models_localize_any_corrupted_conv(data) -> None:
    pytest.importorskip("torch")
    from normfold.models.export import cached_export

    name = data.draw(st.sampled_from(["resnet", "mobilenetv2", "vgg"]))
    source = cached_export(name)
    reference = normfold.load(source)
    folded = normfold.optimize(source, verify=False).model
    convs = [n for n in folded.graph if n.op_type == "Conv"]
    conv = convs[data.draw(st.integers(0, len(convs) - 1))]
    _corrupt(folded, conv)
    expected = _expected(folded, reference, conv)
    report = normfold.verify(source, folded, localize=True, samples=1)
    assert not report.passed
    assert report.first_divergence["tensor"] == expected
    producer = next(n for n in folded.graph for v in n.outputs if v.name == expected)
    assert report.first_divergence["candidate_node"] == producer.name


def test_save_inputs_round_trips_and_percentiles_are_reported(chain: Path, tmp_path: Path, capsys) -> None:
    folded = tmp_path / "folded.onnx"
    saved = tmp_path / "inputs.npz"
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["optimize", str(chain), "-o", str(folded), "--save-inputs", str(saved), "-q"]) == 0
    assert main(["verify", str(chain), str(folded), "--inputs", str(saved), "--report", str(first), "-q"]) == 0
    with np.load(saved) as archive:
        assert sorted(archive.files) == ["sample_0/x", "sample_1/x", "sample_2/x"]
    assert main(["verify", str(chain), str(folded), "--save-inputs", str(tmp_path / "again.npz"),
                 "--report", str(second), "-q"]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["samples"] == 3 and a["outputs"]["y"]["max_abs_error"] == b["outputs"]["y"]["max_abs_error"]
    percentiles = a["outputs"]["y"]["abs_error_percentiles"]
    assert set(percentiles) == {"p50", "p90", "p99"}
    assert percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"] <= a["outputs"]["y"]["max_abs_error"]
    capsys.readouterr()


def test_dims_naming_no_dim_of_the_model_is_exit_2_listing_its_dims(chain: Path, tmp_path: Path, capsys) -> None:
    code = main(["verify", str(chain), str(chain), "--dims", "seq=4"])
    err = capsys.readouterr().err
    assert code == 2 and "'seq'" in err and "batch" in err and len(err.strip().splitlines()) == 1
