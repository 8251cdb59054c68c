"""Graph plumbing the folding rules share: reading constants, refusals, fresh names, casts.

A folding rule reads float tensors from the graph, folds them in float64
(:mod:`normfold.math.batchnorm`) and writes new initializers in the original dtype. This module
holds the parts that touch the graph:

* :func:`read_constant` returns a value's tensor in float64, or raises :class:`Refusal` with a
  reason a user can act on: the value is a graph input (a caller could feed something else), is
  computed at run time, or is missing. Constants held by ``Constant`` nodes count as constants
  (``value.const_value``), so the rules work without ``cleanup`` too.
* Graph inputs that carry an initializer fold only under ``freeze_initializer_inputs``; the
  rule then lists them in :attr:`Reads.frozen` and :func:`freeze` removes them from the graph's
  inputs when the fold is committed, with a note in the pass record.
* :class:`FreshNames` hands out initializer names no value in the model uses yet: rewrites
  never overwrite a tensor that another node may read. :func:`initializer` (and
  :func:`cast_tensor`) write float64 results cast once to the model's dtype. Every pass that
  adds initializers uses these two.
* :func:`require_castable` and :func:`require_precise` refuse a fold whose weights the cast to
  the model's dtype would lose (overflow to inf, underflow to 0) or that computes farther from
  the unfolded site than its float16/bfloat16 rounding allows (``normfold.math.fold_precision``);
  every fold rule calls them from its ``check``.
"""

from __future__ import annotations

__all__ = [
    "FoldRule",
    "FreshNames",
    "Reads",
    "any_op",
    "attribute",
    "batchnorm_affine",
    "batchnorm_statistics",
    "cast_tensor",
    "conv_pads_of",
    "describe",
    "fixed_tensor",
    "freeze",
    "initializer",
    "opset_of",
    "other_reader",
    "rank_of",
    "read_constant",
    "require_castable",
    "require_graph",
    "require_precise",
    "tensor_dtype",
]

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _pattern_ir

from normfold.errors import Refusal
from normfold.math import fold_precision
from normfold.math.batchnorm import bn_scale_shift
from normfold.math.padding import conv_pads
from normfold.passes.base import PassOptions, PassRecord, RecordingRule


def describe(node: ir.Node) -> str:
    """``Conv /layer1/conv1/Conv``: how a node is named in reasons."""
    return f"{node.op_type} {node.name}" if node.name else node.op_type


@dataclasses.dataclass
class Reads:
    """The graph inputs a site reads as constants (only under ``freeze_initializer_inputs``)."""

    freeze_inputs: bool
    frozen: list[ir.Value] = dataclasses.field(default_factory=list)


def fixed_tensor(value: ir.Value, reads: Reads | None) -> ir.TensorProtocol | None:
    """``value``'s tensor when the graph fixes it (an initializer, a ``Constant`` node's output),
    else None: the one rule every rewrite reads constants by.

    An initializer that is also a graph input (old exporters' ``keep_initializers_as_inputs``)
    is only a default: a caller may feed other values. It counts as a constant only when
    ``reads`` freezes inputs (``--freeze-initializer-inputs``), which lists it in
    ``reads.frozen`` so the rewrite removes the input (:func:`freeze`).
    """
    if value.is_graph_input():
        if reads is None or not reads.freeze_inputs or value.const_value is None:
            return None
        if value not in reads.frozen:
            reads.frozen.append(value)
        return value.const_value
    return ir.convenience.get_const_tensor(value)


def read_constant(value: ir.Value | None, what: str, reads: Reads) -> np.ndarray:
    """``value``'s float tensor as float64 (:func:`fixed_tensor`), or :class:`Refusal` naming
    ``what`` and why it is not one."""
    if value is None:
        raise Refusal(f"{what} is missing")
    name = f"'{value.name}'" if value.name else "(unnamed)"
    tensor = fixed_tensor(value, reads)
    if tensor is None:
        if value.is_graph_input() and value.const_value is None:
            raise Refusal(f"{what} {name} is a graph input with no initializer: it is not a constant")
        if value.is_graph_input():
            raise Refusal(
                f"{what} {name} is a graph input: a caller could feed other values, so folding "
                "would change the model (--freeze-initializer-inputs folds its initializer and "
                "removes the input)"
            )
        producer = value.producer()
        origin = f"computed at run time by {describe(producer)}" if producer else "not a constant"
        raise Refusal(f"{what} {name} is {origin}")
    if not tensor.dtype.is_floating_point():
        raise Refusal(f"{what} {name} has dtype {tensor.dtype}, not a floating-point type")
    return np.asarray(tensor.numpy()).astype(np.float64)


