"""Loading validates and memory-maps; saving is atomic and never touches the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from normfold import files, io, runtime
from normfold.errors import InputError
from tests.conftest import conv_bn_relu_model


def _external_copy(tmp_path: Path) -> Path:
    """The conv-BN model with every tensor in one external data file next to it."""
    path = tmp_path / "ext.onnx"
    onnx.save(conv_bn_relu_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def test_load_accepts_path_proto_and_ir_model(conv_bn_path: Path) -> None:
    from_path = io.load(conv_bn_path)
    from_proto = io.load(onnx.load(conv_bn_path))
    assert io.load(from_path) is from_path
    assert [n.op_type for n in from_proto.graph] == ["Conv", "BatchNormalization", "Relu"]


def test_load_after_input_files_reads_the_file_as_it_is_now(tmp_path: Path) -> None:
    # input_files keeps its parse for the load that follows: a file changed in between must be
    # read again, and a kept parse is handed out once.
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_model(channels=4), path)
    io.input_files(path)
    assert io.load(path).graph.initializers["w"].shape[0] == 4
    io.input_files(path)
    onnx.save(conv_bn_relu_model(channels=6), path)
    assert io.load(path).graph.initializers["w"].shape[0] == 6
    first, second = io.load(path), io.load(path)
    assert first.graph.initializers["w"].shape[0] == second.graph.initializers["w"].shape[0] == 6


def test_external_data_stays_memory_mapped(tmp_path: Path) -> None:
    model = io.load(_external_copy(tmp_path))
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert io.external_data_files(model) == {(tmp_path / "ext.data").resolve()}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "not a file"),
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("this is not a protobuf at all \x00\xff"), "not"),
        (lambda p: p.write_bytes(conv_bn_relu_model().SerializeToString()[:200]), "not"),
    ],
    ids=["folder", "missing", "text", "truncated"],
)
def test_unreadable_files_are_input_errors(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        io.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checker_failure_is_input_error(tmp_path: Path) -> None:
    model = conv_bn_relu_model()
    model.graph.node[2].input[0] = "undefined_value"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="onnx.checker"):
        io.load(path)


def _declared(proto: onnx.ModelProto) -> tuple[list, list[str]]:
    """The graph inputs (name, type) and the initializers' names the checker is handed."""
    graph = proto.graph
    return [(v.name, v.type.SerializeToString()) for v in graph.input], [t.name for t in graph.initializer]


def test_the_load_checks_the_file_with_its_weights_declared_as_weightless_proto_does(tmp_path: Path) -> None:
    # Every tensor in a data file, and one inline tensor over the inline limit: each is declared
    # as an input of its type and shape, in the proto the load checks without serializing the
    # model back, as in weightless_proto; the parsed proto is left as it was.
    model = conv_bn_relu_model(channels=4100)  # gamma..var: 16400 bytes each, w: 442800
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=20000)
    proto = io.read_proto(path)
    before = proto.SerializeToString()
    light = io._weightless_copy(proto)
    assert proto.SerializeToString() == before
    assert light is not None
    assert _declared(light) == _declared(io.weightless_proto(io.load(path)))
    assert [t.name for t in light.graph.initializer] == ["b", "gamma", "beta", "mean", "var"]
    onnx.checker.check_model(light, full_check=True)


def test_a_graph_with_subgraphs_is_checked_through_the_model() -> None:
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)], "g",
        [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert io._weightless_copy(proto) is None
    io.load(proto)  # still checked, the way weightless_proto declares subgraph weights


def test_unknown_domain_is_input_error(tmp_path: Path) -> None:
    model = conv_bn_relu_model()
    model.graph.node[2].domain = "com.example.custom"
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="unknown domain 'com.example.custom'"):
        io.load(path)


