"""Tests of normfold.inputs and normfold.verification on small models built with onnx.helper."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from normfold.errors import InputError
from normfold.inputs import generate_inputs, load_inputs
from normfold.runtime import run, session
from normfold.verification import default_tolerance, float64_model, verify

# --- model builders ------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    # onnx.checker (which verify runs on both models) wants every graph output's shape.
    inferred = onnx.shape_inference.infer_shapes(model).graph.output
    for output, known in zip(model.graph.output, inferred):
        if not output.type.tensor_type.HasField("shape"):
            output.CopyFrom(known)
    return model


def _out(name="y", elem=T.FLOAT):
    return h.make_tensor_value_info(name, elem, None)


def matmul_model(w: np.ndarray, b: np.ndarray, *, output="y") -> onnx.ModelProto:
    """y = x @ w + b with x [batch, K]."""
    return _model(
        [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Add", ["m", "b"], [output])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", w.shape[0]])],
        [_out(output)],
        [nh.from_array(w, "w"), nh.from_array(b, "b")],
    )


def conv_model(w: np.ndarray, *, erf: bool = False) -> onnx.ModelProto:
    """Conv (no double kernel in onnxruntime's CPU provider) -> Relu or Erf, then a MatMul."""
    head = np.linspace(-1, 1, 8 * 3, dtype=np.float32).reshape(8, 3)
    return _model(
        [
            h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            h.make_node("Erf" if erf else "Relu", ["c"], ["a"]),
            h.make_node("MatMul", ["a", "head"], ["y"]),
        ],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 6, 8])],
        [_out()],
        [nh.from_array(w, "w"), nh.from_array(head, "head")],
    )


