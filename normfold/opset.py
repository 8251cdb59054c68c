"""Raise a model's default-domain opset, exactly, so that a fused op can be emitted.

Rule. ``raise_opset(model, version)`` converts every node of the default domain to
``version`` in place:

- from opset 18 on, with onnxscript's version converter (works on the onnx_ir model itself, so
  weights are never copied or serialized): 18 -> 23 changes only the ops it has adapters for
  (GroupNormalization 20 -> 21 scale/bias per channel, DFT, GridSample); every other op keeps
  its meaning and only its version number moves;
- below 18, with onnx's C++ converter (``onnx.version_converter``), which rewrites what
  changed up to 18 (ReduceMean/ReduceSum axes from attribute to input, Split, Squeeze/
  Unsqueeze axes inputs at 13, ...). It works on a protobuf: it is handed
  :func:`~normfold.io.weightless_proto` (large weights declared as inputs, never read, so
  models over 2 GB convert), and the weights are put back on the converted graph by name. A
  model with subgraphs or model-local functions goes through onnxscript's fallback to the same
  converter instead (it inlines the functions first), which lifts the weights itself in a scan
  quadratic in their number.

Both were checked on every zoo model exported with TorchScript at opsets 13, 14 and 17 and with
dynamo at 18, raised to 17, 21 and 23: onnxruntime (optimizations off) gives bit-identical
outputs before and after, and the results pass ``onnx.checker`` with full shape inference.

Any adapter failure — onnxscript logs and skips a node it cannot convert, onnx's converter
raises — and any ``onnx.checker`` failure of the result raises :class:`NormfoldError`; the
model is left converted only when all of it converted. A version at or below the model's
current one is a no-op; lowering is never done.
"""

from __future__ import annotations

__all__ = ["model_opset", "raise_opset"]

import contextlib
import logging
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from onnxscript import version_converter

from normfold.errors import NormfoldError, first_line
from normfold.io import weightless_proto

_CONVERTER_LOGGER = "onnxscript.version_converter"


def model_opset(model: ir.Model) -> int:
    """The model's default-domain opset (``ai.onnx`` counts as the default domain)."""
    imports = model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # The converter also logs, as a warning, that it hands opsets below 18 to onnx's.
        if "Skipping" in message or "Failed" in message:
            self.messages.append(message)


@contextlib.contextmanager
def _converter_warnings() -> Iterator[_Collect]:
    """Collect what onnxscript's converter logs: it reports skipped nodes only there."""
    logger = logging.getLogger(_CONVERTER_LOGGER)
    handler = _Collect()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def raise_opset(model: ir.Model, version: int, *, proto: onnx.ModelProto | None = None) -> bool:
    """Convert ``model`` in place to default-domain opset ``version``; return whether it changed.

    The conversion runs on a copy (which shares the weights), so a failure leaves ``model``
    as it was. ``proto`` is the model's :func:`~normfold.io.weightless_proto` when the caller
    holds one that describes it as it is (onnx's converter is then handed that one instead of
    serializing the model again).
    """
    current = model_opset(model)
    if version <= current:
        return False
    problem = f"cannot convert opset {current} to {version}"
    if current < 18 and not model.functions and len(list(model.graphs())) == 1:
        converted, checkable = _convert_weightless(model, version, problem, proto)
    else:
        converted = model.clone()
        with _converter_warnings() as log:
            try:
                version_converter.convert_version(converted, target_version=version, fallback=True)
            except Exception as error:  # converters raise many untyped errors
                raise NormfoldError(f"{problem}: {first_line(error)}") from None
        if log.messages:
            raise NormfoldError(f"{problem}: {log.messages[0]}")
        # Weights stay unread: external data cannot be resolved from memory, nor protos over 2 GB.
        checkable = weightless_proto(converted)
    if model_opset(converted) != version:
        raise NormfoldError(f"{problem}: the converter left opset {model_opset(converted)}")
    try:
        onnx.checker.check_model(checkable, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        raise NormfoldError(f"{problem}: the result fails onnx.checker: {first_line(error)}") from None
    model.graph = converted.graph
    model.functions.clear()
    model.functions.update(converted.functions)
    return True


def _convert_weightless(
    model: ir.Model, version: int, problem: str, proto: onnx.ModelProto | None
) -> tuple[ir.Model, onnx.ModelProto]:
    """``model`` (one graph, no functions) converted by onnx's C++ converter on its weightless
    proto (``proto``, else serialized here), as a new model holding the same weight tensors; and
    the converted proto to check."""
    try:
        proto = onnx.version_converter.convert_version(proto or weightless_proto(model), version)
        converted = ir.serde.deserialize_model(proto)
    except Exception as error:  # the converter raises many untyped errors
        raise NormfoldError(f"{problem}: {first_line(error)}") from None
    graph = converted.graph
    lifted = {name: value.const_value for name, value in model.graph.initializers.items() if name not in graph.initializers}
    by_name = {value.name: value for value in graph.inputs}
    missing = [name for name in (*lifted, *(v.name for v in model.graph.inputs)) if name not in by_name]
    if missing:
        raise NormfoldError(f"{problem}: the converter dropped graph input {missing[0]!r}")
    for name, tensor in lifted.items():
        by_name[name].const_value = tensor
        graph.register_initializer(by_name[name])
    # The weights were declared as inputs for the call; the interface is the model's own.
    graph.inputs.clear()
    graph.inputs.extend(by_name[value.name] for value in model.graph.inputs)
    return converted, proto
