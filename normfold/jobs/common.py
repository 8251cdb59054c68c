"""What the ``optimize`` and ``collapse`` jobs share: the input, the output check, the summary.

A job never changes what it was given: :func:`working_copy` validates the input and returns a
model the passes may change, and the reference verification runs against. :func:`check_output`
is the check every written graph must pass (``onnx.checker``, onnxruntime's ONNX-domain contrib
ops opaque); its failure is normfold's bug, not the user's, so it raises ``RuntimeError``.
:func:`summary` is the part of the report that describes a model (opset, node count, op
histogram), and :func:`protected_files` the files a save must never overwrite.
"""

from __future__ import annotations

__all__ = ["check_output", "protected_files", "source_label", "summary", "working_copy"]

import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from normfold import io
from normfold.errors import InputError, first_line
from normfold.opset import model_opset


def working_copy(source: io.ModelLike) -> tuple[ir.Model, io.ModelLike]:
    """A validated model the passes may change, and what verification should run as the reference."""
    if isinstance(source, ir.Model):
        io.load(source)  # validates
        return source.clone(), source
    if isinstance(source, onnx.ModelProto):
        return io.load(source), source
    path = Path(source)
    return io.load(path), path


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
