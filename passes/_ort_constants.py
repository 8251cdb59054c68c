"""Constant folding computed by onnxruntime, never by a reference implementation nobody checked.

onnxscript's ``FoldConstantsPass`` evaluates the nodes it folds with ``onnx.reference``, whose
kernels are not held to onnxruntime's numbers: its opset-9..13 ``BatchNormalization`` with the
``momentum`` attribute written out (TorchScript writes it) normalizes with the *batch*
statistics, so a BN on a constant input folded 8.4% off (40% on other data). ``cleanup`` keeps
onnxscript's symbolic steps (``Shape`` of a static shape, no-op ``Reshape``/``Cast``/``Expand``,
eval ``Dropout``; pure shape bookkeeping, no arithmetic) and evaluates every other constant
subgraph here, with onnxruntime's CPU kernels and graph optimizations off: the constants are the
very numbers the unfolded graph computes when onnxruntime runs it.

Rule (:func:`fold_with_onnxruntime`): a node of the main graph *folds* when it is a
default-domain op that is deterministic, has no subgraph, is not kept on purpose
(``ConstantOfShape``, which is smaller than its output, and quantization ops), and reads only
constants (initializers that are not graph inputs, or outputs of folding nodes). Each
folding-node output read by a node that stays is computed — all of them in one onnxruntime
session — and replaces its uses as a new initializer. A graph output is never replaced (its
node stays: the interface keeps its producer), nor a tensor over ``output_size_limit`` elements
that is larger than the constants it comes from. A node reading an initializer over
``input_size_limit`` elements folds only when it is a ``Transpose`` that is the tensor's only
reader (exporters' transposed weights). When onnxruntime cannot build or run the whole
subgraph, each node is tried alone and a node that fails stays, with everything it feeds.
"""

from __future__ import annotations

__all__ = ["fold_with_onnxruntime"]

import logging
import numpy as np
import onnx_ir as ir

from normfold import low_precision, runtime
from normfold.errors import InputError
from normfold.math import fold_precision

logger = logging.getLogger(__name__)

_KEPT = frozenset(
    {"ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant"}
)
_NON_DETERMINISTIC = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}
)
_SINGLE_READER_OPS = frozenset({"Transpose"})
_LOW_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or (value.const_value is not None and not value.is_graph_input())


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
        if not attr.is_ref()
    )


def _foldable_nodes(graph: ir.Graph, input_size_limit: int) -> list[ir.Node]:
    """The nodes that compute only from constants, in graph (topological) order."""
    folding: list[ir.Node] = []
    produced: set[ir.Value] = set()
    for node in graph:
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in _KEPT | _NON_DETERMINISTIC
            or _has_subgraph(node)
            or not node.outputs
        ):
            continue
        if not all(_is_constant(v) or v in produced for v in node.inputs):
            continue
        if _narrows_to_low_precision(node):
            continue
        large = [
            v for v in node.inputs
            if v is not None and v.const_value is not None and v.const_value.size > input_size_limit
        ]
        if large and (node.op_type not in _SINGLE_READER_OPS or any(len(v.uses()) > 1 for v in large)):
            continue
        folding.append(node)
        produced.update(node.outputs)
    return folding


def _narrows_to_low_precision(node: ir.Node) -> bool:
    """A Cast (or CastLike) of a wider float to float16/bfloat16: onnxruntime elides that
    rounding when the reader runs in float32 (its inserted Casts cancel), so a folded float16
    constant would be rounded where the running graph is not. The Cast stays."""
    if node.op_type == "Cast" and "to" in node.attributes:
        target = ir.DataType(node.attributes["to"].as_int())
    elif node.op_type == "CastLike" and len(node.inputs) > 1:
        target = _dtype_of(node.inputs[1])
    else:
        return False
    source = _dtype_of(node.inputs[0]) if node.inputs else None
    return target in _LOW_PRECISION and source is not None and source.is_floating_point() and source.itemsize > 2


def _dtype_of(value: ir.Value | None) -> ir.DataType | None:
    if value is None:
        return None
    return value.const_value.dtype if value.const_value is not None else value.dtype


def _frontier(nodes: list[ir.Node]) -> list[ir.Value]:
    """Outputs of ``nodes`` that a node outside them reads (graph outputs excluded: they stay)."""
    inside = set(nodes)
    return [
        value
        for node in nodes
        for value in node.outputs
        if not value.is_graph_output() and any(user not in inside for user, _ in value.uses())
    ]


