"""Load models into onnx_ir and save them back, safely.

Loading accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. From a path, external
data stays on disk and is memory-mapped on first use (onnx_ir's ``ExternalTensor``); before
anything reads it, every external location is checked to lie inside the model's folder, so a
model cannot make normfold read ``../../etc/shadow`` or follow a link out of its folder.

Saving is atomic: every file is written into a fresh temporary folder next to the target and
renamed into place only when all of them are complete, so a failed or interrupted save leaves
the old OUT (or nothing) behind. Models whose tensors exceed ``EXTERNAL_DATA_THRESHOLD`` bytes
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
    "check_model",
    "check_target",
    "external_data_files",
    "load",
    "save",
    "standalone_proto",
    "tensor_bytes",
    "to_proto",
    "weightless_proto",
]

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from normfold import ort_contrib
from normfold.errors import InputError, first_line
from normfold.quiet import quiet_loggers

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model]

# Protobuf's hard limit is 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Initializers up to this size keep their data in a weightless proto.
_INLINE_BYTES = 1 << 16

# Op domains onnxruntime's CPU provider knows; anything else must be defined as a model function.
_KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


def load(source: ModelLike, *, check: bool = True) -> ir.Model:
    """Return ``source`` as an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as it is (not copied). With ``check``, the model must pass
    ``onnx.checker`` and use only op domains the runtime knows; every problem raises
    :class:`InputError` with a one-line message naming the file.
    """
    if isinstance(source, ir.Model):
        if check:
            _check_domains(source, "<model>")
        return source
    if isinstance(source, onnx.ModelProto):
        return _deserialize(source, source, "<ModelProto>", check)
    path = Path(source)
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
    _check_external_locations(proto, path)
    model = _deserialize(proto, path, str(path), check)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def _deserialize(proto: onnx.ModelProto, source: onnx.ModelProto | Path, label: str, check: bool) -> ir.Model:
    """``proto`` as an IR model; with ``check``, checked by ``onnx.checker`` and for its op domains.

    The checker runs on the graph without its large weights (:func:`weightless_proto`): handed
    the file, it would parse the whole model a second time (for a 440 MB BERT, 0.5 s and as much
    memory again). What it would have checked of those weights, that each holds as much data as
    its shape says, :func:`_check_tensor_data` checks here. A graph that fails the checker is
    checked again with onnxruntime's ONNX-domain contrib ops opaque, if it has any (else the
    first failure stands).
    """
    if not check:
        return ir.serde.deserialize_model(proto)
    _check_tensor_data(proto, label)
    # onnx_ir's warnings about what is wrong with a graph that fails the checker would repeat
    # the one-line error.
    with quiet_loggers("onnx_ir"):
        model = ir.serde.deserialize_model(proto)
    try:
        _run_checker(weightless_proto(model), label)
    except InputError:
        with ort_contrib.checkable(model) as opaque:
            if not opaque:
                raise
            _run_checker(weightless_proto(model), label)
    _check_domains(model, label)
    return model


def _check_tensor_data(proto: onnx.ModelProto, label: str) -> None:
    """Every tensor stored in the file holds as much data as its shape says (raw bytes, or one
    typed value per element; sub-byte types pack several into a typed value and are left to
    the checker or to the read)."""
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            itemsize = ir.DataType(tensor.data_type).itemsize
        except (ValueError, TypeError):
            continue  # strings, undefined: the checker's, or the reader's, to refuse
        elements = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            held, wanted, unit = len(tensor.raw_data), math.ceil(elements * itemsize), "bytes"
        elif itemsize >= 1:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            complex_ = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
            held, wanted, unit = len(getattr(tensor, field)), elements * (2 if complex_ else 1), "values"
        else:
            continue
        if held != wanted:
            raise InputError(
                f"{label}: fails onnx.checker: tensor {tensor.name!r} of shape {list(tensor.dims)} "
                f"holds {held} {unit}, not {wanted}"
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
                    not isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _INLINE_BYTES
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
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data`` names the data file (next to ``path``); without it, a model whose tensors
    exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes gets ``<stem>.data``. Files in ``protect`` (an
    input model and the data it memory-maps) are never overwritten: asking to raises
    :class:`InputError` before anything is written. Tensors are streamed to the data file one
    at a time (memory-mapped ones are copied from their file, never all held at once);
    ``progress`` is called with the bytes of each tensor written.
    """
    target = check_target(path)
    folder = target.parent
    if external_data is None and tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        external_data = target.stem + ".data"
    if external_data is not None and (Path(external_data).name != external_data):
        raise InputError(f"{external_data}: the external data name must be a plain file name")
    outputs = [target] + ([folder / external_data] if external_data else [])
    protected = {p.resolve() for p in protect}
    for out in outputs:
        if out.resolve() in protected:
            raise InputError(f"{out}: refusing to overwrite the input model or its data")
    staging = Path(tempfile.mkdtemp(prefix=".normfold-", dir=folder))
    try:
        staged = staging / target.name
        written = 0

        def count(tensor: ir.TensorProtocol, _: object) -> None:
            nonlocal written
            written += tensor.nbytes
            progress(tensor.nbytes)

        if external_data:
            ir.save(model, staged, external_data=external_data, callback=None if progress is None else count)
        else:
            _save_single_file(model, staged)
        if progress is not None:
            # Tensors written into the model file itself (small ones, or all of a single file).
            progress(tensor_bytes(model) - written)
        # Data first: the model file becomes visible only once what it points to exists.
        for out in reversed(outputs):
            os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a file :func:`save` can write: its folder exists and it is not a folder.

    Raises :class:`InputError` otherwise; callers check before any work, so a bad path costs
    nothing.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: folder {folder} does not exist")
    if target.is_dir():
        raise InputError(f"{target}: is a folder")
    return target


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
                total += value.const_value.nbytes
    return total


def _check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        where = f"{path}: tensor {tensor.name!r} external data {location!r}"
        if not location:
            raise InputError(f"{where}: no location given")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(f"{where}: points outside the model's folder (refused, not read)")
        data = folder / location
        if data.is_symlink() or not data.resolve().is_relative_to(folder):
            raise InputError(f"{where}: is a link or leaves the model's folder (refused, not read)")
        if not data.is_file():
            raise InputError(f"{where}: missing external data file {data}")
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if end > data.stat().st_size:
            raise InputError(f"{where}: needs {end} bytes but the file holds {data.stat().st_size}")


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_tensors(subgraph)


def _check_domains(model: ir.Model, label: str) -> None:
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _KNOWN_DOMAINS and (node.domain, node.op_type) not in functions:
            raise InputError(
                f"{label}: node {node.name!r} uses op {node.op_type!r} of unknown domain "
                f"{node.domain!r}, which onnxruntime cannot run"
            )