def require_graph(context: Any) -> None:
    """Refuse sites inside model functions: a function cannot hold the new initializers."""
    where = context.graph_or_function
    if isinstance(where, ir.Function):
        raise Refusal(
            f"it is inside the model function {where.name}, which cannot hold new initializers"
        )


def tensor_dtype(value: ir.Value) -> ir.DataType:
    """The element type of a value (from its constant when the value's type is not recorded)."""
    if value.const_value is not None:
        return value.const_value.dtype
    if value.dtype is None:
        raise Refusal(f"the element type of '{value.name}' is unknown")
    return value.dtype


def freeze(reads: Reads, record: PassRecord) -> None:
    """Remove the frozen graph inputs from their graph's inputs (their initializers stay)."""
    for value in reads.frozen:
        graph = value.graph
        if graph is not None and value in graph.inputs:
            graph.inputs.remove(value)
            record.notes.append(
                f"graph input '{value.name}' was frozen to its initializer and is no longer a "
                "model input (--freeze-initializer-inputs)"
            )


def other_reader(value: ir.Value, allowed: set[ir.Node]) -> str | None:
    """Who else sees ``value`` (a node outside ``allowed`` or the graph's output), or None."""
    if value.is_graph_output():
        return "the graph output"
    for user, _ in value.uses():
        if user not in allowed:
            return describe(user)
    return None