def embedding_model(vocab: int = 7, *, cast_ids: bool = False) -> onnx.ModelProto:
    """Token ids -> Gather from a [vocab, 4] table; mask -> Cast -> multiply; position ids too."""
    table = np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4) / 10
    positions = np.ones((64, 4), np.float32)
    nodes = []
    ids = "input_ids"
    if cast_ids:
        nodes += [h.make_node("Cast", [ids], ["ids32"], to=T.INT32), h.make_node("Identity", ["ids32"], ["ids_i"])]
        ids = "ids_i"
    nodes += [
        h.make_node("Gather", ["table", ids], ["emb"]),
        h.make_node("Gather", ["positions", "position_ids"], ["pos"]),
        h.make_node("Add", ["emb", "pos"], ["e"]),
        h.make_node("Cast", ["attention_mask"], ["maskf"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["maskf", "minus1"], ["mask3"]),
        h.make_node("Mul", ["e", "mask3"], ["y"]),
    ]
    return _model(
        nodes,
        [
            h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
            h.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
        ],
        [_out()],
        [nh.from_array(table, "table"), nh.from_array(positions, "positions"),
         nh.from_array(np.array([-1], np.int64), "minus1")],
    )


def unary_model(*ops: str, elem=T.FLOAT, shape=("batch", 5), extra=(), opset=17) -> onnx.ModelProto:
    """A chain of unary ops from x to y (extra: (op, second-input initializer) pairs at the end)."""
    nodes, current = [], "x"
    for index, op in enumerate(ops):
        nodes.append(h.make_node(op, [current], [f"t{index}"]))
        current = f"t{index}"
    initializers = []
    for index, (op, value) in enumerate(extra):
        initializers.append(nh.from_array(value, f"k{index}"))
        nodes.append(h.make_node(op, [current, f"k{index}"], [f"e{index}"]))
        current = f"e{index}"
    nodes.append(h.make_node("Identity", [current], ["y"]))
    return _model(nodes, [h.make_tensor_value_info("x", elem, list(shape))], [_out(elem=elem)], initializers, opset)


def _weights(seed=0, k=6, n=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal(n).astype(np.float32)


# --- verify: pass / fail ---------------------------------------------------------------------


def test_identical_models_pass_and_report_is_json():
    w, b = _weights()
    report = verify(matmul_model(w, b), matmul_model(w, b))
    assert report.passed and report.max_abs_error == 0 and report.samples == 3
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True and data["outputs"]["y"]["max_abs_error"] == 0.0
    assert data["reference"] == "model" and data["inputs"] == {"x": [2, 6]}
    table = report.format_table()
    assert table.splitlines()[-1].startswith("PASSED:") and "PASS" in table.splitlines()[2]


def test_perturbed_weight_fails_with_the_error_numpy_measures(tmp_path):
    w, b = _weights()
    ref, cand = matmul_model(w, b), matmul_model(w + np.float32(0.01), b)
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    report = verify(tmp_path / "ref.onnx", tmp_path / "cand.onnx", samples=2, seed=5)
    # Independently: the same inputs (seed + k), both models run by ORT, diff by numpy.
    samples = [generate_inputs(ir.from_proto(ref), seed=5 + k) for k in range(2)]
    diffs = [np.abs(run(cand, s)["y"].astype(np.float64) - run(ref, s)["y"]).max() for s in samples]
    scale = max(np.abs(run(ref, s)["y"]).max() for s in samples)
    comparison = report.outputs["y"]
    assert not report.passed and not comparison.passed
    assert comparison.max_abs_error == pytest.approx(max(diffs), rel=1e-12)
    assert comparison.max_rel_error == pytest.approx(max(diffs) / scale, rel=1e-12)
    # and it is what the math says: x @ (0.01 * ones) summed over K
    exact = max(np.abs(s["x"].astype(np.float64).sum(axis=1) * 0.01).max() for s in samples)
    assert comparison.max_abs_error == pytest.approx(exact, rel=1e-3)
    assert report.format_table().splitlines()[-1].startswith("FAILED:")
    # A tolerance the user loosens lets the same pair pass.
    assert verify(ref, cand, samples=2, seed=5, rtol=1.0).passed


def test_nan_positions_must_match_even_when_finite_values_agree():
    ref = unary_model("Sqrt")  # NaN where x < 0
    cand = unary_model("Relu", "Sqrt")  # 0 there, the same elsewhere
    report = verify(ref, cand)
    c = report.outputs["y"]
    assert c.max_abs_error == 0 and c.nan_mismatch > 0 and not c.passed and not report.passed
    assert verify(ref, ref).passed  # NaN at the same positions is fine


def test_inf_positions_must_match():
    ref = unary_model("Relu", "Log")  # -inf where x <= 0
    cand = _model(
        [h.make_node("Relu", ["x"], ["r"]), h.make_node("Max", ["r", "tiny"], ["m"]), h.make_node("Log", ["m"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5])], [_out()], [nh.from_array(np.array(1e-30, np.float32), "tiny")],
    )
    c = verify(ref, cand).outputs["y"]
    assert c.inf_mismatch > 0 and c.nan_mismatch == 0 and not c.passed


def test_shape_mismatch_fails():
    w, b = _weights()
    ref = matmul_model(w, b)
    cand = matmul_model(w, b, output="y0")
    cand.graph.node.append(h.make_node("Flatten", ["y0"], ["y"], axis=0))
    cand.graph.output[0].name = "y"
    report = verify(ref, cand)
    c = report.outputs["y"]
    assert not report.passed and c.problem == "shape (2, 3) vs (1, 6)" and c.candidate_shape == (1, 6)
    assert report.to_dict()["outputs"]["y"]["max_abs_error"] is None


def test_output_name_mismatch_fails_without_raising():
    w, b = _weights()
    report = verify(matmul_model(w, b), matmul_model(w, b, output="logits"))
    assert not report.passed
    assert report.outputs["y"].problem == "missing from the candidate's outputs"
    assert any("'logits'" in p for p in report.problems)
    assert "FAILED" in report.format_table().splitlines()[-1]


def test_input_interface_changes_fail_without_raising():
    w, b = _weights()
    ref = matmul_model(w, b)
    renamed = matmul_model(w, b)
    renamed.graph.input[0].name = "features"
    renamed.graph.node[0].input[0] = "features"
    report = verify(ref, renamed)
    assert not report.passed and any("'x'" in p for p in report.problems)
    assert report.outputs["y"].problem.startswith("not compared")


def test_candidate_may_drop_initializer_inputs_but_not_need_new_ones():
    w, b = _weights()
    ref = matmul_model(w, b)
    ref.graph.input.append(h.make_tensor_value_info("w", T.FLOAT, list(w.shape)))  # old-exporter style
    assert verify(ref, matmul_model(w, b)).passed
    needs_w = matmul_model(w, b)
    needs_w.graph.initializer.pop(0)  # w becomes a required input
    needs_w.graph.input.append(h.make_tensor_value_info("w", T.FLOAT, list(w.shape)))
    report = verify(matmul_model(w, b), needs_w)
    assert not report.passed and any("'w'" in p and "candidate" in p for p in report.problems)


def test_candidate_that_fails_to_run_is_a_failed_report():
    ok = unary_model("Relu")
    broken = _model(
        [h.make_node("Reshape", ["x", "shape"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5])], [_out()],
        [nh.from_array(np.array([7, 3], np.int64), "shape")],
    )
    report = verify(ok, broken)
    assert not report.passed and "fails to run" in report.problems[0]
    assert report.outputs["y"].problem == "not compared: the candidate did not run"


def test_reference_that_fails_to_run_raises_input_error(tmp_path):
    broken = _model(
        [h.make_node("Reshape", ["x", "shape"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5])], [_out()],
        [nh.from_array(np.array([7, 3], np.int64), "shape")],
    )
    onnx.save(broken, tmp_path / "ref.onnx")
    with pytest.raises(InputError, match=r"^.*ref\.onnx: reference model fails to run") as info:
        verify(tmp_path / "ref.onnx", unary_model("Relu"))
    assert "\n" not in str(info.value)


def test_integer_outputs_must_be_equal():
    ref = _model([h.make_node("ArgMax", ["x"], ["y"], axis=1)], [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5])], [_out(elem=T.INT64)])
    cand = _model([h.make_node("ArgMin", ["x"], ["y"], axis=1)], [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5])], [_out(elem=T.INT64)])
    assert verify(ref, ref).passed
    c = verify(ref, cand, rtol=10, atol=10).outputs["y"]  # loose float tolerances do not apply
    assert not c.passed and (c.rtol, c.atol) == (0.0, 0.0) and "differ" in c.problem
    # In float64 mode integers are still compared with the reference at its own precision.
    report = verify(ref, ref, reference_precision="float64")
    assert report.passed and report.outputs["y"].baseline_abs_error is None