def _evaluate(
    model: ir.Model, nodes: list[ir.Node], wanted: list[ir.Value], *, widen: bool = False
) -> dict[ir.Value, np.ndarray]:
    """``wanted`` computed by onnxruntime from a model of ``nodes`` alone (raises InputError);
    ``widen``: from that model converted to float32 (``verification.float64_model``)."""
    mapping: dict[ir.Value, ir.Value] = {}
    initializers: list[ir.Value] = []
    copies: list[ir.Node] = []
    for node in nodes:
        inputs = []
        for value in node.inputs:
            if value is not None and value not in mapping:
                # A constant from outside: the same tensor (not copied, external data stays mapped).
                mapping[value] = ir.Value(
                    name=value.name, type=value.type, shape=value.shape, const_value=value.const_value
                )
                initializers.append(mapping[value])
            inputs.append(None if value is None else mapping[value])
        copy = ir.Node(
            node.domain,
            node.op_type,
            inputs,
            attributes=[attr for attr in node.attributes.values()],
            overload=node.overload,
            num_outputs=len(node.outputs),
            version=node.version,
            name=node.name,
        )
        for original, output in zip(node.outputs, copy.outputs, strict=True):
            output.name = original.name
            output.type = original.type
            mapping[original] = output
        copies.append(copy)
    graph = ir.Graph(
        inputs=[],
        outputs=[mapping[value] for value in wanted],
        nodes=copies,
        initializers=initializers,
        opset_imports=dict(model.opset_imports),
    )
    sub = ir.Model(graph, ir_version=model.ir_version)
    # Imported here: a model with nothing to fold (most exports) never pays for onnxruntime,
    # nor for the verification module that float64_model lives in.
    import onnxruntime as ort

    from normfold.verification import float64_model

    if widen:
        sub = float64_model(sub, ir.DataType.FLOAT)

    sess = runtime.session(sub)  # InputError when onnxruntime cannot build it
    # A kernel that fails at run time is an expected outcome here, not a message for the user.
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        arrays = sess.run([value.name for value in wanted], {}, quiet)
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise InputError(str(error)) from None
    return dict(zip(wanted, arrays, strict=True))


def _detached(value: ir.Value, array: np.ndarray | None) -> ir.Value:
    """A constant value outside the graph: reading it adds no use to the graph's values."""
    tensor = value.const_value if array is None else ir.tensor(array)
    return ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=tensor)


def _evaluate_one_by_one(model: ir.Model, nodes: list[ir.Node]) -> dict[ir.Value, np.ndarray]:
    """Every output of the ``nodes`` onnxruntime can run, each node in its own session."""
    known: dict[ir.Value, np.ndarray] = {}
    for node in nodes:
        if not all(_is_constant(v) or v in known for v in node.inputs):
            continue  # an input's producer failed: this node stays too
        inputs = [None if v is None else _detached(v, known.get(v)) for v in node.inputs]
        alone = ir.Node(
            node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
            num_outputs=len(node.outputs), version=node.version, name=node.name,
        )
        for original, output in zip(node.outputs, alone.outputs, strict=True):
            output.name, output.type = original.name, original.type
        try:
            values = _evaluate(model, [alone], list(alone.outputs))
        except InputError as error:
            logger.info("constant folding: onnxruntime cannot evaluate %s: %s", node.name, error)
            continue
        for original, output in zip(node.outputs, alone.outputs, strict=True):
            known[original] = values[output]
    return known


def _low_precision_values(
    model: ir.Model, nodes: list[ir.Node], values: dict[ir.Value, np.ndarray]
) -> dict[ir.Value, np.ndarray | None]:
    """float16/bfloat16 constants from the float32 run of their subgraph, rounded once.

    onnxruntime runs float16 ops in float32 and keeps float32 between them, so the running graph
    holds these values unrounded; the folded constant is their float32 value rounded once, and
    a value that overflows or flushes to 0 in that rounding is not folded (None). Without a
    float32 run, no 16-bit value is folded.
    """
    low = [
        v for v, array in values.items()
        if isinstance(array, np.ndarray) and low_precision.is_low_precision(array.dtype)
    ]
    if not low:
        return {}
    try:
        wide = _evaluate(model, nodes, low, widen=True)
    except InputError as error:
        logger.info("constant folding: no float32 run of the float16 constants (%s)", error)
        return dict.fromkeys(low)
    result: dict[ir.Value, np.ndarray | None] = {}
    for value in low:
        dtype = values[value].dtype
        if fold_precision.cast_problem(wide[value], dtype, "constant") is not None:
            result[value] = None
        else:
            result[value] = np.asarray(low_precision.rounded(wide[value], dtype)).astype(dtype)
    return result


def fold_with_onnxruntime(model: ir.Model, *, input_size_limit: int, output_size_limit: int) -> int:
    """Replace the main graph's constant subgraphs by their onnxruntime values (rule above).

    Returns how many values were replaced; the nodes that computed them are left for the caller
    to remove once nothing reads them, and the values they leave behind have no name.
    """
    graph = model.graph
    nodes = _foldable_nodes(graph, input_size_limit)
    wanted = _frontier(nodes)
    if not wanted:
        return 0
    try:
        values = _evaluate(model, nodes, wanted)
    except InputError as error:
        logger.info("constant folding: one session failed (%s); trying node by node", error)
        values = _evaluate_one_by_one(model, nodes)
    values.update(_low_precision_values(model, nodes, values))
    replaced = 0
    for value in wanted:
        array = values.get(value)
        if not isinstance(array, np.ndarray) or array.dtype == object:
            continue  # sequences, maps and strings stay as they are (or were refused)
        source_size = sum(
            v.const_value.size for v in value.producer().inputs if v is not None and v.const_value is not None
        )
        if array.size > output_size_limit and array.size > source_size:
            continue
        name = value.name
        value.name = None  # the constant takes the name; the dead value gives it up
        tensor = ir.tensor(array, name=name)
        constant = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        graph.register_initializer(constant)
        ir.convenience.replace_all_uses_with(value, constant)
        replaced += 1
    return replaced
