"""fuse-norm on every spelling of ``normfold.models.norm_spellings``, as the exporters write it.

Each spelling is exported with TorchScript (opsets 14 and 17) and dynamo (18 without its
optimizer, 23 where it matters), with symbolic batch/seq axes, half precision where the
spelling is, and an all-zero row in the inputs. For both targets the fused graph must pass
``onnx.checker`` (full check), hold exactly the expected fused ops and none of the decomposed
ones, and compute what the exported graph computes (onnxruntime, optimizations off on both)
and what the torch module computes in float64. Near misses must come out unchanged, refused
with their reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from normfold import io, runtime  # noqa: E402
from normfold.models import norm_spellings as spellings  # noqa: E402
from normfold.passes import PassOptions  # noqa: E402
from normfold.passes.cleanup import CleanupPass  # noqa: E402
from normfold.passes.fuse_norm import FuseNormPass  # noqa: E402

# What a fused graph must no longer hold (Sqrt/Pow/Reciprocal only appear in these spellings
# inside the normalizations).
DECOMPOSED = ("ReduceMean", "ReduceSum", "Sqrt", "Pow", "Reciprocal")
FUSE_CASES = [
    (name, variant)
    for name, spelling in spellings.SPELLINGS.items()
    if spelling.expect == "fuse"
    for variant in spelling.variants
]
REFUSE_CASES = [
    (name, variant)
    for name, spelling in spellings.SPELLINGS.items()
    if spelling.expect == "refuse"
    for variant in spelling.variants
]


@pytest.fixture(scope="module")
def zoo_models():
    cache: dict[str, spellings.ZooModel] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = spellings.build(name)
        return cache[name]

    return get


def _cleaned(name: str, variant: str) -> ir.Model:
    model = io.load(spellings.cached_export(name, variant))
    CleanupPass()(model)
    return model


def _fuse(model: ir.Model, target: str, skip_ops: bool = False) -> tuple[ir.Model, FuseNormPass]:
    fuse = FuseNormPass(PassOptions(target=target), skip_ops=skip_ops)
    fuse(model)
    io.check(model, "fused", full_check=True)
    return model, fuse


def _float64_reference(zoo) -> dict[str, np.ndarray]:
    module = zoo.module.to(torch.float64)
    try:
        inputs = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in zoo.example_inputs)
        with torch.inference_mode():
            result = module(*inputs)
    finally:
        module.to(zoo.example_inputs[0].dtype)
    outputs = result if isinstance(result, tuple) else (result,)
    return {name: t.numpy() for name, t in zip(zoo.output_names, outputs)}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float, atol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        actual, expected = got[name].astype(np.float64), want[name].astype(np.float64)
        assert actual.shape == expected.shape, name
        # A NaN where the exported graph has one (no eps) is computing the same thing.
        assert np.array_equal(np.isfinite(actual), np.isfinite(expected)), name
        finite = np.isfinite(expected)
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol, err_msg=name)


SKIP_CASES = [
    (name, variant) for name, variant in FUSE_CASES if spellings.SPELLINGS[name].skip_ops is not None
]


@pytest.mark.parametrize(
    "target,skip_ops",
    [("onnx", False), ("onnxruntime", False)],
)
@pytest.mark.parametrize("name,variant", FUSE_CASES)
def test_spelling_is_fused(name: str, variant: str, target: str, skip_ops: bool, zoo_models) -> None:
    _check_fused(name, variant, target, skip_ops, zoo_models)


@pytest.mark.parametrize("name,variant", SKIP_CASES)
def test_residual_spelling_with_skip_ops(name: str, variant: str, zoo_models) -> None:
    _check_fused(name, variant, "onnxruntime", True, zoo_models)


def _check_fused(name: str, variant: str, target: str, skip_ops: bool, zoo_models) -> None:
    spelling = spellings.SPELLINGS[name]
    zoo = zoo_models(name)
    original = _cleaned(name, variant)
    feeds = zoo.feeds()
    expected = runtime.run(ir.to_proto(original), feeds)
    model, fuse = _fuse(_cleaned(name, variant), target, skip_ops)
    ops = Counter(node.op_type for node in model.graph.all_nodes())
    if skip_ops:
        wanted = spelling.skip_ops
    elif target == "onnx" or any(node.op_type == "RMSNormalization" for node in original.graph):
        # An exporter's own RMSNormalization-23 is one op already, and onnxruntime runs it.
        wanted = spelling.ops
    else:
        wanted = spelling.expected_ort_ops
    assert {op: ops[op] for op in wanted} == wanted, (ops, fuse.record.refused)
    leftover = {op: ops[op] for op in DECOMPOSED if ops[op]}
    assert not leftover, (leftover, fuse.record.refused)
    if target == "onnx":
        needs = {"LayerNormalization": 17, "GroupNormalization": 21, "RMSNormalization": 23}
        assert model.opset_imports[""] >= max((needs.get(op, 1) for op in wanted), default=1)
    else:
        # onnxruntime runs every op it gets at the model's own opset.
        assert model.opset_imports[""] == original.opset_imports[""]
    for site in fuse.record.sites:
        assert site["into"] in wanted
    actual = runtime.run(ir.to_proto(model), feeds)
    _assert_close(actual, expected, spelling.rtol, spelling.atol)
    # Against torch in float64 wherever the export computes what torch does (dynamo's optimizer
    # drops a 1e-12 eps, which turns zero rows into NaN in the export itself).
    reference = _float64_reference(zoo)
    for out_name, want in reference.items():
        keep = np.isfinite(expected[out_name])
        np.testing.assert_allclose(
            actual[out_name][keep].astype(np.float64), want[keep], rtol=spelling.rtol * 10, atol=spelling.atol * 10
        )


@pytest.mark.parametrize("name,variant", REFUSE_CASES)
def test_near_miss_is_refused(name: str, variant: str) -> None:
    spelling = spellings.SPELLINGS[name]
    before = Counter(node.op_type for node in _cleaned(name, variant).graph.all_nodes())
    model, fuse = _fuse(_cleaned(name, variant), "onnx")
    after = Counter(node.op_type for node in model.graph.all_nodes())
    assert after == before
    assert fuse.record.applied == 0
    reasons = [refusal["reason"] for refusal in fuse.record.refused]
    assert any(spelling.reason in reason for reason in reasons), reasons


def test_bert_eps_survives_on_zero_rows() -> None:
    """eps 1e-12 stays 1e-12 (in float32), so an all-zero (padding) row stays finite."""
    zoo = spellings.build("ln_hand_bert")
    feeds = zoo.feeds()
    assert not feeds["x"][0, 1].any()
    model, _ = _fuse(_cleaned("ln_hand_bert", "ts14"), "onnx")
    (node,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert node.attributes.get_float("epsilon") == float(np.float32(1e-12))
    out = runtime.run(ir.to_proto(model), feeds)["y"]
    assert np.isfinite(out).all()
    bias = zoo.module.bias.detach().numpy()
    np.testing.assert_array_equal(out[0, 1], bias)


def test_exporter_without_eps_is_fused_with_eps_zero() -> None:
    """dynamo's optimizer deletes ``+ 1e-12`` (TRAPS.md); fuse-norm neither adds nor removes eps."""
    original = _cleaned("ln_hand_bert", "dynamo18")
    assert not any(n.op_type == "Add" and n.inputs[1].const_value is not None and n.inputs[1].const_value.size == 1
                   for n in original.graph)
    model, fuse = _fuse(_cleaned("ln_hand_bert", "dynamo18"), "onnx")
    (site,) = fuse.record.sites
    assert site["epsilon"] == 0.0 and "no eps" in site["spelling"]
    feeds = spellings.build("ln_hand_bert").feeds()
    _assert_close(runtime.run(ir.to_proto(model), feeds), runtime.run(ir.to_proto(original), feeds), 1e-5, 1e-5)


