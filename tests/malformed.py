"""A corpus of hostile and unusual ONNX files, generated in code (issue 10).

Each entry of :data:`BAD` writes one input model (and whatever files it reads) into a folder
and returns the model's path; every verb must refuse it with exit 2, one stderr line, and
nothing written. Each entry of :data:`UNUSUAL` writes a valid but uncommon model that every
verb must accept. The builders start from one small Conv+BN+Relu graph and break one thing.
"""

from __future__ import annotations

__all__ = ["BAD", "UNUSUAL", "base_model", "external_copy"]

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import conv_bn_relu_model

Builder = Callable[[Path], Path]


def base_model() -> onnx.ModelProto:
    return conv_bn_relu_model(channels=2)


def _save(folder: Path, model: onnx.ModelProto, name: str = "in.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def external_copy(folder: Path, model: onnx.ModelProto | None = None, location: str = "in.data") -> Path:
    """``model`` saved as ``in.onnx`` with every tensor in ``location`` (next to it)."""
    path = folder / "in.onnx"
    onnx.save(model or base_model(), path, save_as_external_data=True, location=location, size_threshold=0,
              convert_attribute=True)
    return path


def _edit_external(folder: Path, key: str, value: str, *, model: onnx.ModelProto | None = None) -> Path:
    """An external-data copy whose first external tensor has ``key`` set to ``value``."""
    path = external_copy(folder, model)
    proto = onnx.load(path, load_external_data=False)
    tensor = next(t for t in _external_tensors(proto))
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)
    return _save(folder, proto)


def _external_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return (t for t in _get_all_tensors(proto) if t.data_location == TensorProto.EXTERNAL)


def _escape(kind: str, holder: Callable[[], onnx.ModelProto],
            pick: Callable[[onnx.ModelProto], onnx.TensorProto]) -> Builder:
    """A model (built by ``holder``) whose tensor ``pick`` chooses lives outside its folder:
    ``../secret.data`` (parent), an absolute path, or a link in the folder to it (link)."""

    def build(folder: Path) -> Path:
        model_folder = folder / "m"
        model_folder.mkdir()
        proto = holder()
        tensor = pick(proto)
        data = numpy_helper.to_array(tensor).tobytes()
        secret = folder / "secret.data"
        secret.write_bytes(data)
        location = {"parent": "../secret.data", "absolute": str(secret), "link": "in.data"}[kind]
        if kind == "link":
            (model_folder / "in.data").symlink_to(secret)
        for field in ("raw_data", "float_data", "int64_data", "int32_data"):
            tensor.ClearField(field)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        return _save(model_folder, proto)

    return build


# --- models that hold tensors in unusual places ---------------------------------------------------


def _with_constant(attribute: str) -> onnx.ModelProto:
    """Base model whose Relu output is added to a Constant (``value`` or ``sparse_value``)."""
    model = base_model()
    if attribute == "value":
        constant = helper.make_node("Constant", [], ["c"], name="const",
                                    value=numpy_helper.from_array(np.full((1, 2, 1, 1), 0.5, np.float32)))
    else:
        sparse = helper.make_sparse_tensor(
            numpy_helper.from_array(np.array([0.5, -1.0], np.float32), "values"),
            numpy_helper.from_array(np.array([0, 3], np.int64), "indices"), [4])
        constant = helper.make_node("Constant", [], ["c"], name="const", sparse_value=sparse)
    _append_add(model, constant)
    return model


def _append_add(model: onnx.ModelProto, constant: onnx.NodeProto) -> None:
    graph = model.graph
    graph.node[-1].output[0] = "relu_out"
    if constant.attribute[0].name == "sparse_value":
        # The sparse [4] vector is padded to [8] and broadcast over the last axis.
        graph.node.extend([
            constant,
            helper.make_node("Pad", ["c", "pads"], ["c8"], name="pad"),
            helper.make_node("Add", ["relu_out", "c8"], ["y"], name="add"),
        ])
        graph.initializer.append(numpy_helper.from_array(np.array([0, 4], np.int64), "pads"))
    else:
        graph.node.extend([constant, helper.make_node("Add", ["relu_out", "c"], ["y"], name="add")])


def _with_sparse_initializer() -> onnx.ModelProto:
    model = base_model()
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "bias8"),
        numpy_helper.from_array(np.array([1, 6], np.int64), "bias8_indices"), [8])
    model.graph.sparse_initializer.append(sparse)
    model.graph.node[-1].output[0] = "relu_out"
    model.graph.node.append(helper.make_node("Add", ["relu_out", "bias8"], ["y"], name="add"))
    return model