def test_fp16_model_gets_fp16_tolerance():
    """float16 outputs: against float64, within 4x the reference's own error + 2u (low_precision)."""
    assert default_tolerance(np.float16) == (2**-9, 2**-9 / 10)
    assert default_tolerance(ir.DataType.FLOAT) == (1e-4, 1e-5)
    assert default_tolerance(ml_dtypes.bfloat16)[0] > default_tolerance(np.float16)[0]
    assert default_tolerance(np.float64)[0] < 1e-8 and default_tolerance(np.int64) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3)).astype(np.float16)
    b = np.zeros(3, np.float16)

    def fp16(weight):
        return _model(
            [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["y"])],
            [h.make_tensor_value_info("x", T.FLOAT16, ["batch", 6])], [_out(elem=T.FLOAT16)],
            [nh.from_array(weight, "w"), nh.from_array(b, "b")],
        )

    nudged = (w.astype(np.float64) * (1 + 1e-3)).astype(np.float16)  # ~1 fp16 ulp: fine for fp16
    report = verify(fp16(w), fp16(nudged))
    c = report.outputs["y"]
    assert c.dtype == "float16" and (c.rtol, c.atol) == (2**-9, 2**-9 / 10)
    assert report.passed and c.max_abs_error > 0 and report.reference == "float32"
    assert c.baseline_abs_error > 0  # the float16 reference's own error against float32
    assert not verify(fp16(w), fp16(w * np.float16(1.1))).passed


