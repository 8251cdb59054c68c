"""Load models into onnx_ir and save them back, safely.

Loading accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. From a path, external
data stays on disk and is memory-mapped on first use (onnx_ir's ``ExternalTensor``); before
anything reads it, every external location is checked to lie inside the model's folder, so a
model cannot make normfold read ``../../etc/shadow`` or follow a link out of its folder.

Saving is atomic: every file is written into a staging folder next to the target and renamed
into place only when all of them are complete, the model last (:mod:`normfold.files`), so a
failed or interrupted save leaves the old OUT with its old data (or nothing) behind. Models whose tensors exceed ``EXTERNAL_DATA_THRESHOLD`` bytes
are written with one external data file, since a protobuf cannot exceed 2 GB; their tensors
are streamed to it one at a time. Smaller models stay one file unless a data file is asked for.

Nothing here reads a weight it does not have to: :func:`tensor_bytes` counts from shapes,
:func:`weightless_proto` hands onnx's C++ tools (checker, shape inference) the graph without
the weights' data.
"""

from __future__ import annotations

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "ModelLike",
    "check",
    "check_target",
    "external_data_files",
    "input_files",
    "load",
    "nbytes",
    "read_proto",
    "save",
    "standalone_proto",
    "tensor_bytes",
    "to_proto",
    "weightless_proto",
]

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, Message

from normfold import files, ort_contrib
from normfold.errors import InputError, first_line
from normfold.files import check_target
from normfold.quiet import quiet_loggers

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model]

# Protobuf's hard limit is 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Initializers up to this size keep their data in a weightless proto.
_INLINE_BYTES = 1 << 16

# Op domains onnxruntime's CPU provider knows; anything else must be defined as a model function.
_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values())

_KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


