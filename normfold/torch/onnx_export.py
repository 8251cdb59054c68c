"""From a torch module to a verified, optimized ONNX file in one call: :func:`export`.

The steps, for ``export(module, example_inputs, path, ...)``:

1. Checks before any work: ``path`` can be written (its folder exists), the example inputs are
   tensors (one, a tuple, or a dict of keyword arguments, HF-style), the dynamic axes name
   inputs and axes that exist, and **no submodule is in training mode**. A module in training
   mode is refused (:class:`InputError`: call ``.eval()``), not switched: switching the caller's
   module behind their back changes their object, and switching a copy would export and verify
   a module they did not hand over; Dropout and BatchNorm in training mode export their training
   behaviour, which no ONNX file can match.
2. ``fold_in_torch``: BatchNorm folded (:func:`normfold.torch.fold_batchnorm`, in float64) and
   hand-written norms replaced by torch's (:func:`normfold.torch.fuse_norms`) on a copy; the
   report holds both reports. The module itself is never changed.
3. The copy is exported with the chosen exporter (``"dynamo"``: torch.export-based, or
   ``"torchscript"``), quietly unless ``debug``: no warnings, log lines or prints. The dynamo
   exporter runs without its onnxscript optimizer unless ``exporter_options`` asks for it: that
   optimizer's default rewrite rules turn a LayerNorm's ``Add(x, 1e-12)`` into Identity
   (shared/TRAPS), and normfold's passes do the exact folds. An exporter's failure is an
   :class:`InputError` holding its own message, shortened to one line, and the line of the
   user's code it names. Every axis asked to be dynamic must be symbolic in the exported file.
4. The exported file goes through normfold's ``optimize`` (the Python API, verification off:
   the verification that counts is against torch, below).
5. Verification (unless ``verify=False``), against the **original module in eval mode**:
   inputs are generated from the exported graph's inputs by :func:`normfold.inputs.generate_inputs`
   (floats normal, token ids below the embedding's vocabulary, masks 0/1 with padding), shaped
   like the examples (``samples`` samples), and once more at each set of ``sizes``: by default
   every symbolic dim at 1 and then every one at its example size + 1 (2 and 3 for a dim whose
   example size is 1), so an axis the exporter baked in is caught. Both the exported and the
   optimized model run in onnxruntime with optimizations off, and their outputs are judged
   against the module's by :func:`normfold.verification.compare`: the tolerances and NaN/Inf
   rules of ``normfold verify``. A module that raises at one of the sizes is an
   :class:`InputError` (give ``sizes`` it accepts).
6. The optimized model is written atomically (:func:`normfold.io.save`) only if both
   comparisons passed at every size; otherwise :class:`ExportVerificationError` (a
   :class:`VerificationError`) names the first failing comparison (which output, how far, at
   which input sizes, whether the exporter or normfold's passes lost it) and holds the
   :class:`ExportResult` with the whole report; nothing is written.

The module's outputs are matched to the exported graph's outputs in order: tensors, tuples,
lists and dicts (a Hugging Face ``ModelOutput`` included) are flattened depth first, ``None``
skipped, as both exporters flatten them.
"""

from __future__ import annotations

__all__ = ["ExportResult", "ExportVerificationError", "export"]

import dataclasses
import inspect
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

import normfold
from normfold import io, runtime
from normfold.errors import InputError, VerificationError, first_line
from normfold.inputs import generate_inputs, model_inputs, resolve_dims
from normfold.quiet import silenced
from normfold.torch.fold import fold_batchnorm_with_report
from normfold.torch.fuse_norms import fuse_norms_with_report
from normfold.verification import VerificationReport, compare

Exporter = Literal["dynamo", "torchscript"]
Target = Literal["onnx", "onnxruntime"]
Sizes = dict[str, int]