def test_progress_bar_goes_to_stderr(capsys, monkeypatch):
    # Progress shows on a terminal, for steps longer than progress.DELAY (0 here).
    import io as _io
    import sys

    from normfold import progress

    class Terminal(_io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "DELAY", 0.0)
    for shown in (True, False):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        w, b = _weights()
        verify(matmul_model(w, b), matmul_model(w, b), progress=shown)
        assert capsys.readouterr().out == ""
        assert ("verify: reference" in terminal.getvalue()) is shown


# --- float64 reference -------------------------------------------------------------------


def test_float64_reference_reports_candidate_error_and_fp32_baseline():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((512, 16)) * 10).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    ref = matmul_model(w, b)
    # The float64 model computes in double: it agrees with numpy's float64 math.
    f64 = float64_model(ir.from_proto(ref))
    sample = generate_inputs(ir.from_proto(ref), seed=0)
    x64 = sample["x"].astype(np.float64)
    exact = x64 @ w.astype(np.float64) + b.astype(np.float64)
    got = run(f64, {"x": x64})["y"]
    assert got.dtype == np.float64 and np.abs(got - exact).max() < 1e-9
    fp32_error = np.abs(run(ref, sample)["y"] - exact).max()
    assert fp32_error > 1e-6  # float32 rounding is visible at K = 512

    report = verify(ref, ref, reference_precision="float64", samples=1)
    c = report.outputs["y"]
    assert report.reference == "float64" and report.passed and report.float32_ops == []
    # The candidate is the reference itself: its error against float64 is the baseline.
    assert c.baseline_abs_error == pytest.approx(fp32_error, rel=1e-9)
    assert c.max_abs_error == pytest.approx(fp32_error, rel=1e-9)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["outputs"]["y"]["baseline_abs_error"] == pytest.approx(fp32_error)
    assert "ref max abs" in report.format_table()

    cand = matmul_model(w, b + np.float32(1.0))
    c = verify(ref, cand, reference_precision="float64", samples=1).outputs["y"]
    assert c.max_abs_error == pytest.approx(np.abs(run(cand, sample)["y"] - exact).max(), rel=1e-9)
    assert not c.passed


def test_float64_model_converts_constants_casts_and_types():
    # float64 arithmetic on the model's own (float32) constants; a Cast left at FLOAT, or a
    # constant left in float32 (a type clash in onnxruntime), would show.
    model = _model(
        [
            h.make_node("Constant", [], ["tenth"], value_float=0.1),
            h.make_node("Mul", ["x", "tenth"], ["a"]),
            h.make_node("Shape", ["x"], ["shape"]),
            h.make_node("ConstantOfShape", ["shape"], ["c"], value=nh.from_array(np.array([0.3], np.float32))),
            h.make_node("Add", ["a", "c"], ["s"]),
            h.make_node("Cast", ["s"], ["f"], to=T.FLOAT),
            h.make_node("Constant", [], ["seven"], value=nh.from_array(np.array(0.7, np.float32))),
            h.make_node("Div", ["f", "seven"], ["y"]),
        ],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3])], [_out()],
    )
    x = np.array([[1.0, -2.5, 3.25]], np.float32)
    tenth, three_tenths, seven_tenths = (float(np.float32(v)) for v in (0.1, 0.3, 0.7))
    exact = (x.astype(np.float64) * tenth + three_tenths) / seven_tenths
    got = run(float64_model(ir.from_proto(model)), {"x": x.astype(np.float64)})["y"]
    assert got.dtype == np.float64 and np.abs(got - exact).max() < 1e-14
    assert np.abs(run(model, {"x": x})["y"] - exact).max() > 1e-9


