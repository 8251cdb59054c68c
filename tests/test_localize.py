"""verify --localize: the first tensor the graphs share by name that differs, and where it comes from.

Every case corrupts one weight of a folded model (the candidate: a Conv, Gemm or MatMul weight,
a fused norm's scale, one read inside an If branch or a Loop body, the last layer's) and checks
that localize names the first shared tensor downstream of it, in the candidate's order, with the
nodes that produce it in each graph; that a correct candidate reports no divergence; and that
when nothing can be localized the report says why. Graphs: hand-built chains (float32 and
float16, external data, every intermediate renamed), one with If/Loop/sequence/ArgMax and four
outputs, and (slow) TorchScript and dynamo exports of the zoo.
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


def _corrupt(model: ir.Model, node: ir.Node) -> None:
    """Replace the weight ``node`` reads second (a Conv/Gemm/MatMul weight, a norm's scale)."""
    weight = node.inputs[1]
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor((-3 * array.astype(np.float64) + 1).astype(array.dtype), name=weight.name)


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


# (zoo model, export variant, op types whose weight is corrupted): TorchScript and dynamo
# exports, BN kept by the exporter, initializers as inputs, float16; Conv, Gemm, MatMul and the
# scale of a norm fused by normfold or by the exporter.
_ZOO_CASES = [
    ("resnet", "ts13-keepbn", ("Conv", "Gemm")),
    ("mobilenetv2", "ts13-inputs", ("Conv",)),
    ("vgg", "dynamo18", ("Conv", "Gemm")),
    ("convnext", "dynamo18", ("LayerNormalization", "MatMul", "Gemm")),
    ("bert", "ts13", ("LayerNormalization", "MatMul")),
    ("bert", "ts17-fp16", ("LayerNormalization", "MatMul")),
    ("llama", "ts17", ("RMSNormalization", "MatMul")),
    ("t5", "dynamo18", ("RMSNormalization", "MatMul")),
    ("unet", "dynamo18", ("Conv", "GroupNormalization")),
    ("levit", "ts17-keepbn", ("Conv", "MatMul", "Gemm")),
    ("mobileone", "dynamo18", ("Conv",)),
]


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_zoo_models_localize_any_corrupted_weight(data) -> None:
    pytest.importorskip("torch")
    from normfold.models.export import cached_export

    name, variant, ops = data.draw(st.sampled_from(_ZOO_CASES))
    source = cached_export(name, variant)
    reference = normfold.load(source)
    folded = normfold.optimize(source, verify=False).model
    nodes = [n for n in folded.graph if n.op_type in ops and n.inputs[1] is not None and n.inputs[1].const_value]
    node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
    _corrupt(folded, node)
    expected = _expected(folded, reference, node)
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


@pytest.mark.parametrize("verb", [
    ["verify", "{model}", "{model}"],
    ["optimize", "{model}", "-o", "{out}"],
    ["optimize", "{model}", "-o", "{out}", "--no-verify"],  # unused, but still a name the model lacks
    ["optimize", "{model}", "-o", "{out}", "--target", "onnxruntime", "--save-inputs", "{npz}"],
])
def test_dims_naming_no_dim_of_the_model_is_exit_2_listing_its_dims(
    chain: Path, tmp_path: Path, capsys, verb: list[str]
) -> None:
    out, npz = tmp_path / "out.onnx", tmp_path / "x.npz"
    argv = [arg.format(model=chain, out=out, npz=npz) for arg in verb]
    before = chain.read_bytes()
    code = main([*argv, "--dims", "batch=2,seq=4"])
    err = capsys.readouterr().err
    assert code == 2 and "'seq'" in err and "(its symbols: batch)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not npz.exists() and chain.read_bytes() == before


_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
           "int64": TensorProto.INT64, "bool": TensorProto.BOOL}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(st.sampled_from(["x", "file", "allow_pickle", "input/ids", "input:0", "sample_1"]),
                   min_size=1, max_size=3, unique=True),
    dtype=st.sampled_from(sorted(_DTYPES)),
    samples=st.integers(1, 3),
)
def test_saved_inputs_read_back_as_the_same_samples(tmp_path: Path, names: list[str], dtype: str, samples: int) -> None:
    """Any input name (one that is numpy.savez's own keyword, a path, a sample-like prefix), any
    dtype verify feeds, one sample or several: what verify saves, --inputs reads back equal."""
    from normfold.inputs import load_inputs, write_inputs

    graph = helper.make_graph(
        [helper.make_node("Cast", [name], [f"out{k}"], to=TensorProto.FLOAT) for k, name in enumerate(names)], "ids",
        [helper.make_tensor_value_info(name, _DTYPES[dtype], ["batch", 3]) for name in names],
        [helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, ["batch", 3]) for k in range(len(names))],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    saved = tmp_path / f"{dtype}-{samples}-{len(names)}.npz"
    if dtype == "bfloat16":  # onnxruntime's Python API takes no bfloat16 array: written, not run
        from normfold.inputs import generate_inputs

        write_inputs(saved, [generate_inputs(model, seed=k) for k in range(samples)])
    else:
        assert normfold.verify(model, model, samples=samples, save_inputs=saved).passed
    read = load_inputs(saved, model)
    assert len(read) == samples
    again = tmp_path / "again.npz"
    write_inputs(again, read)
    for first, second in zip(read, load_inputs(again, model)):
        assert sorted(first) == sorted(names) and sorted(second) == sorted(names)
        for name in names:
            assert first[name].dtype == second[name].dtype and str(first[name].dtype) == dtype
            np.testing.assert_array_equal(first[name].view(np.uint8), second[name].view(np.uint8))