def test_missing_external_data(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(InputError, match="missing external data"):
        io.load(path)


def test_short_external_data(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(InputError, match="needs .* bytes"):
        io.load(path)


def test_every_tensor_is_checked_against_its_data_file(tmp_path: Path) -> None:
    # The file is looked at once for all its tensors; each tensor's range is still checked:
    # cutting off the last tensor's bytes names that tensor.
    path = _external_copy(tmp_path)
    proto = onnx.load(path, load_external_data=False)
    ends = {t.name: sum(int(e.value) for e in t.external_data if e.key in ("offset", "length"))
            for t in proto.graph.initializer}
    last = max(ends, key=ends.get)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[: ends[last] - 1])
    with pytest.raises(InputError, match=f"tensor '{last}'.*needs {ends[last]} bytes"):
        io.load(path)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_copy(folder)
    secret = tmp_path / "secret.data"
    secret.write_bytes((folder / "ext.data").read_bytes())
    if kind == "dotdot":
        _set_location(path, "../secret.data")
    elif kind == "absolute":
        _set_location(path, str(secret))
    else:
        (folder / "ext.data").unlink()
        os.symlink(secret, folder / "ext.data")
    with pytest.raises(InputError, match="refused, not read"):
        io.load(path)


def test_save_is_single_file_and_round_trips(tmp_path: Path, conv_bn_path: Path) -> None:
    model = io.load(conv_bn_path)
    out = io.save(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx", "out.onnx"]
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(runtime.run(out, feeds)["y"], runtime.run(conv_bn_path, feeds)["y"])


def test_an_input_with_external_data_keeps_that_layout(tmp_path: Path) -> None:
    # Weights still mapped from the input's data file are copied file to file into OUT's own
    # data file: one file would hold them all in memory as a protobuf. A model whose every
    # weight was rewritten in memory is one file again.
    source = _external_copy(tmp_path)
    model = io.load(source)
    out_folder = tmp_path / "elsewhere"
    out_folder.mkdir()
    out = io.save(model, out_folder / "kept.onnx")
    data = [p.name for p in out_folder.iterdir() if p.name != "kept.onnx"]
    assert len(data) == 1 and data[0].startswith("kept.nf-") and data[0].endswith(".data")
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(out, load_external_data=False).graph.initializer)
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(runtime.run(out, feeds)["y"], runtime.run(source, feeds)["y"])
    for value in model.graph.initializers.values():
        value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    (tmp_path / "alone").mkdir()
    alone = io.save(model, tmp_path / "alone" / "one.onnx")
    assert [p.name for p in (tmp_path / "alone").iterdir()] == ["one.onnx"]
    assert onnx.load(alone).graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


def test_large_models_are_written_with_external_data(tmp_path: Path, conv_bn_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10)
    out = io.save(io.load(conv_bn_path), tmp_path / "big.onnx")
    [data] = [p.name for p in tmp_path.glob("big.nf-*.data")]
    assert files.is_fresh_data_name(data)
    reloaded = io.load(out)
    assert isinstance(reloaded.graph.initializers["w"].const_value, ir.ExternalTensor)


def test_save_refuses_protected_files_and_leaves_them_alone(tmp_path: Path, conv_bn_path: Path) -> None:
    before = conv_bn_path.read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        io.save(io.load(conv_bn_path), conv_bn_path, protect={conv_bn_path})
    assert conv_bn_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx"]


def test_save_never_overwrites_memory_mapped_data(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    model = io.load(path)
    before = (tmp_path / "ext.data").read_bytes()
    out = io.save(model, tmp_path / "other.onnx", external_data="ext.data", protect=io.external_data_files(model))
    # The data goes to a fresh name; the input's ext.data, still memory-mapped, is untouched.
    assert (tmp_path / "ext.data").read_bytes() == before
    assert io.input_files(out) - {out.resolve()} == set(tmp_path.glob("ext.nf-*.data"))


def test_failed_save_leaves_nothing(tmp_path: Path, conv_bn_path: Path, monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "_save_single_file", explode)
    with pytest.raises(OSError):
        io.save(io.load(conv_bn_path), tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx"]


def test_save_into_missing_folder(tmp_path: Path, conv_bn_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        io.save(io.load(conv_bn_path), tmp_path / "nope" / "out.onnx")