def load(source: ModelLike, *, check: bool = True) -> ir.Model:
    """Return ``source`` as an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as it is (not copied). Every tensor is checked before anything
    reads it (:func:`_check_tensors`) and sparse tensors become dense ones. With ``check``, the
    model must pass ``onnx.checker`` and use only op domains the runtime knows; every problem
    raises :class:`InputError` with a one-line message naming the file.
    """
    if isinstance(source, ir.Model):
        if check:
            _check_domains(source, "<model>")
        return source
    if isinstance(source, onnx.ModelProto):
        return _deserialize(_prepared(source, None), source, "<ModelProto>", check)
    path = Path(source)
    proto = _parsed_earlier(path) or read_proto(path)
    model = _deserialize(_prepared(proto, path), path, str(path), check)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def read_proto(path: Path) -> onnx.ModelProto:
    """The model file at ``path`` parsed, its external data not read (``InputError`` if it is
    no ONNX model)."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as error:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(error)})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version in the file)")
    return proto


def input_files(path: str | os.PathLike) -> set[Path]:
    """The files loading the model at ``path`` reads: the model and its external data
    (resolved), every location checked as :func:`load` checks it."""
    path = Path(path)
    proto = read_proto(path)
    found = {path.resolve(), *_check_tensors(proto, path)}
    # A CLI job checks its paths and then loads the same file: keep the parse (a large model's
    # takes a tenth of a second) for that load to take.
    global _PARSED
    _PARSED = (_file_key(path), proto)
    return found


# The proto :func:`input_files` parsed last, with :func:`_file_key` of its file; :func:`load`
# takes it (a load may change the proto: it is handed out once).
_PARSED: tuple[tuple[object, ...], onnx.ModelProto] | None = None


def _file_key(path: Path) -> tuple[object, ...]:
    """What identifies the file's current content: its resolved path and identity, size and
    modification time (a rewrite changes the time, a replacement the inode)."""
    stat = path.stat()
    return (path.resolve(), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _parsed_earlier(path: Path) -> onnx.ModelProto | None:
    """The proto :func:`input_files` parsed from ``path`` if the file is unchanged since, once."""
    global _PARSED
    if _PARSED is None or not path.is_file():
        return None
    key, proto = _PARSED
    _PARSED = None
    return proto if key == _file_key(path) else None


def _prepared(proto: onnx.ModelProto, path: Path | None) -> onnx.ModelProto:
    """``proto`` checked tensor by tensor, with sparse tensors made dense (on a copy: a caller's
    proto is never changed)."""
    label = str(path) if path is not None else "<ModelProto>"
    _check_tensors(proto, path)
    _check_declared_dims(proto, label)
    external_attributes = [t for t in _attribute_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if _has_sparse(proto) or external_attributes:
        if path is None:
            proto = onnx.ModelProto.FromString(proto.SerializeToString())
        folder = path.parent if path is not None else None
        _densify_sparse(proto, folder, label)
        _inline_attribute_data(proto, folder, label)
    return proto


def _inline_attribute_data(proto: onnx.ModelProto, folder: Path | None, label: str) -> None:
    """Read the external data of attribute tensors (a ``Constant``'s value) into the proto.

    onnx_ir keeps only initializers memory-mapped, and onnx's checker, handed the graph in
    memory, would look for an attribute's data file in the working directory. Their locations
    are checked already (:func:`_check_tensors`); one over ``EXTERNAL_DATA_THRESHOLD`` bytes is
    refused.
    """
    for tensor in _attribute_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        length = int(next((e.value for e in tensor.external_data if e.key == "length"), "0") or 0)
        if length > EXTERNAL_DATA_THRESHOLD:
            raise InputError(f"{label}: attribute tensor {tensor.name!r} holds {length} bytes of external data (refused)")
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _deserialize(proto: onnx.ModelProto, source: onnx.ModelProto | Path, label: str, check: bool) -> ir.Model:
    """``proto`` as an IR model; with ``check``, checked by ``onnx.checker`` and for its op domains.

    The checker runs on the graph without its large weights (:func:`weightless_proto`): handed
    the file, it would parse the whole model a second time (for a 440 MB BERT, 0.5 s and as much
    memory again). What it would have checked of those weights, that each holds as much data as
    its shape says, :func:`_check_tensors` checks before (and what onnx_ir would silently
    repair, :func:`_check_unique_initializers`). The check is the full one (strict shape inference). A graph that fails the checker is
    checked again with onnxruntime's ONNX-domain contrib ops opaque, if it has any (else the
    first failure stands).

    The parsed proto itself is checked first, its large weights declared as inputs the way
    :func:`weightless_proto` declares them (:func:`_weightless_copy`; serializing the model back
    cost 0.04 s of the 150 M LLaMA's load). Only when that fails (or the graph has subgraphs,
    whose weights it does not move) is the model checked as above.
    """
    if not check:
        return _to_ir(proto, label)
    _check_unique_initializers(proto, label)
    # onnx_ir's warnings about what is wrong with a graph that fails the checker would repeat
    # the one-line error.
    with quiet_loggers("onnx_ir"):
        model = _to_ir(proto, label)
    light = _weightless_copy(proto)
    try:
        if light is None:
            raise InputError(label)
        _run_checker(light, label, full_check=True)
    except InputError:
        pass
    else:
        _check_domains(model, label)
        return model
    try:
        _run_checker(weightless_proto(model), label, full_check=True)
    except InputError:
        with ort_contrib.checkable(model) as opaque:
            if not opaque:
                raise
            _run_checker(weightless_proto(model), label, full_check=True)
    _check_domains(model, label)
    return model


def _to_ir(proto: onnx.ModelProto, label: str) -> ir.Model:
    """Deserialize; what onnx_ir cannot (two writers of a value, unknown types) is bad input."""
    try:
        return ir.serde.deserialize_model(proto)
    except (ir.serde.SerdeError, ValueError, TypeError) as error:
        cause: BaseException = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise InputError(f"{label}: not a valid ONNX graph: {first_line(cause)}") from None


def _has_sparse(proto: onnx.ModelProto) -> bool:
    return any(
        attribute.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
        for graph in _graphs(proto) for node in graph.node for attribute in node.attribute
    ) or any(graph.sparse_initializer for graph in _graphs(proto)) or any(
        attribute.type == onnx.AttributeProto.SPARSE_TENSOR
        for function in proto.functions for node in function.node for attribute in node.attribute
    )


def check(model: ir.Model, label: str, *, full_check: bool = False) -> None:
    """Run ``onnx.checker`` on ``model`` without reading its weights.

    onnxruntime's ONNX-domain contrib ops (:mod:`normfold.ort_contrib`) are checked as opaque
    ops. ``full_check`` adds strict shape inference. Raises :class:`InputError` naming ``label``.
    """
    with ort_contrib.checkable(model):
        proto = weightless_proto(model)
    _run_checker(proto, label, full_check=full_check)


def _run_checker(model: onnx.ModelProto | str, label: str, *, full_check: bool = False) -> None:
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        raise InputError(f"{label}: fails onnx.checker: {first_line(error)}") from None


def weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` serialized without its weights' data, for onnx's in-memory C++ tools.

    ``onnx.checker`` (and ``onnx.shape_inference``) on a proto in memory can neither resolve
    external data (they look for it in the working directory) nor take a proto over 2 GB, and
    serializing the weights would read them all. So every initializer whose data lies in a file
    or exceeds ``_INLINE_BYTES`` is declared as an input of the main graph with its type and
    shape instead: the checker still sees its name, type, shape and every use; only its bytes
    go unchecked, and they are never read. Linear in the model's size. ``model`` is changed
    while it is serialized and restored (initializer order included) before this returns.
    """
    graphs = list(model.graphs())
    originals = [list(graph.initializers.values()) for graph in graphs]
    main = model.graph
    inputs = list(main.inputs)
    declared = {id(value) for value in inputs}
    try:
        for graph, values in zip(graphs, originals):
            for value in values:
                tensor = value.const_value
                if tensor is None or (
                    not isinstance(tensor, ir.ExternalTensor) and nbytes(tensor) <= _INLINE_BYTES
                ):
                    continue
                value.dtype = value.dtype or tensor.dtype
                value.shape = value.shape or ir.Shape(tensor.shape)
                del graph.initializers[value.name]
                if id(value) not in declared:
                    main.inputs.append(value)
        return ir.to_proto(model)
    finally:
        main.inputs.clear()
        for graph in graphs:
            graph.initializers.clear()
        main.inputs.extend(inputs)
        for graph, values in zip(graphs, originals):
            for value in values:
                graph.initializers.add(value)