def test_percentiles_are_null_when_nothing_was_measured(chain: Path) -> None:
    folded = normfold.optimize(chain, verify=False).model
    folded.graph.outputs[0].name = "renamed"  # the reference's output is missing from the candidate
    data = normfold.verify(chain, folded).to_dict()
    assert data["outputs"]["y"]["abs_error_percentiles"] is None


def test_percentiles_are_those_of_every_finite_position_of_every_sample() -> None:
    from normfold.verification import compare

    rng = np.random.default_rng(3)
    refs = [{"y": rng.normal(size=(4, 5)).astype(np.float32)} for _ in range(3)]
    cands = [{"y": (r["y"] + rng.normal(size=(4, 5)) * 1e-3).astype(np.float32)} for r in refs]
    cands[1]["y"][0, 0] = refs[1]["y"][0, 0] = np.inf  # not finite in both: left out
    got = compare(refs, cands).to_dict()["outputs"]["y"]["abs_error_percentiles"]
    finite = [np.isfinite(r["y"]) for r in refs]
    differences = np.concatenate([
        np.abs(c["y"][keep].astype(np.float64) - r["y"][keep].astype(np.float64))
        for r, c, keep in zip(refs, cands, finite)
    ])
    assert differences.size == 59
    np.testing.assert_allclose([got["p50"], got["p90"], got["p99"]], np.percentile(differences, [50, 90, 99]))


# --- hostile graphs: subgraphs, sequences, integer and several outputs, renamed tensors ---------


