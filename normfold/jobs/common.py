"""What the ``optimize`` and ``collapse`` jobs share: the input, the output check, the summary.

A job never changes what it was given: :func:`working_copy` validates the input and returns a
model the passes may change, and the reference verification runs against. :func:`check_output`
is the check every written graph must pass (``onnx.checker``, onnxruntime's ONNX-domain contrib
ops opaque); its failure is normfold's bug, not the user's, so it raises ``RuntimeError``.
:func:`summary` is the part of the report that describes a model (opset, node count, op
histogram), and :func:`protected_files` the files a save must never overwrite.
:func:`check_paths` is what every command checks of the paths it was given, before any work.
:func:`cyclic_gc_held` is how a job holds Python's cyclic garbage collector off while it works.
"""

from __future__ import annotations

__all__ = [
    "check_output",
    "check_paths",
    "cyclic_gc_held",
    "protected_files",
    "source_label",
    "summary",
    "working_copy",
]

import contextlib
import gc
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from normfold import files, io
from normfold.errors import InputError, first_line
from normfold.opset import model_opset


@contextlib.contextmanager
def cyclic_gc_held() -> Iterator[None]:
    """Hold Python's cyclic garbage collector off for the block (when it is on), then turn it
    back on; a caller that has it off keeps it off.

    Loading and the passes build and drop IR objects by the hundred thousand, and the collector,
    started by allocation counts, walks every object the process holds (the imported libraries'
    too) to find cycles that are, during a run, almost all alive: 0.03 s of the 0.42 s the 150 M
    LLaMA's load and passes take. Whatever the block drops is still freed at once by reference
    counting; only what it leaves in cycles (a graph an opset raise replaced) waits for the
    first collection after it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def working_copy(source: io.ModelLike) -> tuple[ir.Model, io.ModelLike]:
    """A validated model the passes may change, and what verification should run as the reference."""
    if isinstance(source, ir.Model):
        io.load(source)  # validates
        return source.clone(), source
    if isinstance(source, onnx.ModelProto):
        return io.load(source), source
    path = Path(source)
    return io.load(path), path


def check_paths(
    outputs: Mapping[str, str | os.PathLike | None],
    *,
    models: Iterable[str | os.PathLike | None] = (),
    inputs: Iterable[str | os.PathLike | None] = (),
    external_data: str | None = None,
) -> None:
    """Refuse, before any work, paths that would destroy an input or write where nothing may be.

    ``outputs`` maps each option to the path it writes (``{"-o": ..., "--report": ...}``; None
    when not given); ``external_data`` is the data file name next to ``-o``. ``models`` are
    ONNX inputs, each standing for itself and every external data file it reads; ``inputs``
    are other files read (``--inputs``, ``--calibration``). Every output must be writable
    (:func:`normfold.files.check_target`), and all outputs and inputs pairwise distinct files.
    Raises :class:`InputError` naming the paths.
    """
    written = [(flag, files.check_target(path)) for flag, path in outputs.items() if path is not None]
    if external_data is not None:
        if Path(external_data).name != external_data or external_data in (".", ".."):
            raise InputError(f"--external-data {external_data}: must be a plain file name (it is written next to -o)")
        out = dict(written)["-o"]
        written.append(("--external-data", out.parent / external_data))
    if not written:
        return
    read: list[tuple[str, Path]] = []
    for model in models:
        if model is not None and Path(model).is_file():
            read += [(f"input {model}" if file == Path(model).resolve() else f"external data of {model}", file)
                     for file in io.input_files(model)]
    read += [(f"input {path}", Path(path)) for path in inputs if path is not None and Path(path).exists()]
    for k, (flag, path) in enumerate(written):
        for other_flag, other in written[:k]:
            if files.same_file(path, other):
                raise InputError(f"{path}: {other_flag} and {flag} name the same file; give each its own")
        for what, other in read:
            if files.same_file(path, other):
                raise InputError(f"{path}: {flag} names the {what}; refusing to overwrite it")


def check_output(model: ir.Model, label: str) -> None:
    """Raise ``RuntimeError`` if the graph a job is about to hand back fails ``onnx.checker``."""
    try:
        io.check(model, label)
    except InputError as error:
        raise RuntimeError(f"normfold produced a graph that {first_line(error)}") from error


def protected_files(source: io.ModelLike, model: ir.Model) -> frozenset[Path]:
    """The input file and the external data files ``model`` still reads: never to be overwritten."""
    files = io.external_data_files(model)
    if isinstance(source, (str, os.PathLike)):
        files.add(Path(source).resolve())
    return frozenset(files)


def source_label(source: io.ModelLike) -> str:
    """How messages and reports name the input."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<ModelProto>" if isinstance(source, onnx.ModelProto) else "<onnx_ir.Model>"


def summary(model: ir.Model, when: str) -> dict[str, Any]:
    """``opset_<when>``, ``nodes_<when>``, ``ops_<when>`` (op histogram, most common first),
    ``weight_bytes_<when>`` (the initializers' bytes, counted from their shapes) and
    ``signature_<when>`` (each graph input, initializer-inputs included, and output as
    ``dtype[dims]``)."""
    ops = Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.all_nodes()
    )
    return {
        f"opset_{when}": model_opset(model),
        f"nodes_{when}": sum(ops.values()),
        f"ops_{when}": dict(ops.most_common()),
        f"weight_bytes_{when}": io.tensor_bytes(model),
        f"signature_{when}": {
            "inputs": {value.name: _signature(value) for value in model.graph.inputs},
            "outputs": {value.name: _signature(value) for value in model.graph.outputs},
        },
    }


def _signature(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    dims = "?" if value.shape is None else ",".join(
        "?" if isinstance(dim, ir.SymbolicDim) and dim.value is None else str(dim) for dim in value.shape
    )
    return f"{dtype}[{dims}]"