def _with_function() -> onnx.ModelProto:
    """Relu replaced by a call of a model-local function ``local.Shift`` holding a Constant."""
    model = base_model()
    body = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.25, np.float32), "k")),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Add", ["r", "k"], ["b"]),
    ]
    function = helper.make_function("local", "Shift", ["a"], ["b"], body,
                                     [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    relu = model.graph.node[2]
    relu.op_type, relu.domain = "Shift", "local"
    return model


def _with_attribute_reference() -> onnx.ModelProto:
    """Relu then a call of ``local.AddK``, whose body's Constant takes the caller's tensor ``k``
    (an attribute reference: a TENSOR attribute with no tensor in the body)."""
    model = base_model()
    constant = helper.make_node("Constant", [], ["k"])
    constant.attribute.append(onnx.AttributeProto(name="value", ref_attr_name="k", type=onnx.AttributeProto.TENSOR))
    function = helper.make_function("local", "AddK", ["a"], ["b"],
                                    [constant, helper.make_node("Add", ["a", "k"], ["b"])],
                                    [helper.make_opsetid("", 17)], attributes=["k"])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node[-1].output[0] = "relu_out"
    model.graph.node.append(helper.make_node("AddK", ["relu_out"], ["y"], domain="local", name="add_k",
                                             k=numpy_helper.from_array(np.array(0.5, np.float32), "k")))
    return model


def _with_tensors_attribute() -> onnx.ModelProto:
    """A call of a model-local function carrying an (unused) TENSORS attribute."""
    model = _with_function()
    call = model.graph.node[2]
    call.attribute.append(helper.make_attribute(
        "table", [numpy_helper.from_array(np.arange(4, dtype=np.float32), "t0")]))
    return model


def _with_if() -> onnx.ModelProto:
    """Conv+BN+Relu in both branches of an If on a boolean input, weights in the outer scope."""
    outer = base_model().graph
    branches = {}
    for branch in ("then", "else"):
        nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in outer.node]
        for node in nodes:
            node.name += f"_{branch}"
            node.output[:] = [f"{name}_{branch}" for name in node.output]
            node.input[:] = [f"{name}_{branch}" if name in ("conv_out", "bn_out") else name for name in node.input]
        branches[branch] = helper.make_graph(
            nodes, branch, [], [helper.make_tensor_value_info(f"y_{branch}", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["out"], name="if",
                          then_branch=branches["then"], else_branch=branches["else"])],
        "with_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        list(outer.initializer),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _with_loop() -> onnx.ModelProto:
    """A Loop (2 iterations) whose body runs Conv+BN on the carried value (3 -> 3 channels)."""
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.normal(size=(3, 3, 3, 3)).astype(np.float32) * 0.3, "lw"),
        numpy_helper.from_array(np.ones(3, np.float32) * 1.5, "lg"),
        numpy_helper.from_array(np.full(3, 0.1, np.float32), "lb"),
        numpy_helper.from_array(np.full(3, 0.2, np.float32), "lm"),
        numpy_helper.from_array(np.full(3, 2.0, np.float32), "lv"),
    ]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["carry", "lw"], ["lc"], pads=[1, 1, 1, 1], name="lconv"),
         helper.make_node("BatchNormalization", ["lc", "lg", "lb", "lm", "lv"], ["carry_out"], name="lbn")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_out", TensorProto.FLOAT, None)],
        weights,
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "x"], ["y"], name="loop", body=body)],
        "with_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [numpy_helper.from_array(np.array(2, np.int64), "n"), numpy_helper.from_array(np.array(True), "cond")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _with_scan() -> onnx.ModelProto:
    """A Scan over the rows of x[5, 4] whose body is MatMul + Add (a running sum)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "sw"], ["proj"]),
         helper.make_node("Add", ["acc", "proj"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan_out"])],
        "scan_body",
        [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32) * 0.5, "sw")],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["init", "x"], ["final", "rows"], name="scan", body=body, num_scan_inputs=1)],
        "with_scan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, [5, 4])],
        [numpy_helper.from_array(np.zeros(4, np.float32), "init")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _with_string_initializer() -> onnx.ModelProto:
    """An extra output that is a string initializer passed through Identity."""
    model = base_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array([b"cat", b"dog"], dtype=object), "labels"))
    model.graph.node.append(helper.make_node("Identity", ["labels"], ["names"], name="names"))
    model.graph.output.append(helper.make_tensor_value_info("names", TensorProto.STRING, [2]))
    return model


# --- the broken ones ----------------------------------------------------------------------------


def _changed(change: Callable[[onnx.ModelProto], None], model: Callable[[], onnx.ModelProto] = base_model) -> Builder:
    def build(folder: Path) -> Path:
        proto = model()
        change(proto)
        return _save(folder, proto)

    return build


def _input_dim(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = value

    return change


def _two_writers(model: onnx.ModelProto) -> None:
    model.graph.node.append(helper.make_node("Identity", ["x"], ["bn_out"], name="second_writer"))


def _initializer_twice(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(model.graph.initializer[0])


def _raw_data_longer(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[1]  # conv bias [2]
    tensor.raw_data = tensor.raw_data + b"\0" * 8


def _raw_data_shorter(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:8]


def _data_type(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.initializer[1].data_type = value

    return change


def _elem_type(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.elem_type = value

    return change


def _ir_version(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.ir_version = value

    return change


def _huge_initializer(model: onnx.ModelProto) -> None:
    """A declared [10**12] initializer with 4 bytes of data."""
    tensor = model.graph.initializer[1]
    del tensor.dims[:]
    tensor.dims.append(10**12)


def _reshape_fails_at_run_time() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "fails_at_run_time",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "rest"])],
        [numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _no_kernel() -> onnx.ModelProto:
    """Valid for onnx.checker, but onnxruntime's CPU provider has no float64 Acos kernel."""
    graph = helper.make_graph(
        [helper.make_node("Acos", ["x"], ["y"], name="acos")],
        "no_kernel",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _text(content: bytes) -> Builder:
    def build(folder: Path) -> Path:
        path = folder / "in.onnx"
        path.write_bytes(content)
        return path

    return build


def _truncated(folder: Path) -> Path:
    return _text(base_model().SerializeToString()[:150])(folder)


def _missing_data(folder: Path) -> Path:
    path = external_copy(folder)
    (folder / "in.data").unlink()
    return path


def _short_data(folder: Path) -> Path:
    path = external_copy(folder)
    with open(folder / "in.data", "r+b") as file:
        file.truncate(16)
    return path


def _data_is_folder(folder: Path) -> Path:
    path = external_copy(folder)
    (folder / "in.data").unlink()
    (folder / "in.data").mkdir()
    return path


BAD: dict[str, Builder] = {
    "not-onnx": _text(b"hello, I am a text file"),
    "empty-file": _text(b""),
    "truncated": _truncated,
    "ext-offset-text": lambda f: _edit_external(f, "offset", "abc"),
    "ext-offset-empty": lambda f: _edit_external(f, "offset", ""),
    "ext-offset-negative": lambda f: _edit_external(f, "offset", "-8"),
    "ext-length-text": lambda f: _edit_external(f, "length", "1e3"),
    "ext-length-negative": lambda f: _edit_external(f, "length", "-4"),
    "ext-location-empty": lambda f: _edit_external(f, "location", ""),
    "ext-location-nul": lambda f: _edit_external(f, "location", "in.data\0x"),
    "ext-offset-huge": lambda f: _edit_external(f, "offset", "9" * 30),
    "ext-missing": _missing_data,
    "ext-short": _short_data,
    "ext-is-folder": _data_is_folder,
    "ext-parent-initializer": _escape("parent", base_model, lambda m: m.graph.initializer[0]),
    "ext-absolute-initializer": _escape("absolute", base_model, lambda m: m.graph.initializer[0]),
    "ext-link-initializer": _escape("link", base_model, lambda m: m.graph.initializer[0]),
    "ext-parent-constant": _escape("parent", lambda: _with_constant("value"), lambda m: m.graph.node[3].attribute[0].t),
    "ext-parent-sparse-constant": _escape(
        "parent", lambda: _with_constant("sparse"), lambda m: m.graph.node[3].attribute[0].sparse_tensor.values),
    "ext-parent-sparse-initializer": _escape(
        "parent", _with_sparse_initializer, lambda m: m.graph.sparse_initializer[0].values),
    "ext-parent-function": _escape("parent", _with_function, lambda m: m.functions[0].node[0].attribute[0].t),
    "ext-link-tensors-attribute": _escape(
        "link", _with_tensors_attribute, lambda m: m.graph.node[2].attribute[-1].tensors[0]),
    "ext-absolute-subgraph": _escape(
        "absolute", _with_loop, lambda m: m.graph.node[0].attribute[0].g.initializer[0]),
    "dim-negative": _changed(_input_dim(-5)),
    "dim-huge": _changed(_input_dim(10**12)),
    "dim-2^62": _changed(_input_dim(2**62)),
    "initializer-dim-huge": _changed(_huge_initializer),
    "two-writers": _changed(_two_writers),
    "initializer-twice": _changed(_initializer_twice),
    "raw-data-longer": _changed(_raw_data_longer),
    "raw-data-shorter": _changed(_raw_data_shorter),
    "data-type-bad": _changed(_data_type(99)),
    "data-type-undefined": _changed(_data_type(0)),
    "elem-type-bad": _changed(_elem_type(99)),
    "ir-version-2": _changed(_ir_version(2)),
    "ir-version-negative": _changed(_ir_version(-1)),
    "fails-at-run-time": _changed(lambda m: None, _reshape_fails_at_run_time),
    "no-kernel": _changed(lambda m: None, _no_kernel),
}

UNUSUAL: dict[str, Builder] = {
    "string-initializer": _changed(lambda m: None, _with_string_initializer),
    "sparse-initializer": _changed(lambda m: None, _with_sparse_initializer),
    "sparse-constant": _changed(lambda m: None, lambda: _with_constant("sparse")),
    "constant": _changed(lambda m: None, lambda: _with_constant("value")),
    "function": _changed(lambda m: None, _with_function),
    "function-attribute-reference": _changed(lambda m: None, _with_attribute_reference),
    "if": _changed(lambda m: None, _with_if),
    "loop": _changed(lambda m: None, _with_loop),
    "scan": _changed(lambda m: None, _with_scan),
    "external-constant": lambda f: external_copy(f, _with_constant("value")),
}