def _control_flow_model() -> onnx.ModelProto:
    """Conv+BN, an If whose branches read weights of the outer graph, a Loop, a sequence
    intermediate, and four outputs (one of them an ArgMax, int64)."""
    rng = np.random.default_rng(1)

    def weight(name: str, shape: tuple[int, ...], low: float | None = None) -> onnx.TensorProto:
        array = rng.uniform(low, 2, shape) if low is not None else rng.normal(size=shape)
        return numpy_helper.from_array(array.astype(np.float32), name)

    image = ["n", 4, "h", "w"]
    then_branch = helper.make_graph([helper.make_node("Mul", ["c0", "s1"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, image)])
    else_branch = helper.make_graph([helper.make_node("Add", ["c0", "s2"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, image)])
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "s2"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Relu", ["v_out"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, image),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, image)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "gamma", "beta", "mean", "var"], ["bn0"], name="bn0"),
        helper.make_node("If", ["flag"], ["if_out"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["trips", "", "bn0"], ["loop_v", "loop_scan"], name="loop", body=body),
        helper.make_node("Add", ["if_out", "loop_v"], ["sum"], name="sum"),
        helper.make_node("Conv", ["sum", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c1"], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
        helper.make_node("ArgMax", ["pooled"], ["cls"], name="argmax", axis=1),
        helper.make_node("SequenceConstruct", ["c1", "c1"], ["seq"], name="seq"),
        helper.make_node("ConcatFromSequence", ["seq"], ["cat"], name="cat", axis=1),
    ]
    inits = [weight("w0", (4, 3, 3, 3)), weight("gamma", (4,), 0.5), weight("beta", (4,)), weight("mean", (4,)),
             weight("var", (4,), 0.5), weight("s1", (4, 1, 1)), weight("s2", (4, 1, 1)), weight("w1", (5, 4, 3, 3)),
             numpy_helper.from_array(np.array(2, np.int64), "trips")]
    graph = helper.make_graph(
        nodes, "control",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 5]),
         helper.make_tensor_value_info("cls", TensorProto.INT64, ["n", 1]),
         helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["n", 10, "h", "w"]),
         helper.make_tensor_value_info("loop_scan", TensorProto.FLOAT, [2, "n", 4, "h", "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _corrupt_weight(model: ir.Model, name: str) -> None:
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(-3 * value.const_value.numpy() + 1, name=name)


@pytest.mark.parametrize(("weight", "flag", "expected"), [
    ("w0", True, "c0"),  # the Conv whose output the If reads stays unfolded: its own output is shared
    ("s1", True, "if_out"),  # a weight read inside the taken branch: the If's output
    ("s2", False, "if_out"),  # read in the other branch and in the Loop body: the If comes first
    ("s2", True, "loop_v"),  # the branch taken does not read it; the Loop does
    ("w1", True, "c1"),  # before the ArgMax, the sequence and the Concat
])
def test_control_flow_sequences_and_integer_outputs(tmp_path: Path, weight: str, flag: bool, expected: str) -> None:
    source = tmp_path / "control.onnx"
    onnx.save(_control_flow_model(), source)
    folded = normfold.optimize(source, verify=False).model
    _corrupt_weight(folded, weight)
    inputs = {"x": np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32), "flag": np.array(flag)}
    report = normfold.verify(source, folded, localize=True, inputs=inputs)
    assert not report.passed
    assert report.first_divergence["tensor"] == expected, report.localize_note
    assert report.first_divergence["max_abs_error"] > 0.1


def test_a_corrupted_last_layer_names_the_output_and_says_so(chain: Path, capsys) -> None:
    folded = normfold.optimize(chain, verify=False).model
    last = [n for n in folded.graph if n.op_type == "Conv"][-1]
    _corrupt(folded, last)
    report = normfold.verify(chain, folded, localize=True)
    # The last Conv writes b3, shared with the reference's last BatchNorm, before the output.
    assert report.first_divergence["tensor"] == "b3"
    # Renaming every intermediate leaves only the output to compare.
    for node in folded.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.name = f"renamed/{value.name}"
    report = normfold.verify(chain, folded, localize=True)
    assert report.first_divergence["tensor"] == "y"
    assert report.localize_note == "'y' is a graph output: the graphs share no tensor by name before it"
    line = next(line for line in report.format_table().splitlines() if line.startswith("first divergence:"))
    assert "'y' is a graph output" in line
    assert report.to_dict()["localize_note"] == report.localize_note


def test_nothing_to_localize_is_said_plainly(chain: Path) -> None:
    folded = normfold.optimize(chain, verify=False).model
    # An extra output fails the interface while every output of the reference agrees.
    folded.graph.outputs.append(next(n for n in folded.graph if n.op_type == "Relu").outputs[0])
    report = normfold.verify(chain, folded, localize=True)
    assert not report.passed and report.first_divergence is None
    assert report.localize_note == "not localized: every output agrees; the problems above are the failure"
    assert "first divergence: not localized: every output agrees" in report.format_table()
    # A candidate that cannot be fed (an input of another dtype) never runs.
    broken = normfold.optimize(chain, verify=False).model
    broken.graph.inputs[0].dtype = ir.DataType.DOUBLE
    report = normfold.verify(chain, broken, localize=True)
    assert report.first_divergence is None and report.localize_note == "not localized: the candidate did not run"
    # Without --localize, neither key.
    assert "localize_note" not in normfold.verify(chain, broken).to_dict()
    # Every tensor renamed, the output too: nothing is shared.
    renamed = normfold.optimize(chain, verify=False).model
    for node in renamed.graph:
        for value in node.outputs:
            value.name = f"renamed/{value.name}"
    report = normfold.verify(chain, renamed, localize=True)
    assert report.first_divergence is None
    assert report.localize_note == "the graphs share no tensor by name: nothing to compare"
    assert "first divergence: the graphs share no tensor by name" in report.format_table()


def _count_sessions(monkeypatch) -> list:
    """Weak references to the sessions localize builds; building one while another is alive fails."""
    import weakref

    import normfold.localize

    live: list[weakref.ref] = []
    built = normfold.localize.session

    def counted(model, **kwargs):
        assert all(ref() is None for ref in live), "a session of localize is still alive"
        sess = built(model, **kwargs)
        live.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(normfold.localize, "session", counted)
    return live


def test_external_data_candidate_and_one_session_at_a_time(chain: Path, tmp_path: Path, monkeypatch) -> None:
    folded = normfold.optimize(chain, verify=False).model
    _corrupt(folded, next(n for n in folded.graph if n.op_type == "Conv" and n.outputs[0].name == "b1"))
    candidate = tmp_path / "cand.onnx"
    ir.save(folded, candidate, external_data="cand.data", size_threshold_bytes=0)
    live = _count_sessions(monkeypatch)
    report = normfold.verify(chain, candidate, localize=True)
    assert report.first_divergence["tensor"] == "b1" and len(live) == 2


def test_float16_models_localize(tmp_path: Path, monkeypatch) -> None:
    model = _chain_model()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    source = tmp_path / "half.onnx"
    onnx.save(model, source)
    folded = normfold.optimize(source, verify=False).model
    assert normfold.verify(source, folded, localize=True).first_divergence is None
    conv = next(n for n in folded.graph if n.op_type == "Conv" and n.outputs[0].name == "b2")
    _corrupt(folded, conv)
    report = normfold.verify(source, folded, localize=True)
    assert report.reference == "float32" and not report.passed
    assert report.first_divergence["tensor"] == "b2"
    # A weight 0.3% off: verify fails it against the float32 run of the reference, and so must
    # localize (against the float16 reference within 5x the tolerance, nothing differed).
    folded = normfold.optimize(source, verify=False).model
    weight = next(n for n in folded.graph if n.op_type == "Conv" and n.outputs[0].name == "b1").inputs[1]
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor((array.astype(np.float64) * 1.003).astype(np.float16), name=weight.name)
    live = _count_sessions(monkeypatch)
    report = normfold.verify(source, folded, localize=True)
    assert not report.passed and report.first_divergence["tensor"] == "b1", report.localize_note
    assert len(live) == 3  # reference, candidate, float32 reference: one at a time
