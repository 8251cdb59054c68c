"""onnxruntime sessions with graph optimizations off, so the runtime cannot hide a wrong graph.

onnxruntime re-fuses and constant-folds at session creation; a graph with a wrong fold can
still produce right numbers under ``ORT_ENABLE_ALL``. Every numerical check in normfold (and
in its tests) goes through :func:`session`, which disables all of it, weight pre-packing
included: pre-packing copies every MatMul weight into a second layout, which for a check of a
few runs costs more time and memory than it saves (measured on a 1.1 B-parameter LLaMA: a 10 s
session build and the weights held twice, against 0.1 s with the weights memory-mapped once).

An ``onnx_ir.Model`` reaches onnxruntime without its weights being read or copied: the proto
keeps its external tensors as references to their file, and onnxruntime is told the folder to
resolve them in (``session.model_external_initializers_file_folder_path``), where it maps them
into memory itself. Only when that cannot work (external data in more than one folder, or more
than ``EXTERNAL_DATA_THRESHOLD`` bytes of tensors in memory, which protobuf cannot carry) is
the model written to a temporary folder first.
"""

from __future__ import annotations

__all__ = ["LOG_SEVERITY", "ort_reason", "run", "session"]

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import InputError, first_line
from normfold.io import EXTERNAL_DATA_THRESHOLD, ModelLike, nbytes

# onnxruntime's own log lines: 4 is fatal only. Every error it raises reaches the user as
# normfold's one-line message; its C++ logger would print the same error again on stderr.
# ``normfold --debug`` lowers it to 2 (warnings).
LOG_SEVERITY = 4

if TYPE_CHECKING:
    import onnxruntime as ort

# onnxruntime is imported on the first session, not with this module: the passes import it
# (collapse measures with it), and `optimize --no-verify` never builds a session.

_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session(
    model: ModelLike,
    *,
    optimize: bool = False,
    threads: int = 0,
    prepack: bool | None = None,
    spinning: bool | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``.

    ``optimize=False`` means ``ORT_DISABLE_ALL`` and, unless ``prepack=True``, no weight
    pre-packing; ``optimize=True`` is what a user of onnxruntime gets by default
    (``ORT_ENABLE_ALL``, weights pre-packed unless ``prepack=False``). ``spinning`` (default:
    as ``optimize``) lets idle intra-op threads spin-wait for work, onnxruntime's default: a
    check that runs a model a few times gains nothing from it, and on a loaded machine the
    spinning threads take the cores from the working ones (ResNet-34, three runs: 2.2 s
    spinning, 1.35 s not). From a path, the file is opened where it lies.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if not (optimize if prepack is None else prepack):
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = threads
    if not (optimize if spinning is None else spinning):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = LOG_SEVERITY
    # Errors while a model is loaded go to the default logger, not the session's.
    ort.set_default_logger_severity(LOG_SEVERITY)
    providers = ["CPUExecutionProvider"]
    label = str(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), options, providers=providers)
        if isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        folder = _external_folder(model)
        if folder is not None:
            if folder:
                options.add_session_config_entry(_FOLDER_KEY, folder)
            proto = ir.to_proto(model)  # external tensors stay references to their file
            return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="normfold-ort-") as temporary:
            path = Path(temporary) / "model.onnx"
            ir.save(model, path, external_data="model.data")
            # onnxruntime reads the external data while it builds the session.
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise InputError(f"{label}: onnxruntime cannot load the model: {first_line(error)}") from None


def run(model: ModelLike | ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` once on ``feeds``; returns every output by name."""
    import onnxruntime as ort

    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [output.name for output in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def ort_reason(error: BaseException) -> str:
    """onnxruntime's own words for a failure: without its error-code preamble, the temporary
    path it loaded from, or the label :func:`session` puts before them."""
    text = first_line(error)
    for marker in ("failed:", "onnxruntime cannot load the model: ", "Status Message: "):
        text = text.split(marker, 1)[-1]
    return text.strip()


def _external_folder(model: ir.Model) -> str | None:
    """The one folder the model's external tensors lie in ("" when it has none), or None when
    the model cannot be handed over as a proto (several folders, too much data in memory)."""
    folders: set[str] = set()
    in_memory = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                folders.add(os.path.abspath(tensor.base_dir or "."))
            elif tensor is not None:
                in_memory += nbytes(tensor)
    if len(folders) > 1 or in_memory > EXTERNAL_DATA_THRESHOLD or (folders and not _has_folder_key()):
        return None
    return folders.pop() if folders else ""


def _has_folder_key() -> bool:
    """The folder option exists from onnxruntime 1.21 (microsoft/onnxruntime#23557); before, a
    proto handed over in memory resolves external data against the working directory."""
    import onnxruntime as ort

    return tuple(int(part) for part in ort.__version__.split(".")[:2]) >= (1, 21)