@pytest.mark.parametrize("erf", [False, True])
def test_float64_reference_wraps_ops_without_double_kernel(erf):
    # Conv and Erf have no double kernel in onnxruntime's CPU provider: checked in the test.
    with pytest.raises(InputError, match="NOT_IMPLEMENTED"):
        from normfold.runtime import session

        bare = float64_model(ir.from_proto(conv_model(np.ones((8, 3, 3, 3), np.float32), erf=erf)))
        session(bare)
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    report = verify(conv_model(w, erf=erf), conv_model(w, erf=erf), reference_precision="float64", samples=1)
    assert report.passed
    assert report.float32_ops == (["Conv", "Erf"] if erf else ["Conv"])
    assert report.outputs["y"].baseline_abs_error is not None


def test_float64_reference_handles_type_refusals_and_function_ops():
    # Resize wants float32 scales (an INVALID_GRAPH type error, not a missing kernel);
    # Gelu-20 is expanded as a function whose Erf has no double kernel (names no graph node).
    resize = _model(
        [h.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear"), h.make_node("Gelu", ["r"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 2, 3, 3])], [_out()],
        [nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")], opset=20,
    )
    report = verify(resize, resize, reference_precision="float64", samples=1)
    assert report.passed and report.float32_ops == ["Gelu", "Resize"]


# --- generated inputs ----------------------------------------------------------------------


def test_token_ids_stay_below_vocabulary_and_masks_are_padded_rows():
    for cast_ids in (False, True):
        model = ir.from_proto(embedding_model(7, cast_ids=cast_ids))
        for seed in range(5):
            feeds = generate_inputs(model, seed=seed)
            ids, mask, positions = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
            assert ids.shape == (2, 16) and ids.dtype == np.int64
            assert ids.min() >= 0 and ids.max() < 7 and len(np.unique(ids)) > 2
            assert set(np.unique(mask)) == {0, 1} and (mask[:, 0] == 1).all()
            assert (np.diff(mask, axis=1) <= 0).all()  # 1...1 0...0 rows
            assert (positions == np.arange(16)).all()
    assert verify(embedding_model(7), embedding_model(7)).passed


def test_smallest_gather_table_bounds_ids():
    model = embedding_model(7)
    model.graph.node.append(h.make_node("Gather", ["small", "input_ids"], ["other"]))
    model.graph.initializer.append(nh.from_array(np.zeros((3, 2), np.float32), "small"))
    model.graph.output.append(_out("other"))
    feeds = generate_inputs(ir.from_proto(model))
    assert feeds["input_ids"].max() < 3


def test_dims_defaults_binding_and_unknown_name():
    model = ir.from_proto(_model(
        [h.make_node("Identity", ["a"], ["y"]), h.make_node("Identity", ["b"], ["z"]), h.make_node("Identity", ["c"], ["u"])],
        [h.make_tensor_value_info("a", T.FLOAT, ["batch_size", "sequence_length", 8]),
         h.make_tensor_value_info("b", T.FLOAT, ["batch_size", "channels", "height", "width"]),
         h.make_tensor_value_info("c", T.FLOAT, [None, None])],
        [_out("y"), _out("z"), _out("u")],
    ))
    feeds = generate_inputs(model)
    assert feeds["a"].shape == (2, 16, 8) and feeds["b"].shape == (2, 4, 32, 32) and feeds["c"].shape == (2, 4)
    feeds = generate_inputs(model, dims={"batch_size": 5, "sequence_length": 3})
    assert feeds["a"].shape == (5, 3, 8) and feeds["b"].shape[0] == 5
    with pytest.raises(InputError, match=r"'seq' is not a symbolic dim.*batch_size, sequence_length, channels"):
        generate_inputs(model, dims={"seq": 3})
    with pytest.raises(InputError, match="positive"):
        generate_inputs(model, dims={"batch_size": 0})
    w, b = _weights()
    assert verify(matmul_model(w, b), matmul_model(w, b), dims={"batch": 5}).input_shapes == {"x": (5, 6)}
    with pytest.raises(InputError, match="'bsz' is not a symbolic dim"):
        verify(matmul_model(w, b), matmul_model(w, b), dims={"bsz": 5})


def test_generated_dtypes():
    model = ir.from_proto(_model(
        [h.make_node("Identity", [n], [f"o{n}"]) for n in "abcd"],
        [h.make_tensor_value_info("a", T.FLOAT16, [3]), h.make_tensor_value_info("b", T.BFLOAT16, [3]),
         h.make_tensor_value_info("c", T.BOOL, [40]), h.make_tensor_value_info("d", T.INT32, [40])],
        [_out(f"o{n}", e) for n, e in zip("abcd", (T.FLOAT16, T.BFLOAT16, T.BOOL, T.INT32))],
    ))
    feeds = generate_inputs(model, seed=3)
    assert feeds["a"].dtype == np.float16 and feeds["b"].dtype == ml_dtypes.bfloat16
    assert feeds["c"].dtype == np.bool_ and feeds["c"].any() and not feeds["c"].all()
    assert feeds["d"].dtype == np.int32 and set(np.unique(feeds["d"])) == {0, 1}
    assert not np.array_equal(feeds["a"], generate_inputs(model, seed=4)["a"])


# --- npz inputs ----------------------------------------------------------------------------


def _embedding_feeds():
    return {
        "input_ids": np.array([[1, 2, 3], [4, 5, 6]], np.int64),
        "attention_mask": np.array([[1, 1, 1], [1, 1, 0]], np.int64),
        "position_ids": np.array([[0, 1, 2], [0, 1, 2]], np.int64),
    }


def test_npz_inputs_happy_path(tmp_path):
    np.savez(tmp_path / "x.npz", **_embedding_feeds())
    model = embedding_model(7)
    (sample,) = load_inputs(tmp_path / "x.npz", ir.from_proto(model))
    assert sample["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    report = verify(model, model, inputs=tmp_path / "x.npz")
    assert report.passed and report.samples == 1 and report.input_shapes["input_ids"] == (2, 3)
    # In-memory samples work the same way.
    assert verify(model, model, inputs=[_embedding_feeds(), _embedding_feeds()]).samples == 2
    with pytest.raises(InputError, match="either inputs or dims"):
        verify(model, model, inputs=_embedding_feeds(), dims={"batch": 2})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("attention_mask"), r"x\.npz: no values for model input\(s\) 'attention_mask'"),
        (lambda f: f.update(extra=np.zeros(2)), r"x\.npz: 'extra' is not an input of the model"),
        (lambda f: f.update(table=np.zeros((7, 4), np.float32)), r"x\.npz: 'table' is a weight"),
        (lambda f: f.update(attention_mask=np.ones(3, np.int64)), r"x\.npz: input 'attention_mask' has shape \(3,\) but the model wants \(batch=2, seq=3\)"),
        (lambda f: f.update(attention_mask=np.ones((2, 4), np.int64)), r"x\.npz: input 'attention_mask' has shape \(2, 4\) but the model wants \(batch=2, seq=3\)"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), r"x\.npz: input 'input_ids' has dtype int32 but the model wants int64"),
    ],
)
def test_npz_mismatches_are_one_line_input_errors(tmp_path, change, message):
    feeds = _embedding_feeds()
    change(feeds)
    np.savez(tmp_path / "x.npz", **feeds)
    with pytest.raises(InputError, match=message) as info:
        load_inputs(tmp_path / "x.npz", ir.from_proto(embedding_model(7)))
    assert "\n" not in str(info.value) and str(tmp_path / "x.npz") in str(info.value)