_EXPORTERS = ("dynamo", "torchscript")
_QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir")
# Where torch.export's message names the user's line: '  File "m.py", line 10, in forward\n    code'.
_USER_LINE = re.compile(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


class ExportVerificationError(VerificationError):
    """The export or the optimized model does not compute what the module computes.

    ``result`` is the :class:`ExportResult` (``path`` None: nothing was written) with the whole
    report, so the comparisons at every size can be read.
    """

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class ExportResult:
    """What :func:`export` wrote and how it compares with the module.

    ``model`` is the written model (loaded from ``path``; its weights memory-mapped).
    ``export_checks`` and ``optimized_checks`` hold, per set of ``sizes``, the comparison of
    the exported and of the optimized model with the module (empty when not verified). From
    :class:`ExportVerificationError`, ``path`` and ``model`` are None: nothing was written.
    """

    path: Path | None
    report: dict[str, Any]
    model: ir.Model | None
    sizes: list[Sizes]
    export_checks: list[VerificationReport]
    optimized_checks: list[VerificationReport]

    @property
    def verified(self) -> bool:
        """Both comparisons ran and passed at every size."""
        checks = self.export_checks + self.optimized_checks
        return bool(checks) and all(check.passed for check in checks)

    def format_table(self) -> str:
        """A table for people: one row per set of sizes, both comparisons, then one summary line."""
        report = self.report
        passes = ", ".join(f"{p['name']} {p['applied']}" for p in report["optimize"]["passes"])
        optimized = report["optimize"]
        lines = [
            f"{report['module']} exported with {report['exporter']} (opset {optimized['opset_before']}), "
            f"optimized for target {report['target']} (opset {optimized['opset_after']}): "
            f"{optimized['nodes_before']} -> {optimized['nodes_after']} nodes ({passes})"
        ]
        if report["torch"] is not None:
            fold, fuse = report["torch"]["fold_batchnorm"], report["torch"]["fuse_norms"]
            lines.append(
                f"in torch first: {fold['applied']} BatchNorm folded, {len(fold['refused'])} refused; "
                f"{len(fuse['replaced'])} norm module(s) replaced"
            )
        if not self.sizes:
            lines.append("not verified (verify=False)")
            return "\n".join(lines)
        rows = [["sizes", "inputs", "export vs torch", "optimized vs torch"]]
        for sizes, exported, optimized_check in zip(self.sizes, self.export_checks, self.optimized_checks):
            rows.append([
                _sizes_text(sizes),
                ", ".join(f"{name} {_shape_text(shape)}" for name, shape in exported.input_shapes.items()),
                _check_text(exported),
                _check_text(optimized_check),
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        table.insert(1, "  ".join("-" * width for width in widths))
        lines.extend(table)
        if self.verified:
            lines.append(f"PASSED: wrote {self.path}" if self.path else "PASSED")
        else:
            lines.append(f"FAILED: {_failure(self)}")
        return "\n".join(lines)


def export(
    module: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    target: Target = "onnx",
    max_opset: int | None = None,
    passes: Sequence[str] | None = None,
    fold_in_torch: bool = True,
    verify: bool = True,
    sizes: Sequence[Mapping[str, int]] | None = None,
    samples: int = 3,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    external_data: str | None = None,
    exporter_options: Mapping[str, Any] | None = None,
    debug: bool = False,
) -> ExportResult:
    """Export ``module`` to ``path`` as an optimized ONNX file that is verified against it.

    See the module docstring for the steps. ``example_inputs``: one tensor, a tuple of
    positional tensors, or a dict of keyword tensors (``input_ids``, ``attention_mask``, ...).
    Inputs are named after ``forward``'s parameters (or ``input_names``); outputs ``output``,
    ``output_0``, ... or a dict's keys (or ``output_names``). Dynamic axes are given either as
    ``dynamic_shapes`` (torch.export's form: per input a dict axis -> name, ``Dim`` or
    ``Dim.AUTO``) or ``dynamic_axes`` (``{input: {axis: name}}`` or ``{input: [axes]}``); either
    works with both exporters. ``opset``: the exporter's opset (its default when None);
    ``target``, ``max_opset``, ``passes``: as ``normfold.optimize``. ``sizes``: the other sets
    of symbolic-dim sizes to verify at (``[{"batch": 1}, {"batch": 5}]``), default in the module
    docstring. ``samples``: samples at the example sizes (one more at each other set);
    ``rtol``/``atol``: as ``normfold verify``. ``exporter_options``: more keyword arguments for
    ``torch.onnx.export``. ``debug``: let the exporters talk.

    Raises :class:`InputError` (bad arguments, training mode, export failure, a module that
    fails at a size) or :class:`ExportVerificationError`; nothing is written then.
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if not isinstance(module, nn.Module):
        raise InputError(f"export takes a torch.nn.Module, not {type(module).__name__}")
    if exporter not in _EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; choose 'dynamo' or 'torchscript'")
    if target not in ("onnx", "onnxruntime"):
        raise InputError(f"unknown target {target!r}; choose 'onnx' or 'onnxruntime'")
    if dynamic_shapes is not None and dynamic_axes is not None:
        raise InputError("give dynamic_shapes or dynamic_axes, not both")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples {samples!r}: must be a positive integer")
    target_path = io.check_target(path)
    _refuse_training(module)
    inputs = _Inputs.of(module, example_inputs, input_names)
    try:
        with torch.inference_mode():
            example_outputs = _leaves(module(*inputs.args, **inputs.kwargs), "output")
    except Exception as error:  # any error of the user's module
        raise InputError(
            f"{type(module).__name__} fails on the example inputs ({type(error).__name__}: {first_line(error)})"
        ) from error
    outputs = list(output_names) if output_names is not None else [name for name, _ in example_outputs]
    if len(outputs) != len(example_outputs):
        raise InputError(f"output_names: {len(outputs)} name(s) for the module's {len(example_outputs)} output tensor(s)")
    axes = _requested_axes(inputs, outputs, dynamic_shapes, dynamic_axes)

    torch_report = None
    work = module
    if fold_in_torch:
        mark = time.perf_counter()
        work, torch_report = _fold_in_torch(module, inputs)
        seconds["fold"] = time.perf_counter() - mark

    with tempfile.TemporaryDirectory(prefix="normfold-export-") as temporary:
        exported_path = Path(temporary) / "exported.onnx"
        mark = time.perf_counter()
        _run_exporter(work, inputs, exported_path, exporter, opset, outputs, axes, dynamic_shapes, dynamic_axes,
                      exporter_options, debug)
        seconds["export"] = time.perf_counter() - mark
        exported = io.load(exported_path)
        _check_interface(exported, inputs, axes, len(outputs), exporter)

        mark = time.perf_counter()
        optimized = normfold.optimize(exported_path, passes=passes, target=target, max_opset=max_opset, verify=False)
        seconds["optimize"] = time.perf_counter() - mark

        size_sets: list[Sizes] = []
        export_checks: list[VerificationReport] = []
        optimized_checks: list[VerificationReport] = []
        if verify:
            mark = time.perf_counter()
            size_sets = _size_sets(exported, inputs, sizes)
            feeds = [_feeds(exported, sizes_, seeds) for sizes_, seeds in _seeded(size_sets, samples, seed)]
            references = [[_torch_outputs(module, inputs, sample, exported, sizes_) for sample in group]
                          for group, sizes_ in zip(feeds, size_sets)]
            export_checks = _checks(exported_path, feeds, references, rtol, atol)
            optimized_checks = _checks(optimized.model, feeds, references, rtol, atol)
            seconds["verify"] = time.perf_counter() - mark

        report: dict[str, Any] = {
            "module": type(module).__name__,
            "output": None,
            "exporter": exporter,
            "opset": optimized.report["opset_before"],
            "target": target,
            "inputs": {
                name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                       "dynamic": {str(axis): symbol for axis, symbol in sorted(axes.get(name, {}).items())}}
                for name, tensor in inputs.named()
            },
            "outputs": outputs,
            "torch": torch_report,
            "optimize": optimized.report,
            "checks": [
                {"sizes": sizes_, "export_vs_torch": exported_check.to_dict(),
                 "optimized_vs_torch": optimized_check.to_dict()}
                for sizes_, exported_check, optimized_check in zip(size_sets, export_checks, optimized_checks)
            ],
            "verified": False,
        }
        result = ExportResult(
            path=None, report=report, model=None, sizes=size_sets,
            export_checks=export_checks, optimized_checks=optimized_checks,
        )
        report["verified"] = result.verified
        if verify and not result.verified:
            raise ExportVerificationError(f"{target_path}: not written: {_failure(result)}", result)
        mark = time.perf_counter()
        result.path = optimized.save(target_path, external_data=external_data)
        seconds["save"] = time.perf_counter() - mark
    # From the written file: weights the optimized model still read from the export went with
    # the temporary folder.
    result.model = io.load(result.path)
    report["output"] = str(result.path)
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {name: round(value, 3) for name, value in seconds.items()}
    return result


# --- inputs --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Inputs:
    """The example inputs as ``forward``'s positional and keyword tensors, and their names."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    names: list[str]

    @classmethod
    def of(cls, module: nn.Module, example: Any, names: Sequence[str] | None) -> _Inputs:
        parameters = _forward_parameters(module)
        if isinstance(example, torch.Tensor):
            args, kwargs = (example,), {}
        elif isinstance(example, Mapping):
            keys = [key for key in example if not isinstance(key, str)]
            if keys:
                raise InputError(f"example_inputs: dict key {keys[0]!r} is not a string (keys are forward's arguments)")
            # Both exporters order keyword inputs as forward's signature does (torchscript
            # always, dynamo as given): give them in that order, the others after.
            order = {name: i for i, name in enumerate(parameters)}
            args, kwargs = (), dict(sorted(example.items(), key=lambda item: order.get(item[0], len(order))))
        elif isinstance(example, (tuple, list)):
            args, kwargs = tuple(example), {}
        else:
            raise InputError(
                f"example_inputs is a {type(example).__name__}: give a tensor, a tuple of tensors or a dict of tensors"
            )
        for where, value in [*((f"[{i}]", v) for i, v in enumerate(args)), *((f"[{k!r}]", v) for k, v in kwargs.items())]:
            if not isinstance(value, torch.Tensor):
                raise InputError(
                    f"example_inputs{where} is a {type(value).__name__}: only tensors can be inputs of the ONNX model"
                )
        if not args and not kwargs:
            raise InputError("example_inputs: no tensors (the module needs at least one input)")
        default = [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(len(args))] + list(kwargs)
        chosen = list(names) if names is not None else default
        if len(chosen) != len(default) or len(set(chosen)) != len(chosen):
            raise InputError(f"input_names {chosen}: need {len(default)} distinct name(s), one per example input")
        return cls(args, kwargs, chosen)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, [*self.args, *self.kwargs.values()]))

    def rebuild(self, tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """``forward``'s arguments with the tensors named in ``tensors`` in place of the examples."""
        values = [tensors.get(name, tensor) for name, tensor in self.named()]
        return tuple(values[: len(self.args)]), dict(zip(self.kwargs, values[len(self.args):]))


def _forward_parameters(module: nn.Module) -> list[str]:
    """The names of ``forward``'s parameters that can be given one tensor each."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def _requested_axes(
    inputs: _Inputs,
    outputs: list[str],
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None,
) -> dict[str, dict[int, str]]:
    """The dynamic axes asked for, per input name: axis -> symbol name (``<input>_dim_<axis>``
    where none is given)."""
    named_inputs = dict(inputs.named())
    per_input: dict[str, Any] = {}
    if dynamic_axes is not None:
        if not isinstance(dynamic_axes, Mapping):
            raise InputError("dynamic_axes: expected {input name: {axis: name}} or {input name: [axes]}")
        unknown = [name for name in dynamic_axes if name not in named_inputs and name not in outputs]
        if unknown:
            raise InputError(
                f"dynamic_axes: {unknown[0]!r} is neither an input ({', '.join(inputs.names)}) "
                f"nor an output ({', '.join(outputs)})"
            )
        per_input = {name: spec for name, spec in dynamic_axes.items() if name in named_inputs}
    elif dynamic_shapes is not None:
        per_input = _shapes_by_input(inputs, dynamic_shapes)
    axes: dict[str, dict[int, str]] = {}
    for name, spec in per_input.items():
        rank = named_inputs[name].dim()
        entries = _axis_entries(name, spec)
        for axis, symbol in entries.items():
            if not -rank <= axis < rank:
                raise InputError(f"dynamic axis {axis} of input {name!r}: the example has rank {rank}")
            if symbol is None:
                symbol = f"{name}_dim_{axis % rank}"
            axes.setdefault(name, {})[axis % rank] = symbol
    return axes


def _shapes_by_input(inputs: _Inputs, dynamic_shapes: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """torch.export's ``dynamic_shapes`` (a dict by input name, or one entry per input) by input name."""
    if isinstance(dynamic_shapes, Mapping):
        unknown = [key for key in dynamic_shapes if key not in inputs.names]
        if unknown:
            raise InputError(f"dynamic_shapes: {unknown[0]!r} is not an input (inputs: {', '.join(inputs.names)})")
        return dict(dynamic_shapes)
    if isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(inputs.names):
            raise InputError(f"dynamic_shapes: {len(dynamic_shapes)} entries for {len(inputs.names)} inputs")
        return dict(zip(inputs.names, dynamic_shapes))
    raise InputError("dynamic_shapes: expected a dict by input name or a tuple, one entry per input")


def _axis_entries(name: str, spec: Any) -> dict[int, str | None]:
    """One input's dynamic axes from either form: axis -> symbol name (None: unnamed)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (tuple, list)):
        # dynamic_axes' list of axes, or dynamic_shapes' per-axis list (None: static).
        if all(isinstance(item, int) and not isinstance(item, bool) for item in spec):
            return {_axis(name, axis): None for axis in spec}
        items = [(axis, item) for axis, item in enumerate(spec) if item is not None]
    else:
        raise InputError(f"dynamic axes of input {name!r}: expected a dict axis -> name or a list of axes")
    entries: dict[int, str | None] = {}
    for axis, item in items:
        axis = _axis(name, axis)
        if isinstance(item, str):
            entries[axis] = item
        elif isinstance(item, torch.export.Dim):
            entries[axis] = item.__name__
        elif item is torch.export.Dim.STATIC:
            continue
        elif item is torch.export.Dim.AUTO or item is torch.export.Dim.DYNAMIC:
            entries[axis] = None
        else:
            raise InputError(f"dynamic axes of input {name!r}: axis {axis} has {item!r}; give a name or a torch Dim")
    return entries


def _axis(name: str, axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise InputError(f"dynamic axes of input {name!r}: axis {axis!r} is not an integer")
    return axis


def _refuse_training(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if sub.training:
            which = f"submodule {name!r} ({type(sub).__name__})" if name else f"{type(module).__name__}"
            raise InputError(
                f"{which} is in training mode, in which Dropout and BatchNorm compute something no "
                "exported file should: call module.eval() before exporting"
            )


# --- torch side ----------------------------------------------------------------------------


def _fold_in_torch(module: nn.Module, inputs: _Inputs) -> tuple[nn.Module, dict[str, Any]]:
    """BatchNorm folded and hand-written norms replaced, on a copy; both reports."""
    with warnings.catch_warnings():
        # fold_batchnorm warns about modules torch.fx cannot trace; its report says the same.
        warnings.simplefilter("ignore")
        folded, fold_report = fold_batchnorm_with_report(
            module, example_inputs=inputs.args if not inputs.kwargs else None
        )
    fused, fuse_report = fuse_norms_with_report(folded)
    return fused, {"fold_batchnorm": fold_report.to_dict(), "fuse_norms": fuse_report.to_dict()}


def _leaves(value: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a module's output, depth first, named after where they sit."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        items = [(str(key) if name == "output" else f"{name}.{key}", item) for key, item in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(f"{name}_{index}", item) for index, item in enumerate(value)]
    else:
        return []
    return [leaf for key, item in items if item is not None for leaf in _leaves(item, key)]


def _torch_outputs(
    module: nn.Module, inputs: _Inputs, feeds: Mapping[str, np.ndarray], exported: ir.Model, sizes: Sizes
) -> dict[str, np.ndarray]:
    """The module's outputs on ``feeds``, named by the exported graph's outputs (in order)."""
    examples = dict(inputs.named())
    tensors = {name: _to_torch(array, examples[name]) for name, array in feeds.items() if name in examples}
    args, kwargs = inputs.rebuild(tensors)
    try:
        with torch.inference_mode():
            result = module(*args, **kwargs)
    except Exception as error:  # any error of the user's module
        raise InputError(
            f"the module fails at sizes {_sizes_text(sizes)} ({type(error).__name__}: {first_line(error)}); "
            "give export(sizes=[...]) sizes it accepts"
        ) from error
    leaves = _leaves(result, "output")
    names = [value.name for value in exported.graph.outputs]
    return {name: _to_numpy(tensor) for name, (_, tensor) in zip(names, leaves)}


def _to_torch(array: np.ndarray, example: torch.Tensor) -> torch.Tensor:
    if example.dtype == torch.bfloat16:
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(example.dtype)
    return tensor.to(example.device)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ir.DataType.BFLOAT16.numpy())
    return tensor.numpy()


# --- exporting -----------------------------------------------------------------------------


def _run_exporter(
    module: nn.Module,
    inputs: _Inputs,
    path: Path,
    exporter: Exporter,
    opset: int | None,
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    dynamic_shapes: Any,
    dynamic_axes: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    debug: bool,
) -> None:
    arguments: dict[str, Any] = {"opset_version": opset, "input_names": inputs.names, "output_names": output_names}
    model, args = module, inputs.args
    if exporter == "torchscript":
        if inputs.kwargs:
            # The TorchScript exporter passes keyword tensors on as a trailing dict, which a
            # forward with more keyword parameters (HF's) mis-binds: call it by keyword instead.
            model, args = _KeywordCall(module, list(inputs.kwargs)), tuple(inputs.kwargs.values())
        # Input axes by the names normfold gave them (``<input>_dim_<axis>`` where the user gave
        # none), so sizes=[...] can name them; the user's output axes as given.
        outputs = {name: spec for name, spec in (dynamic_axes or {}).items() if name in output_names}
        arguments.update(dynamo=False, dynamic_axes={**outputs, **axes} or None)
    else:
        large = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        # The user's own dynamic_shapes (Dim ranges, AUTO) go as given; otherwise named string
        # axes, which torch.export treats as Dim.DYNAMIC and the exporter writes into the graph.
        by_name = _shapes_by_input(inputs, dynamic_shapes) if dynamic_shapes is not None else axes
        shapes = [by_name.get(name) for name in inputs.names]
        arguments.update(
            kwargs=inputs.kwargs or None,
            dynamic_shapes=(dict(zip(inputs.kwargs, shapes)) if inputs.kwargs else tuple(shapes)) if by_name else None,
            dynamo=True,
            optimize=False,
            verbose=False,
            external_data=large > io.EXTERNAL_DATA_THRESHOLD,
        )
    arguments.update(options or {})
    try:
        if debug:
            torch.onnx.export(model, args, str(path), **arguments)
        else:
            with silenced(*_QUIET_LOGGERS):
                torch.onnx.export(model, args, str(path), **arguments)
    except Exception as error:  # the exporters raise many untyped errors
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise InputError(
            f"cannot export {type(module).__name__} with the {exporter} exporter: {_export_reason(error)}; "
            f"exporter={other!r} may succeed" + ("" if debug else ", and export(debug=True) shows the exporter's log")
        ) from error
    if not path.is_file():
        raise InputError(f"the {exporter} exporter wrote no file for {type(module).__name__}")


class _KeywordCall(nn.Module):
    """Calls ``module`` with its positional arguments as the keyword arguments ``keys``."""

    def __init__(self, module: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.module = module
        self.keys = keys

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.module(**dict(zip(self.keys, tensors)))


def _export_reason(error: BaseException) -> str:
    """The exporter's message in one line: the root cause's first line and the user's line."""
    cause = error
    # torch.onnx wraps torch.export's error in a TorchExportError whose own first line only says
    # which step failed; the cause holds what happened.
    while cause.__cause__ is not None and type(cause).__module__.startswith("torch.onnx"):
        cause = cause.__cause__
    text = _ANSI.sub("", str(error) if cause is error else str(cause))
    lines = [line.strip() for line in _ANSI.sub("", str(cause)).splitlines() if line.strip()]
    # "Found the following conflicts ...:" says what follows; the next line is the conflict.
    summary = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines or [""])[0]
    reason = f"{type(cause).__name__}: {summary[:300]}"
    # The traceback torch.export quotes runs outermost first: the last frame raised. Code
    # without a source file (<string>, <stdin>) has no line to quote.
    frames = [match for match in _USER_LINE.finditer(text) if not match.group(1).startswith("<")]
    where = frames[-1] if frames else None
    if where:
        reason += f" (at {Path(where.group(1)).name}:{where.group(2)}: {where.group(3).strip()})"
    return reason


def _check_interface(exported: ir.Model, inputs: _Inputs, axes: dict[str, dict[int, str]], outputs: int, exporter: str) -> None:
    """Every asked-for dynamic axis is symbolic in the file, and the outputs are the module's."""
    by_name = {value.name: value for value in model_inputs(exported)}
    for name, wanted in axes.items():
        value = by_name.get(name)
        if value is None or value.shape is None:
            continue  # an input the exporter dropped (unused) has no axes to check
        for axis in sorted(wanted):
            dim = value.shape[axis]
            if isinstance(dim, int):
                raise VerificationError(
                    f"the {exporter} exporter made axis {axis} of input {name!r} static ({dim}) although it "
                    "was asked to be dynamic: the module's code fixes that size (the exporter says why with debug=True)"
                )
    found = len(exported.graph.outputs)
    if found != outputs:
        raise VerificationError(
            f"the {exporter} export has {found} output(s) but the module returns {outputs} tensor(s); "
            "the outputs cannot be matched"
        )


# --- verification --------------------------------------------------------------------------


def _size_sets(exported: ir.Model, inputs: _Inputs, sizes: Sequence[Mapping[str, int]] | None) -> list[Sizes]:
    """The example sizes of every symbolic dim, then each other set of sizes to verify at."""
    examples = dict(inputs.named())
    example: Sizes = {}
    for value in model_inputs(exported):
        tensor = examples.get(value.name)
        if tensor is None or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value and axis < tensor.dim():
                example.setdefault(dim.value, int(tensor.shape[axis]))
    example = resolve_dims(exported, example)
    if sizes is not None:
        others = [resolve_dims(exported, {**example, **dict(s)}) for s in sizes]
    elif example:
        others = [{s: 1 if n > 1 else 2 for s, n in example.items()}, {s: n + 1 if n > 1 else 3 for s, n in example.items()}]
    else:
        others = []
    return [example, *(other for other in others if other != example)]


def _seeded(size_sets: list[Sizes], samples: int, seed: int) -> list[tuple[Sizes, list[int]]]:
    """Seeds per set of sizes: ``samples`` at the example sizes, one at each other set."""
    groups = [(size_sets[0], [seed + k for k in range(samples)])]
    groups += [(sizes, [seed + samples + k]) for k, sizes in enumerate(size_sets[1:])]
    return groups


def _feeds(exported: ir.Model, sizes: Sizes, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    return [generate_inputs(exported, dims=sizes, seed=s) for s in seeds]


def _checks(
    model: Path | ir.Model,
    feeds: list[list[dict[str, np.ndarray]]],
    references: list[list[dict[str, np.ndarray]]],
    rtol: float | None,
    atol: float | None,
) -> list[VerificationReport]:
    """``model`` run in onnxruntime (optimizations off) on each set's feeds, judged against torch."""
    try:
        session = runtime.session(model)
    except InputError as error:
        problem = f"fails to load in onnxruntime: {first_line(error).split('cannot load the model: ', 1)[-1]}"
        session = None
    checks = []
    for group, reference in zip(feeds, references):
        candidate: list[dict[str, np.ndarray]] | None = [] if session is not None else None
        problems = [] if session is not None else [problem]
        for k, sample in enumerate(group):
            try:
                candidate.append(runtime.run(session, sample))
            except Exception as error:  # onnxruntime raises its own untyped errors
                reason = _ORT_PREFIX.sub("", first_line(error))
                candidate, problems = None, [f"fails to run in onnxruntime on sample {k}: {reason}"]
                break
        shapes = {name: tuple(array.shape) for name, array in group[0].items()}
        checks.append(compare(reference, candidate, rtol=rtol, atol=atol, problems=problems, input_shapes=shapes))
    return checks


def _failure(result: ExportResult) -> str:
    """The first failing comparison, in one line: what, where, how far, and who lost it."""
    for which, checks in (("export", result.export_checks), ("optimized", result.optimized_checks)):
        for index, (sizes, check) in enumerate(zip(result.sizes, checks)):
            if check.passed:
                continue
            shapes = ", ".join(f"{name} {_shape_text(shape)}" for name, shape in check.input_shapes.items())
            at = f"at sizes {_sizes_text(sizes)} ({shapes})" if sizes else f"at the example sizes ({shapes})"
            what = _problem_text(check)
            if which == "export":
                if index == 0 or not result.export_checks[0].passed:
                    hint = "the exporter lost it, before normfold's passes"
                elif result.report["exporter"] == "torchscript":
                    hint = (
                        "the export is right at the example sizes only: the exporter baked a size into the "
                        "graph (it records Python ints such as int(x.shape[0]) as constants; exporter='dynamo' "
                        "traces them)"
                    )
                else:
                    hint = (
                        "the export is right at the example sizes only: torch.export traced code that holds at "
                        "those sizes (a Python branch on a size), which the file does not check; name the axis "
                        "(a string or Dim, not Dim.AUTO) so that the export refuses such code"
                    )
                if result.report["torch"] and _changed_in_torch(result.report["torch"]):
                    hint += "; the module was folded in torch first: try fold_in_torch=False"
                return f"the exported model differs from the torch module {at}: {what}; {hint}"
            return (
                f"the optimized model differs from the torch module {at} though the export matches it: {what}; "
                "normfold's passes lost it (please report it; passes=[] skips them)"
            )
    return "not verified"


def _problem_text(check: VerificationReport) -> str:
    # A model that did not run (or changed its interface) says so in problems; its outputs
    # only say "not compared".
    if check.problems:
        return check.problems[0]
    for comparison in check.outputs.values():
        if not comparison.passed:
            return f"output {comparison.name!r}: {comparison.problem}"
    return "interface differs"


def _changed_in_torch(torch_report: dict[str, Any]) -> bool:
    return bool(torch_report["fold_batchnorm"]["applied"] or torch_report["fuse_norms"]["replaced"])


def _check_text(check: VerificationReport) -> str:
    if not check.passed:
        return "FAIL " + (_number(check.max_abs_error) if not math.isnan(check.max_abs_error) else "-")
    return f"PASS max abs {_number(check.max_abs_error)}, max rel {_number(check.max_rel_error)}"


def _sizes_text(sizes: Sizes) -> str:
    return " ".join(f"{name}={size}" for name, size in sizes.items()) or "static"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _number(value: float) -> str:
    return f"{value:.3g}"

