"""onnxruntime sessions with graph optimizations off, so the runtime cannot hide a wrong graph.

onnxruntime re-fuses and constant-folds at session creation; a graph with a wrong fold can
still produce right numbers under ``ORT_ENABLE_ALL``. Every numerical check in normfold (and
in its tests) goes through :func:`session`, which disables all of it.
"""

from __future__ import annotations

__all__ = ["session", "run"]

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from normfold.errors import InputError, first_line
from normfold.io import EXTERNAL_DATA_THRESHOLD, ModelLike, standalone_proto, tensor_bytes


def session(model: ModelLike, *, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``; ``optimize=False`` means ``ORT_DISABLE_ALL``.

    Models over 2 GB are handed to onnxruntime through a temporary folder (protobuf cannot
    carry them in memory); from a path, the file is opened where it lies.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    label = str(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), options, providers=providers)
        if isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
            proto = standalone_proto(model)
            return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="normfold-ort-") as folder:
            path = Path(folder) / "model.onnx"
            ir.save(model, path, external_data="model.data")
            # onnxruntime reads the external data while it builds the session.
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise InputError(f"{label}: onnxruntime cannot load the model: {first_line(error)}") from None


def run(model: ModelLike | ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` once on ``feeds``; returns every output by name."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [output.name for output in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))