def attribute(node: ir.Node, name: str, default: Any) -> Any:
    """An attribute's Python value, or ``default`` when the node omits it."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def conv_pads_of(node: ir.Node, kernel: Sequence[int]) -> tuple[int, ...] | None:
    """A Conv node's explicit ``(begins…, ends…)`` padding (:func:`normfold.math.padding.conv_pads`),
    None when it depends on an input size the graph does not record; Refusal for an unknown
    ``auto_pad``."""
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    return conv_pads(
        auto_pad,
        attribute(node, "pads", None),
        kernel,
        strides=attribute(node, "strides", None),
        dilations=attribute(node, "dilations", None),
        input_size=None if shape is None else [d if isinstance(d, int) else None for d in shape[2:]],
    )


def rank_of(value: ir.Value) -> int | None:
    """The rank of ``value`` when it is recorded (``cleanup``/shape inference records it)."""
    if value.const_value is not None:
        return len(value.const_value.shape)
    return None if value.shape is None else len(value.shape)


class FreshNames:
    """Names for new initializers that no value of the model uses yet.

    Derived from a readable stem; characters other than letters, digits, ``_`` and ``.`` become
    ``_`` (TorchScript's node names are paths like ``/layer.0/LayerNorm/Div``). The model's names
    are read at the first name asked for (a pass that makes none never walks the model for them).
    """

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._taken: set[str] | None = None

    def __call__(self, base: str) -> str:
        if self._taken is None:
            self._taken = set()
            for graph in self._model.graphs():
                self._taken.update(graph.initializers)
                self._taken.update(v.name for v in graph.inputs if v.name)
                for node in graph:
                    self._taken.update(v.name for v in node.outputs if v.name)
        stem = re.sub(r"[^A-Za-z0-9_.]+", "_", base).strip("_") or "const"
        name, counter = stem, 1
        while name in self._taken:
            counter += 1
            name = f"{stem}_{counter}"
        self._taken.add(name)
        return name


def cast_tensor(array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Tensor:
    """``array`` (float64 arithmetic) cast once to ``dtype``, as a tensor named ``name``."""
    data = np.ascontiguousarray(np.asarray(array, dtype=np.float64).astype(dtype.numpy()))
    return ir.tensor(data, dtype=dtype, name=name)


def require_castable(folded: dict[str, np.ndarray], dtype: ir.DataType) -> None:
    """Refuse when casting any of the float64 ``folded`` arrays (keyed by what they are, e.g.
    ``"weight"``) to ``dtype`` overflows or flushes a nonzero value to 0."""
    for what, array in folded.items():
        if (problem := fold_precision.cast_problem(array, dtype.numpy(), what)) is not None:
            raise Refusal(problem)


def require_precise(site: Callable[[], tuple[np.ndarray, np.ndarray]], dtype: ir.DataType) -> None:
    """Refuse a fold that errs more than the precision rule allows; ``site()`` gives the
    ``(reference, folded)`` probe outputs."""
    if (problem := fold_precision.precision_problem(*site(), dtype.numpy())) is not None:
        raise Refusal(problem)


def initializer(op: Any, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Value:
    """A new initializer (built with the rewriter's ``op``) holding ``array`` cast once to ``dtype``."""
    return op.initializer(cast_tensor(array, dtype, name), name=name)


def opset_of(node: ir.Node, model: ir.Model) -> int:
    """The default-domain opset ``node`` is interpreted in."""
    if node.version is not None:
        return node.version
    graph = node.graph
    imports = graph.opset_imports if graph is not None else model.opset_imports
    return imports.get("", model.opset_imports.get("", 1))


def batchnorm_affine(bn: ir.Node, opset: int, reads: Reads) -> tuple[np.ndarray, np.ndarray]:
    """The float64 ``(s, t)`` of an inference-form BatchNormalization (``BN(y) = s·y + t``).

    Refuses the training forms (more than one output, ``training_mode=1``), opset 7's
    per-activation ``spatial=0``, parameters that are not constants (see :func:`read_constant`),
    parameters of mismatched shapes, and statistics with ``var + eps <= 0`` (the BN divides by
    zero there, and no weight can reproduce that).
    """
    if opset < 7:
        raise Refusal(f"BatchNormalization from opset {opset} (before 7) is not supported")
    if attribute(bn, "training_mode", 0):
        raise Refusal(
            "training_mode=1: the BatchNormalization normalizes with each batch's statistics"
        )
    if len(bn.outputs) > 1:
        raise Refusal(
            f"the BatchNormalization has {len(bn.outputs)} outputs: that is the training form, "
            "which updates running statistics; only the single-output inference form folds"
        )
    if not attribute(bn, "spatial", 1):
        raise Refusal("spatial=0: per-activation statistics (opset 7) are not supported")
    if len(bn.inputs) != 5:
        raise Refusal(f"the BatchNormalization has {len(bn.inputs)} inputs instead of 5")
    roles = ("scale", "bias", "mean", "var")
    gamma, beta, mean, var = (
        read_constant(value, f"BatchNormalization {role}", reads)
        for role, value in zip(roles, bn.inputs[1:], strict=True)
    )
    shapes = {p.shape for p in (gamma, beta, mean, var)}
    if len(shapes) != 1 or len(gamma.shape) != 1:
        raise Refusal(
            f"the BatchNormalization parameters have shapes {sorted(shapes)}, not one [C]"
        )
    eps = float(attribute(bn, "epsilon", 1e-5))
    if np.any(var + eps <= 0):
        raise Refusal(
            "running_var + epsilon is not positive for some channel: "
            "the BatchNormalization divides by zero"
        )
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise Refusal("the BatchNormalization statistics give a non-finite scale or shift")
    return scale, shift


def batchnorm_statistics(bn: ir.Node, reads: Reads) -> tuple[np.ndarray, np.ndarray]:
    """The running mean and standard deviation of a BatchNormalization's input, float64: the
    inputs it was fitted to, where the precision checks put their probes."""
    mean, var = (read_constant(v, "BatchNormalization statistic", reads) for v in bn.inputs[3:5])
    return mean, np.sqrt(np.maximum(var, 0.0))


class _OpTypeIn(_pattern_ir.StringPattern):
    """A pattern op type matching any of a set of op types."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def matches(self, item: str) -> bool:
        return item in self._names

    def __str__(self) -> str:
        return "|".join(sorted(self._names))


def any_op(op: Any, names: frozenset[str]) -> Any:
    """A pattern op builder matching any op type in ``names`` (one rule, not one copy per op)."""
    return _pattern_ir.OpPatternBuilder(op, _OpTypeIn(names))


class FoldRule(RecordingRule):
    """A BN fold rule: ``fresh`` names its new initializers; ``check`` leaves in ``_plan`` (a
    dataclass of the rule's) what ``rewrite`` emits. ``remove_nodes=False`` where a matched node
    may stay (the rule's check then names the other readers itself instead of the matcher
    refusing silently)."""

    def __init__(
        self, record: PassRecord, options: PassOptions, fresh: Callable[[str], str], *, remove_nodes: bool = True
    ) -> None:
        super().__init__(record, options)
        self.remove_nodes = remove_nodes
        self._fresh = fresh
        self._plan: Any = None

    def read_batchnorm(self, context: Any, bn: ir.Node) -> tuple[np.ndarray, np.ndarray, Reads]:
        """What every BN rule checks first: the site is in a graph (not a model function) and
        ``bn`` is an inference-form BatchNormalization with constant parameters. Returns its
        float64 ``(s, t)`` and the graph inputs it read (see :func:`batchnorm_affine`)."""
        reads = Reads(self.options.freeze_initializer_inputs)
        require_graph(context)
        scale, shift = batchnorm_affine(bn, opset_of(bn, context.model), reads)
        return scale, shift, reads
