"""fold-bn through shape ops: a BN after Flatten/Reshape/Transpose/… of a linear op's output.

Every graph runs before and after through onnxruntime with optimizations off (``run_pass``);
a refusal leaves the BN in place with the reason and the numbers unchanged. The hypothesis test
builds random Transpose/Reshape chains over a MatMul output whose token axis has as many
entries as its channel axis, so a fold that follows sizes instead of the channels shows.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from normfold import io, runtime
from normfold.passes import PassOptions, create_passes
from tests._fold_helpers import array, feeds_for, make, op_types, rel_error
from tests.test_fold_bn import bn_node, fold


def linear_norm(rng: np.random.Generator, *, dtype: type = np.float32, bias: bool = False,
                tokens: int = 5, features: int = 6) -> tuple[list, list]:
    """timm LeViT's LinearNorm as TorchScript exports it: MatMul → Flatten(axis=2) → BN →
    Reshape(Shape(y)) back to ``(N, L, C)``."""
    inits = [array("w", rng.normal(size=(4, features)), dtype)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="linear")]
    y = "mm"
    if bias:
        inits.append(array("b", rng.normal(size=features), dtype))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="linear_bias"))
        y = "y"
    bn, bn_inits = bn_node("flat", "normed", features, rng, dtype=dtype)
    nodes += [
        helper.make_node("Flatten", [y], ["flat"], name="flatten", axis=2),
        bn,
        helper.make_node("Shape", [y], ["shape"], name="shape"),
        helper.make_node("Reshape", ["normed", "shape"], ["out"], name="back"),
    ]
    return nodes, inits + bn_inits


def tokens_model(nodes, inits, *, elem=TensorProto.FLOAT, outputs=("out",)) -> onnx.ModelProto:
    return make(nodes, inits, {"x": ("N", 5, 4)}, list(outputs), elem=elem)


@pytest.mark.parametrize("bias", [False, True])
def test_levit_linear_norm_folds_into_the_matmul(bias: bool) -> None:
    model, record = fold(tokens_model(*linear_norm(np.random.default_rng(0), bias=bias)))
    ops = op_types(model)
    assert "BatchNormalization" not in ops
    assert ops.count("MatMul") == 1 and ops.count("Shape") == 1
    (site,) = record["sites"]
    assert site["how"] == "producer-route" and site["through"] == ["Flatten"]
    # The Shape reader moved to the folded output: the original MatMul is gone.
    (shape,) = [n for n in model.graph if n.op_type == "Shape"]
    assert shape.inputs[0].producer().op_type in ("MatMul", "Add")


def test_reshape_to_rows_and_transpose_fold() -> None:
    """dynamo's spelling (Reshape to (-1, C)), and BN1d over channels after a Transpose."""
    rng = np.random.default_rng(1)
    bn1, i1 = bn_node("rows", "n1", 6, rng, name="bn1")
    bn2, i2 = bn_node("t", "n2", 6, rng, name="bn2")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="linear"),
        helper.make_node("Reshape", ["mm", "rows_shape"], ["rows"], name="to_rows"),
        bn1,
        helper.make_node("MatMul", ["x", "w2"], ["mm2"], name="linear2"),
        helper.make_node("Transpose", ["mm2"], ["t"], name="tr", perm=[0, 2, 1]),
        bn2,
    ]
    inits = [array("w", rng.normal(size=(4, 6))), array("w2", rng.normal(size=(4, 6))),
             array("rows_shape", np.array([-1, 6]), np.int64), *i1, *i2]
    model, record = fold(tokens_model(nodes, inits, outputs=("n1", "n2")))
    assert "BatchNormalization" not in op_types(model)
    assert {s["node"] for s in record["sites"]} == {"bn1", "bn2"}


def test_gemm_then_unsqueeze() -> None:
    """``bn1d(linear(x).unsqueeze(-1))``: Gemm's features are axis 1 of ``(N, C, 1)``."""
    rng = np.random.default_rng(2)
    bn, bi = bn_node("u", "y", 6, rng)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", transB=1),
             helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsq"), bn]
    inits = [array("w", rng.normal(size=(6, 4))), array("c", rng.normal(size=6)),
             array("axes", np.array([2]), np.int64), *bi]
    model, record = fold(make(nodes, inits, {"x": ("N", 4)}, ["y"]))
    assert op_types(model) == ["Gemm", "Unsqueeze"]


