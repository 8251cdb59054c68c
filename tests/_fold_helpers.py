"""Building small ONNX graphs and running a pass on them, for the folding passes' tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from normfold import io, runtime
from normfold.passes import NormfoldPass, PassOptions
from normfold.passes.cleanup import CleanupPass

FLOAT = TensorProto.FLOAT


def array(name: str, a: np.ndarray, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a).astype(dtype), name)


def make(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: dict[str, tuple],
    outputs: list[str],
    *,
    opset: int = 17,
    elem: int = FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return with_shapes(model)


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph outputs need a shape: inference gives them theirs (and nothing else changes)."""
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def add_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    return with_shapes(model)


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        feeds[value.name] = rng.normal(size=shape).astype(
            helper.tensor_dtype_to_np_dtype(t.elem_type)
        )
    return feeds


def rel_error(actual: dict, expected: dict) -> float:
    """The largest error relative to each output's scale: its largest magnitude, at least 1.

    The test models compute O(1) values from O(1) weights and inputs; an output that cancels to
    almost 0 still carries the float32 rounding of its O(1) terms, hence the floor.
    """
    return max(
        float(
            np.abs(actual[k].astype(np.float64) - expected[k]).max()
            / max(float(np.abs(expected[k]).max()), 1.0)
        )
        for k in expected
    )


def run_pass(
    proto: onnx.ModelProto,
    pass_class: type[NormfoldPass],
    options: PassOptions | None = None,
    *,
    cleanup: bool = True,
    tol: float = 1e-6,
    feeds: dict | None = None,
) -> tuple[ir.Model, dict]:
    """Run (cleanup +) the pass; the result must pass the checker and match the original in ORT.

    ``tol`` bounds the error relative to each output's largest magnitude; ``tol=0`` asks for
    identical outputs (a refused site leaves the same graph), NaNs included.
    """
    feeds = feeds_for(proto) if feeds is None else feeds
    expected = runtime.run(proto, feeds)
    model = io.load(proto)
    if cleanup:
        CleanupPass()(model)
    the_pass = pass_class(options)
    the_pass(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    actual = runtime.run(model, feeds)
    assert set(actual) == set(expected)
    if tol == 0:
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name])
    else:
        error = rel_error(actual, expected)
        assert error <= tol, f"relative error {error:.3g} > {tol:g}"
    return model, the_pass.record.to_dict()


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]