def test_residual_sum_read_elsewhere_uses_the_skip_sum_output() -> None:
    model, fuse = _fuse(_cleaned("skip_ln_sum_read", "ts17"), "onnxruntime", skip_ops=True)
    (skip,) = [n for n in model.graph if n.op_type == "SkipLayerNormalization"]
    assert skip.domain == "com.microsoft"
    assert len(skip.outputs) == 4 and skip.outputs[3].is_graph_output()
    assert not any(n.op_type == "Add" and n.outputs[0].is_graph_output() for n in model.graph)


@pytest.mark.parametrize("name", ["skip_ln", "skip_ln_sum_read", "skip_rms"])
def test_skip_ops_are_refused_by_default_as_slower(name: str) -> None:
    model, fuse = _fuse(_cleaned(name, "ts17"), "onnxruntime")
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    reasons = [r["reason"] for r in fuse.record.refused]
    assert any("left apart" in r and "slower" in r for r in reasons), reasons


def test_group_norm_spelled_for_onnxruntime_is_refused_with_the_measurement() -> None:
    _, fuse = _fuse(_cleaned("gn_nn", "ts17"), "onnxruntime")
    assert fuse.record.applied == 0
    assert any("InstanceNormalization" in r["reason"] and "slower" in r["reason"] for r in fuse.record.refused)
