"""fuse-norm and raise_opset on the zoo's exports: every normalization module becomes one op.

The expected counts come from the torch modules themselves (one fused op per LayerNorm /
RMSNorm / GroupNorm module; T5's ``T5LayerNorm`` and Gemma's ``(1 + weight)`` norm are RMSNorms,
DiT's affine-free ``nn.LayerNorm`` a LayerNorm), so the tests follow the zoo's sizes. Outputs
are compared with the exported graph through onnxruntime (optimizations off on both); float16
exports within float16 tolerance, since the fused ops compute in float32 (``stash_type``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from normfold import io, runtime  # noqa: E402
from normfold.errors import NormfoldError  # noqa: E402
from normfold.models import build  # noqa: E402
from normfold.models.export import VARIANTS, cached_export  # noqa: E402
from normfold.passes import PassOptions  # noqa: E402
from normfold.passes.cleanup import CleanupPass  # noqa: E402
from normfold.passes.fuse_norm import FuseNormPass  # noqa: E402
from normfold.opset import model_opset, raise_opset  # noqa: E402

CASES = [
    ("bert", "ts13"),
    ("bert", "dynamo18-noopt"),
    ("llama", "ts17"),
    ("llama", "dynamo18"),
    ("convnext", "ts14"),
    ("unet", "ts14"),
    ("unet", "dynamo18"),
    ("t5", "ts14"),
    ("t5", "dynamo18"),
    ("t5", "ts17-fp16"),
    ("gemma", "ts17"),
    ("gemma", "dynamo18-noopt"),
    ("gemma", "ts17-fp16"),
    ("dit", "ts14"),
    ("dit", "dynamo18"),
    ("dit", "ts17-fp16"),
    ("t5", "dynamo23"),
    ("dit", "dynamo23"),
]
# Hand-written RMSNorms whose class name does not say so.
_RMS_NORMS = ("T5LayerNorm",)


def _targets(cases: list[tuple[str, str]]) -> list:
    return [
        pytest.param(name, variant, target, id=f"{name}-{variant}-{target}")
        for name, variant in cases
        for target in ("onnx", "onnxruntime")
    ]


def _norm_modules(name: str) -> Counter:
    """Normalization modules of the zoo model, by the op each must become (target onnx)."""
    from torch import nn

    found: Counter = Counter()
    for module in build(name).module.modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind == "LayerNorm":
            found["LayerNormalization"] += 1
        elif isinstance(module, nn.RMSNorm) or kind.endswith("RMSNorm") or kind in _RMS_NORMS:
            found["RMSNormalization"] += 1
        elif isinstance(module, nn.GroupNorm):
            found["GroupNormalization"] += 1
    return found


def _square_pows(model: ir.Model) -> list[str]:
    """Pow nodes with exponent 2 (T5's gelu_new has a Pow(x, 3), which is no normalization's)."""
    squares = []
    for node in model.graph.all_nodes():
        exponent = node.inputs[1].const_value if node.op_type == "Pow" else None
        if exponent is not None and float(exponent.numpy().reshape(-1)[0]) == 2.0:
            squares.append(node.name)
    return squares


def _cleaned(name: str, variant: str) -> ir.Model:
    model = io.load(cached_export(name, variant))
    CleanupPass()(model)
    return model


def _assert_same_outputs(model: ir.Model, reference: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    want = runtime.run(ir.to_proto(reference), feeds)
    got = runtime.run(ir.to_proto(model), feeds)
    for name, expected in want.items():
        if expected.dtype == np.float16:
            scale = float(np.abs(expected.astype(np.float64)).max())
            error = float(np.abs(got[name].astype(np.float64) - expected).max())
            assert error <= 5e-3 * scale, f"{name}: max |diff| {error:.3g} vs scale {scale:.3g}"
        else:
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name,variant,target", _targets(CASES))
def test_every_zoo_normalization_becomes_one_op(name: str, variant: str, target: str) -> None:
    expected = _norm_modules(name)
    assert expected, name
    original = _cleaned(name, variant)
    if target == "onnxruntime":
        # GroupNorm kept as (or made into) Reshape + InstanceNormalization: faster on the CPU
        # provider; RMSNorm as onnxruntime's own SimplifiedLayerNormalization, unless the
        # exporter wrote RMSNormalization-23 already (one op, as fast: kept).
        exported = {node.op_type for node in original.graph.all_nodes()}
        ort_spelling = {"GroupNormalization": "InstanceNormalization"}
        if "RMSNormalization" not in exported:
            ort_spelling["RMSNormalization"] = "SimplifiedLayerNormalization"
        expected = Counter({ort_spelling.get(op, op): n for op, n in expected.items()})
    model = _cleaned(name, variant)
    fuse = FuseNormPass(PassOptions(target=target))
    fuse(model)
    io.check(model, "fused", full_check=True)
    if target == "onnxruntime":
        assert model_opset(model) == model_opset(original)
    ops = Counter(node.op_type for node in model.graph.all_nodes())
    assert {op: ops[op] for op in expected} == dict(expected), fuse.record.refused
    assert not {"Sqrt", "Reciprocal"} & set(ops), ops
    assert _square_pows(model) == [], "a Pow(x, 2) is left: part of a normalization was not fused"
    zoo = build(name)
    _assert_same_outputs(model, original, (zoo.half() if VARIANTS[variant].half else zoo).feeds())


@pytest.mark.parametrize(
    "name,variant,version",
    [("bert", "ts13", 17), ("bert", "ts13-inputs", 17), ("llama", "ts14", 23), ("unet", "ts17", 21),
     ("resnet", "dynamo18", 23)],
)
def test_raise_opset_keeps_outputs_bit_identical(name: str, variant: str, version: int) -> None:
    original = io.load(cached_export(name, variant))
    model = io.load(cached_export(name, variant))
    assert raise_opset(model, version)
    assert model_opset(model) == version
    # The interface and the weights stay (an export that lists its weights as inputs too).
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert set(model.graph.initializers) == set(original.graph.initializers)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = build(name).feeds()
    want = runtime.run(ir.to_proto(original), feeds)
    got = runtime.run(ir.to_proto(model), feeds)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


def test_raise_opset_never_lowers_and_leaves_the_model_alone_on_failure() -> None:
    model = io.load(cached_export("resnet", "ts17"))
    nodes = [node.op_type for node in model.graph]
    assert not raise_opset(model, 13)
    with pytest.raises(NormfoldError, match="cannot convert opset 17 to 99"):
        raise_opset(model, 99)
    assert model_opset(model) == 17
    assert [node.op_type for node in model.graph] == nodes