def test_npz_static_dim_mismatch_and_bad_files(tmp_path):
    w, b = _weights()
    model = ir.from_proto(matmul_model(w, b))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match=r"has shape \(2, 5\) but the model wants \(batch, 6\)"):
        load_inputs(tmp_path / "x.npz", model)
    np.save(tmp_path / "x.npy", np.zeros((2, 6), np.float32))
    with pytest.raises(InputError, match="not an .npz"):
        load_inputs(tmp_path / "x.npy", model)
    (tmp_path / "t.npz").write_text("hello")
    with pytest.raises(InputError, match="t.npz: not a readable"):
        load_inputs(tmp_path / "t.npz", model)
    with pytest.raises(InputError, match="no such file"):
        load_inputs(tmp_path / "missing.npz", model)
    with pytest.raises(InputError, match="not a file"):
        load_inputs(tmp_path, model)


def test_npz_bfloat16_round_trip(tmp_path):
    model = ir.from_proto(unary_model("Identity", elem=T.BFLOAT16, shape=(2, 3)))
    np.savez(tmp_path / "b.npz", x=np.ones((2, 3), ml_dtypes.bfloat16))
    (sample,) = load_inputs(tmp_path / "b.npz", model)
    assert sample["x"].dtype == ml_dtypes.bfloat16 and sample["x"].astype(np.float32).sum() == 6