def _weightless_copy(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``proto`` in which every initializer :func:`weightless_proto` would declare as a
    graph input (data in a file, or over ``_INLINE_BYTES``, here by its serialized size, which
    reads no data) is declared so instead, with its type and shape; no such weight's data is
    copied. None when the graph has subgraphs."""
    graph = proto.graph
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(attribute.type in subgraph for node in graph.node for attribute in node.attribute):
        return None
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip="graph")
    _copy_fields(graph, light.graph, skip="initializer")
    declared = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= _INLINE_BYTES:
            light.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light


def _copy_fields(source: Message, target: Message, *, skip: str) -> None:
    """Copy every field ``source`` has set into ``target``, but ``skip``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif not isinstance(value, (str, bytes)) and hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        else:
            setattr(target, field.name, value)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model``; external tensors stay references to their files."""
    return ir.serde.serialize_model(model)


def external_data_files(model: ir.Model) -> set[Path]:
    """The files the model's external tensors live in (resolved paths)."""
    files: set[Path] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return files


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: str | None = None,
    protect: set[Path] | frozenset[Path] = frozenset(),
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically, with its data file if any, and return the path.

    ``external_data`` names the data file next to ``path`` (default ``<stem>.data`` when the
    tensors exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes or some are still mapped from the
    input's external data, else one file); each save writes it
    under a fresh name, ``w.data`` -> ``w.nf-1a2b3c4d.data``, so that OUT and its data switch
    together (:class:`normfold.files.Staging`): the model's rename is the commit point, and the
    data files normfold wrote for the replaced OUT are removed after it. Files in ``protect``
    (an input model and the data it memory-maps) are never overwritten: asking to raises
    :class:`InputError` before anything is written. Tensors are streamed to the data file one
    at a time (memory-mapped ones are copied from their file, never all held at once);
    ``progress`` is called with the bytes of each tensor written.
    """
    target = check_target(path)
    if external_data is None and (tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD or external_data_files(model)):
        # An input kept with external data keeps that layout: one file would have to hold every
        # weight in memory as a protobuf (a 0.6 GB LLaMA: 2.5 GB peak, 2 s) for no gain.
        external_data = target.stem + ".data"
    if external_data is not None and (Path(external_data).name != external_data or external_data in ("", ".", "..")):
        raise InputError(f"{external_data}: the external data name must be a plain file name")
    if any(files.same_file(target, Path(p)) for p in protect):
        raise InputError(f"{target}: refusing to overwrite the input model or its data")
    data_name = files.fresh_data_name(external_data) if external_data else None
    with files.Staging(target) as staging, files.writing(target):
        staged = staging.folder / target.name
        written = 0

        def count(tensor: ir.TensorProtocol, _: object) -> None:
            nonlocal written
            written += nbytes(tensor)
            progress(nbytes(tensor))

        if data_name:
            ir.save(model, staged, external_data=data_name, callback=None if progress is None else count)
        else:
            _save_single_file(model, staged)
        if progress is not None:
            # Tensors written into the model file itself (small ones, or all of a single file).
            progress(tensor_bytes(model) - written)
        staging.commit([data_name] if data_name else [], lambda: _replaced_data(target, protect))
    return target


def _replaced_data(target: Path, protect: set[Path] | frozenset[Path]) -> set[str]:
    """The data files of the OUT about to be replaced that normfold wrote (fresh names, in its
    folder, not an input's): they go once the new model is in place. An OUT that is no ONNX
    model, or reads none, has none."""
    try:
        if not any(files.is_fresh_data_name(entry.name) for entry in os.scandir(target.parent)):
            # No data file normfold wrote is there to remove: OUT need not be parsed (a large
            # single-file OUT takes a tenth of a second and more).
            return set()
    except OSError:
        pass  # the folder cannot be listed: read OUT itself
    try:
        proto = onnx.load(str(target), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever OUT holds now, it is being replaced
        return set()
    names = set()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        data = target.parent / location
        if (
            Path(location).name == location
            and files.is_fresh_data_name(location)
            and not any(files.same_file(data, Path(p)) for p in protect)
        ):
            names.add(location)
    return names


def standalone_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` with every external tensor read into the proto (< 2 GB models).

    The model itself is left as it is: its external tensors stay memory-mapped references.
    """
    copy = model.clone()  # shares tensors, so this copies no weights
    ir.external_data.load_to_model(copy)
    return ir.to_proto(copy)


def _save_single_file(model: ir.Model, path: Path) -> None:
    with open(path, "wb") as file:
        file.write(standalone_proto(model).SerializeToString())


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers (external ones included, not read)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += nbytes(value.const_value)
    return total


def nbytes(tensor: ir.TensorProtocol) -> int:
    """The tensor's size in bytes; a string tensor counts its strings' bytes (onnx_ir's
    ``nbytes`` has no answer for strings)."""
    if tensor.dtype == ir.DataType.STRING:
        return sum(len(item) for item in tensor.numpy().ravel())
    return tensor.nbytes


def _check_tensors(proto: onnx.ModelProto, path: Path | None) -> set[Path]:
    """Check every tensor the model holds before anything reads one; return the data files.

    Every tensor counts, wherever it sits: initializers and sparse initializers, TENSOR, TENSORS
    and SPARSE_TENSOR(S) attributes, in the main graph, its subgraphs and model-local functions.
    Dims must be non-negative, the data type known, inline ``raw_data`` exactly as long as the
    shape says. External data must name a regular file inside the model's folder (no ``..``, no
    absolute path, no link out of it) with numeric offset and length that the file covers.
    """
    label = str(path) if path is not None else "<ModelProto>"
    folder = path.parent.resolve() if path is not None else None
    files: set[Path] = set()
    # Each data file is looked at once (its place, its size), however many tensors it holds.
    checked: dict[str, tuple[Path, int]] = {}
    for tensor in _all_tensors(proto):
        where = f"{label}: tensor {tensor.name!r}"
        if any(dim < 0 for dim in tensor.dims):
            raise InputError(f"{where}: negative dim in shape {list(tensor.dims)}")
        if tensor.data_type not in _DATA_TYPES or tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise InputError(f"{where}: unknown data type {tensor.data_type}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if folder is None:
                raise InputError(f"{where}: external data in a model given without its path")
            files.add(_check_location(tensor, folder, where, checked))
        else:
            _check_data_size(tensor, where)
    return files


def _check_data_size(tensor: onnx.TensorProto, where: str) -> None:
    """The tensor holds as much data as its shape says: raw bytes, or one typed value per
    element (sub-byte types pack several into a typed value and are left to the reader)."""
    elements = math.prod(tensor.dims)
    kind = onnx.TensorProto.DataType.Name(tensor.data_type)
    if tensor.data_type == onnx.TensorProto.STRING:
        held, wanted, unit = len(tensor.string_data), elements, "strings"
    elif tensor.HasField("raw_data"):
        bits = ir.DataType(tensor.data_type).bitwidth
        held, wanted, unit = len(tensor.raw_data), (elements * bits + 7) // 8, "bytes"
    elif ir.DataType(tensor.data_type).bitwidth >= 8:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        complex_ = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
        held, wanted, unit = len(getattr(tensor, field)), elements * (2 if complex_ else 1), "values"
    else:
        return
    if held != wanted:
        raise InputError(f"{where}: shape {list(tensor.dims)} of {kind} needs {wanted} {unit} but the tensor holds {held}")


def _check_location(
    tensor: onnx.TensorProto, folder: Path, where: str, checked: dict[str, tuple[Path, int]]
) -> Path:
    """The data file of ``tensor`` (resolved), checked; ``checked`` holds the files already
    checked (by location: resolved path and size)."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    where = f"{where} external data {location!r}"
    if location not in checked:
        checked[location] = _check_data_file(location, folder, where)
    resolved, size = checked[location]
    numbers = {}
    for key in ("offset", "length"):
        text = entries.get(key, "0")
        if not text.isascii() or not text.isdigit():
            raise InputError(f"{where}: {key} {text!r} is not a non-negative integer")
        numbers[key] = int(text)
    end = numbers["offset"] + numbers["length"]
    if end > size:
        raise InputError(f"{where}: needs {end} bytes but the file holds {size}")
    return resolved


def _check_data_file(location: str, folder: Path, where: str) -> tuple[Path, int]:
    """An external data location: a regular file inside ``folder``; its resolved path and size."""
    if not location:
        raise InputError(f"{where}: no location given")
    if "\0" in location:
        raise InputError(f"{where}: a NUL byte in the location (refused, not read)")
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise InputError(f"{where}: points outside the model's folder (refused, not read)")
    data = folder / location
    if data.is_symlink() or not data.resolve().is_relative_to(folder):
        raise InputError(f"{where}: is a link or leaves the model's folder (refused, not read)")
    if not data.is_file():
        raise InputError(f"{where}: missing external data file {data}")
    return data.resolve(), data.stat().st_size


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.ref_attr_name:  # a function body's reference to its caller's attribute
            continue
        kind = attribute.type
        if kind == onnx.AttributeProto.TENSOR:
            yield attribute.t
        elif kind == onnx.AttributeProto.TENSORS:
            yield from attribute.tensors
        elif kind == onnx.AttributeProto.SPARSE_TENSOR:
            yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
        elif kind == onnx.AttributeProto.SPARSE_TENSORS:
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
        elif kind == onnx.AttributeProto.GRAPH:
            yield from _graph_tensors(attribute.g)
        elif kind == onnx.AttributeProto.GRAPHS:
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def _attribute_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The TENSOR and TENSORS attributes of every node (main graph, subgraphs, functions)."""
    nodes = [node for graph in _graphs(proto) for node in graph.node]
    nodes += [node for function in proto.functions for node in function.node]
    for node in nodes:
        for attribute in node.attribute:
            if attribute.ref_attr_name:
                continue
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from attribute.tensors


def _graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph, in model-local functions too."""
    pending = [proto.graph]
    nodes = [node for function in proto.functions for node in function.node]
    while pending or nodes:
        if pending:
            graph = pending.pop()
            yield graph
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                pending.append(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                pending.extend(attribute.graphs)


def _check_unique_initializers(proto: onnx.ModelProto, label: str) -> None:
    """An initializer name given twice in one graph fails the checker; onnx_ir would silently
    keep the last, so the checker on the deserialized graph cannot see it."""
    for graph in _graphs(proto):
        names = [tensor.name for tensor in graph.initializer]
        names += [sparse.values.name for sparse in graph.sparse_initializer]
        if len(names) != len(set(names)):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise InputError(f"{label}: fails onnx.checker: initializer {twice[0]!r} is given twice in graph {graph.name!r}")


def _check_declared_dims(proto: onnx.ModelProto, label: str) -> None:
    """No graph input, output or value may declare a negative dim (numpy would fail on it later)."""
    for graph in _graphs(proto):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if not info.type.HasField("tensor_type"):
                continue
            dims = info.type.tensor_type.shape.dim
            if any(dim.HasField("dim_value") and dim.dim_value < 0 for dim in dims):
                shape = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?" for dim in dims]
                raise InputError(f"{label}: value {info.name!r} declares a negative dim in shape {shape}")


def _densify_sparse(proto: onnx.ModelProto, folder: Path | None, label: str) -> None:
    """Replace sparse initializers and ``Constant(sparse_value=…)`` by their dense tensors.

    onnx_ir holds neither; a sparse tensor means exactly its dense form, so the model computes
    the same. A dense form over ``EXTERNAL_DATA_THRESHOLD`` bytes is refused with its size.
    """
    for graph in _graphs(proto):
        for sparse in graph.sparse_initializer:
            graph.initializer.append(_dense(sparse, folder, label))
        del graph.sparse_initializer[:]
    nodes = [node for graph in _graphs(proto) for node in graph.node]
    nodes += [node for function in proto.functions for node in function.node]
    for node in nodes:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attribute in node.attribute:
            if attribute.name == "sparse_value":
                dense = _dense(attribute.sparse_tensor, folder, label)
                attribute.CopyFrom(onnx.helper.make_attribute("value", dense))


def _dense(sparse: onnx.SparseTensorProto, folder: Path | None, label: str) -> onnx.TensorProto:
    name = sparse.values.name
    shape = tuple(sparse.dims)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(sparse.values.data_type)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        raise InputError(f"{label}: sparse tensor {name!r} of shape {list(shape)} densifies to {nbytes} bytes (refused)")
    base = str(folder) if folder is not None else ""
    try:
        values = onnx.numpy_helper.to_array(sparse.values, base)
        indices = onnx.numpy_helper.to_array(sparse.indices, base).astype(np.int64)
        dense = np.zeros(math.prod(shape), dtype=dtype)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), shape)
        dense[flat] = values.reshape(-1)
    except (ValueError, IndexError, TypeError) as error:
        raise InputError(f"{label}: sparse tensor {name!r} is inconsistent: {first_line(error)}") from None
    return onnx.numpy_helper.from_array(dense.reshape(shape), name)


def _check_domains(model: ir.Model, label: str) -> None:
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _KNOWN_DOMAINS and (node.domain, node.op_type) not in functions:
            raise InputError(
                f"{label}: node {node.name!r} uses op {node.op_type!r} of unknown domain "
                f"{node.domain!r}, which onnxruntime cannot run"
            )