def test_channels_merged_with_tokens_are_refused() -> None:
    """Flatten(axis=1) of ``(N, L, C)`` makes features ``l·C + c``: BN over them is per (l, c)."""
    rng = np.random.default_rng(3)
    bn, bi = bn_node("flat", "y", 30, rng)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="linear"),
             helper.make_node("Flatten", ["mm"], ["flat"], name="flatten", axis=1), bn]
    model, record = fold(tokens_model(nodes, [array("w", rng.normal(size=(4, 6))), *bi],
                                      outputs=("y",)), tol=0)
    assert "BatchNormalization" in op_types(model)
    assert "merged with an axis before them" in record["refused"][0]["reason"]


def test_tokens_on_the_bn_axis_are_refused() -> None:
    """MatMul of ``(N, C, C)``: axis 1 has C entries, but they are tokens, not features."""
    rng = np.random.default_rng(4)
    bn, bi = bn_node("mm", "y", 4, rng)
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("MatMul", ["xi", "w"], ["mm"], name="linear"), bn]
    proto = make(nodes, [array("w", rng.normal(size=(4, 4))), *bi], {"x": ("N", 4, 4)}, ["y"])
    model, record = fold(proto, tol=0)
    assert "BatchNormalization" in op_types(model)
    assert "axis 2" in record["refused"][0]["reason"]


def test_other_reader_of_the_chain_is_refused() -> None:
    rng = np.random.default_rng(5)
    nodes, inits = linear_norm(rng)
    nodes.append(helper.make_node("Relu", ["flat"], ["r"], name="relu"))
    model, record = fold(tokens_model(nodes, inits, outputs=("out", "r")), tol=0)
    assert "BatchNormalization" in op_types(model)
    assert "also read by Relu relu" in record["refused"][0]["reason"]


def test_float16_linear_norm_against_float32() -> None:
    nodes32, inits32 = linear_norm(np.random.default_rng(6), bias=True)
    nodes16, inits16 = linear_norm(np.random.default_rng(6), bias=True, dtype=np.float16)
    reference = tokens_model(nodes32, inits32)
    proto16 = tokens_model(nodes16, inits16, elem=TensorProto.FLOAT16)
    feeds32 = feeds_for(reference)
    feeds16 = {k: v.astype(np.float16) for k, v in feeds32.items()}
    expected = runtime.run(reference, feeds32)
    unfolded = rel_error(runtime.run(proto16, feeds16), expected)
    model, _ = fold(proto16, tol=5e-3, feeds=feeds16)
    assert "BatchNormalization" not in op_types(model)
    assert rel_error(runtime.run(model, feeds16), expected) <= max(2 * unfolded, 1e-3)


@settings(max_examples=30, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    merge=st.sampled_from(["none", "front", "back", "split"]),
    seed=st.integers(0, 1000),
)
def test_random_chains_fold_exactly_or_are_refused(perm, merge, seed) -> None:
    """MatMul → (N=2, L=4, C=4) → Transpose(perm) → Reshape: whatever lands on axis 1 with
    a static size gets a BN of that many channels; the fold must be exact or refused."""
    rng = np.random.default_rng(seed)
    sizes = [2, 4, 4]
    permuted = [sizes[p] for p in perm]
    target = {
        "none": permuted,
        "front": [permuted[0] * permuted[1], permuted[2]],
        "back": [permuted[0], permuted[1] * permuted[2]],
        "split": [permuted[0], 2, permuted[1] // 2, permuted[2]] if permuted[1] % 2 == 0 else permuted,
    }[merge]
    bn, bi = bn_node("r", "y", target[1], rng)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="linear"),
             helper.make_node("Transpose", ["mm"], ["t"], name="tr", perm=list(perm)),
             helper.make_node("Reshape", ["t", "shape"], ["r"], name="rs"), bn]
    inits = [array("w", rng.normal(size=(3, 4))), array("shape", np.array(target), np.int64), *bi]
    proto = make(nodes, inits, {"x": (2, 4, 3)}, ["y"])
    model, record = fold(proto, tol=1e-5)
    folded = "BatchNormalization" not in op_types(model)
    # The MatMul's channels (axis 2) are alone on axis 1 only when the Transpose puts them there
    # and the Reshape keeps the axes, or puts them last and merges the two axes before them.
    where = list(perm).index(2)
    assert folded == ((where == 1 and merge == "none") or (where == 2 and merge == "front")), record