# --- properties ------------------------------------------------------------------------------


_PERTURBATIONS = given(
    delta=st.floats(1e-7, 1.0),
    row=st.integers(0, 5),
    col=st.integers(0, 2),
    seed=st.integers(0, 1000),
)


def _judged_by_the_stated_criterion(delta: float, row: int, col: int, seed: int) -> None:
    w, b = _weights(seed)
    bent = w.copy()
    bent[row, col] += np.float32(delta)
    ref, cand = matmul_model(w, b), matmul_model(bent, b)
    report = verify(ref, cand, samples=2, seed=seed)
    samples = [generate_inputs(ir.from_proto(ref), seed=seed + k) for k in range(2)]
    ref_session, cand_session = session(ref), session(cand)  # one session per model, not per sample
    refs = [run(ref_session, s)["y"].astype(np.float64) for s in samples]
    error = max(np.abs(run(cand_session, s)["y"] - r).max() for s, r in zip(samples, refs))
    scale = max(np.abs(r).max() for r in refs)
    assert report.passed == (error <= 1e-5 + 1e-4 * scale)
    if delta > 1e-2:  # far above float32 noise: always caught
        assert not report.passed


# The default suite draws a few perturbations besides the pinned ones: below float32 noise (passes),
# either side of the tolerance, and far above it (fails); the slow variant explores many more.
@settings(max_examples=6, deadline=None)
@_PERTURBATIONS
@example(delta=1e-7, row=0, col=0, seed=0)
@example(delta=2e-4, row=5, col=2, seed=1)  # just inside the tolerance: passes
@example(delta=1e-3, row=5, col=2, seed=1)  # just outside it: fails
@example(delta=0.5, row=3, col=1, seed=2)
def test_any_perturbation_is_judged_by_the_stated_criterion(delta, row, col, seed):
    _judged_by_the_stated_criterion(delta, row, col, seed)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@_PERTURBATIONS
def test_any_perturbation_is_judged_by_the_stated_criterion_exhaustively(delta, row, col, seed):
    _judged_by_the_stated_criterion(delta, row, col, seed)


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 40), batch=st.integers(1, 4), seq=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_generated_ids_always_index_the_table(vocab, batch, seq, seed):
    model = ir.from_proto(embedding_model(vocab, cast_ids=seed % 2 == 1))
    feeds = generate_inputs(model, dims={"batch": batch, "seq": seq}, seed=seed)
    assert feeds["input_ids"].shape == (batch, seq)
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < vocab
    mask = feeds["attention_mask"]
    assert (mask[:, 0] == 1).all() and set(np.unique(mask)) <= {0, 1}
    if seq > 1:
        assert (mask == 0).any()