def _levit_variants() -> list:
    try:
        from normfold.models.export import DEFAULT_VARIANT, KNOWN_FAILURES, VARIANTS
    except ImportError:
        return []
    return [
        pytest.param(variant, marks=[] if variant == DEFAULT_VARIANT else [pytest.mark.slow])
        for variant in VARIANTS
        if ("levit", variant) not in KNOWN_FAILURES
    ]


@pytest.mark.parametrize("variant", _levit_variants())
def test_zoo_levit_every_bn_folds(variant: str) -> None:
    """timm LeViT's LinearNorm/ConvNorm/NormLinear: no BN left in any export; outputs match in
    onnxruntime (float16 judged against the float32 export's run and the unfolded fp16 one)."""
    pytest.importorskip("torch")
    from normfold.models import build
    from normfold.models.export import VARIANTS, cached_export

    zoo = build("levit")
    half = VARIANTS[variant].half
    path = cached_export("levit", variant)
    feeds = (zoo.half() if half else zoo).feeds()
    model = io.load(path)
    passes = create_passes(None, PassOptions(freeze_initializer_inputs=variant == "ts13-inputs"))
    for each in passes:
        each(model)
    assert "BatchNormalization" not in op_types(model)
    assert passes[1].record.to_dict()["refused"] == []
    if not half:
        assert rel_error(runtime.run(model, feeds), runtime.run(path, feeds)) <= 1e-5
        return
    reference = runtime.run(cached_export("levit", "ts17"), zoo.feeds())
    unfolded = rel_error(runtime.run(path, feeds), reference)
    assert rel_error(runtime.run(model, feeds), reference) <= max(2 * unfolded, 2e-3)


def test_densenet_pre_activation_bn_says_why_no_fold_exists() -> None:
    """DenseNet: ``Concat → BN → Relu → Conv``. Neither side can take the BN exactly."""
    rng = np.random.default_rng(7)
    bn, bi = bn_node("cat", "n", 6, rng)
    nodes = [helper.make_node("Concat", ["x", "z"], ["cat"], name="concat", axis=1), bn,
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    proto = make(nodes, [array("w", rng.normal(size=(4, 6, 3, 3))), *bi],
                 {"x": ("N", 3, 5, 5), "z": ("N", 3, 5, 5)}, ["y"])
    model, record = fold(proto, tol=0)
    assert "BatchNormalization" in op_types(model)
    (refusal,) = record["refused"]
    assert "No exact fold exists" in refusal["reason"]
    assert "Concat concat combines it with other tensors" in refusal["reason"]
    assert "pre-activation" in refusal["reason"]


# --- the mirror: a BN before shape ops folds into the op that reads them -------------------


def test_bn_then_flatten_transpose_folds_into_the_matmul() -> None:
    """``linear(bn(x).flatten(2).transpose(1, 2))``: the channels become the MatMul's K."""
    rng = np.random.default_rng(8)
    bn, bi = bn_node("x", "n", 4, rng)
    nodes = [bn,
             helper.make_node("Reshape", ["n", "to_tokens"], ["tokens"], name="flat"),
             helper.make_node("Transpose", ["tokens"], ["t"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="linear")]
    inits = [array("to_tokens", np.array([0, 0, -1]), np.int64),
             array("w", rng.normal(size=(4, 6))), *bi]
    model, record = fold(make(nodes, inits, {"x": ("N", 4, 3, 3)}, ["y"]))
    assert "BatchNormalization" not in op_types(model)
    assert record["sites"] == [{"node": "bn", "into": "linear", "how": "consumer"}]


def test_bn_then_transpose_onto_tokens_is_refused() -> None:
    """BN on ``(A, C, B)`` transposed to ``(B, C, A)`` with ``A == C``: the channels stay on axis
    1 while the MatMul sums over the last axis, so the scale does not fold into its weight."""
    rng = np.random.default_rng(9)
    bn, bi = bn_node("x", "n", 4, rng)
    nodes = [bn, helper.make_node("Transpose", ["n"], ["t"], name="tr", perm=[2, 1, 0]),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="linear")]
    proto = make(nodes, [array("w", rng.normal(size=(4, 5))), *bi], {"x": (4, 4, 3)}, ["y"])
    model, record = fold(proto, tol=0)
    assert "BatchNormalization" in op_types(model)
    assert "channels are on axis 1 there" in record["refused"][0]["reason"]
