"""fold-branches: sums of parallel branches merged into one Conv, checked in onnxruntime.

Every test runs the original and the rewritten model with onnxruntime's optimizations off
(``run_pass``); refusals check that the branch stays, with its reason, and the numbers do not
change. The math module is checked on its own against torch's convolutions in float64.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from normfold import io, runtime
from normfold.errors import Refusal
from normfold.math import branches as bm
from normfold.passes import PassOptions, create_passes
from normfold.passes.fold_branches import FoldBranchesPass
from tests._fold_helpers import array, feeds_for, make, op_types, rel_error, run_pass
from tests.test_fold_bn import bn_node

C = 4  # channels of the hand-built blocks


def conv(
    x: str,
    y: str,
    rng: np.random.Generator,
    kernel: tuple[int, int],
    *,
    name: str,
    cin: int = C,
    cout: int = C,
    group: int = 1,
    stride: int = 1,
    pads: list[int] | None = None,
    bias: bool = True,
    dtype: type = np.float32,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A Conv with random weights, centred pads by default."""
    if pads is None:
        pads = [(kernel[0] - 1) // 2, (kernel[1] - 1) // 2] * 2
    inits = [array(f"{name}.w", rng.normal(size=(cout, cin // group, *kernel)), dtype)]
    inputs = [x, f"{name}.w"]
    if bias:
        inits.append(array(f"{name}.b", rng.normal(size=cout), dtype))
        inputs.append(f"{name}.b")
    node = helper.make_node(
        "Conv", inputs, [y], name=name, pads=pads, strides=[stride, stride], group=group,
        kernel_shape=list(kernel),
    )
    return [node], inits


def conv_bn(x: str, y: str, rng: np.random.Generator, kernel: tuple[int, int], *, name: str,
            dtype: type = np.float32, **kwargs) -> tuple[list, list]:
    nodes, inits = conv(x, f"{name}.out", rng, kernel, name=name, bias=False, dtype=dtype, **kwargs)
    bn, bn_inits = bn_node(f"{name}.out", y, kwargs.get("cout", C), rng, name=f"{name}.bn", dtype=dtype)
    return nodes + [bn], inits + bn_inits


def repvgg_block(rng: np.random.Generator, *, dtype: type = np.float32, group: int = 1,
                 small: tuple[int, int] = (1, 1), pads_small: list[int] | None = None
                 ) -> tuple[list, list]:
    """timm's RepVggBlock: ``Add(Add(BN(conv1x1(x)), BN(conv3x3(x))), BN(x))``, then Relu."""
    n1, i1 = conv_bn("x", "b1", rng, small, name="c1", group=group, dtype=dtype, pads=pads_small)
    n3, i3 = conv_bn("x", "b3", rng, (3, 3), name="c3", group=group, dtype=dtype)
    ident, ii = bn_node("x", "bi", C, rng, name="ident", dtype=dtype)
    nodes = n1 + n3 + [ident,
                       helper.make_node("Add", ["b1", "b3"], ["s"], name="add1"),
                       helper.make_node("Add", ["s", "bi"], ["sum"], name="add2"),
                       helper.make_node("Relu", ["sum"], ["y"], name="relu")]
    return nodes, i1 + i3 + ii


def fold(proto: onnx.ModelProto, **kwargs):
    return run_pass(proto, FoldBranchesPass, **kwargs)


def block_model(nodes, inits, *, size: int = 6, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    return make(nodes, inits, {"x": ("N", C, size, size)}, ["y"], elem=elem)


# --- merged ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 4])
def test_repvgg_block_becomes_one_conv(group: int) -> None:
    rng = np.random.default_rng(group)
    model, record = fold(block_model(*repvgg_block(rng, group=group)))
    assert op_types(model) == ["Conv", "Relu"]
    (conv_node,) = [n for n in model.graph if n.op_type == "Conv"]
    assert conv_node.attributes["group"].value == group
    assert record["applied"] == 1 and record["refused"] == []
    assert len(record["sites"][0]["branches"]) == 3


def test_after_fold_bn_the_default_passes_leave_one_conv() -> None:
    """In the default order fold-bn folds the conv BNs first; the identity BN is left to us."""
    rng = np.random.default_rng(3)
    proto = block_model(*repvgg_block(rng))
    feeds = feeds_for(proto)
    model = io.load(proto)
    passes = create_passes(None, PassOptions())
    for each in passes:
        each(model)
    assert op_types(model) == ["Conv", "Relu"]
    assert rel_error(runtime.run(model, feeds), runtime.run(proto, feeds)) < 1e-5


def test_acnet_asymmetric_kernels_and_sum() -> None:
    """ACNet: 3×3 + 1×3 + 3×1 (+BN each), written as one Sum node."""
    rng = np.random.default_rng(1)
    n3, i3 = conv_bn("x", "a", rng, (3, 3), name="sq")
    nh, ih = conv_bn("x", "b", rng, (1, 3), name="hor")
    nv, iv = conv_bn("x", "c", rng, (3, 1), name="ver")
    nodes = n3 + nh + nv + [helper.make_node("Sum", ["a", "b", "c"], ["y"], name="sum")]
    model, record = fold(block_model(nodes, i3 + ih + iv))
    assert op_types(model) == ["Conv"]
    assert record["sites"][0]["into"] == "sq/branches"


def test_dbb_average_pool_and_pointwise_then_kxk() -> None:
    """DBB: 3×3 + (1×1 → 3×3, unbiased 1×1) + AvgPool 3×3 (count_include_pad) + BN each."""
    rng = np.random.default_rng(2)
    n3, i3 = conv_bn("x", "a", rng, (3, 3), name="main")
    n1, i1 = conv("x", "mid", rng, (1, 1), name="pw", bias=False)
    nk, ik = conv_bn("mid", "b", rng, (3, 3), name="kxk")
    pool = helper.make_node("AveragePool", ["x"], ["p"], name="pool", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1], count_include_pad=1)
    pbn, pi = bn_node("p", "c", C, rng, name="pool.bn")
    nodes = n3 + n1 + nk + [pool, pbn,
                            helper.make_node("Add", ["a", "b"], ["s"], name="add1"),
                            helper.make_node("Add", ["s", "c"], ["y"], name="add2")]
    model, record = fold(block_model(nodes, i3 + i1 + ik + pi))
    assert op_types(model) == ["Conv"]
    assert len(record["sites"][0]["branches"]) == 3


def test_strided_block_without_identity() -> None:
    rng = np.random.default_rng(4)
    n3, i3 = conv_bn("x", "a", rng, (3, 3), name="c3", stride=2)
    n1, i1 = conv_bn("x", "b", rng, (1, 1), name="c1", stride=2)
    nodes = n3 + n1 + [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model, _ = fold(block_model(nodes, i3 + i1, size=7))
    assert op_types(model) == ["Conv"]


def test_plain_skip_goes_into_the_kernel_centre_and_other_terms_stay() -> None:
    """``Conv(x) + x + z``: the skip merges into the Conv, ``z`` (another tensor) stays added."""
    rng = np.random.default_rng(5)
    nc, ic = conv("x", "a", rng, (3, 3), name="c3")
    nodes = nc + [helper.make_node("Add", ["a", "x"], ["s"], name="add1"),
                  helper.make_node("Add", ["s", "z"], ["y"], name="add2")]
    proto = make(nodes, ic, {"x": ("N", C, 5, 5), "z": ("N", C, 5, 5)}, ["y"])
    model, _ = fold(proto)
    assert op_types(model) == ["Conv", "Add"]


@pytest.mark.parametrize("identity_bn", [True, False])
def test_identity_of_a_conv_output_merges_with_its_depthwise_conv(identity_bn: bool) -> None:
    """timm's RepGhost (and FastViT's PatchEmbed after a Conv): ``y = Conv(x)`` is read by a
    depthwise Conv and by the sum, ``BN(DWConv(y)) + BN(y)``. The ``BN(y)`` leaf is also
    ``BN(Conv(x))``; it is the identity branch of ``y`` here, merged into the depthwise Conv."""
    rng = np.random.default_rng(13)
    primary, ip = conv("x", "y1", rng, (1, 1), name="primary")
    cheap, ic = conv_bn("y1", "a", rng, (3, 3), name="cheap", group=C)
    if identity_bn:
        ident, ii = bn_node("y1", "b", C, rng, name="fusion_bn")
        nodes, inits, other = primary + cheap + [ident], ip + ic + ii, "b"
    else:
        nodes, inits, other = primary + cheap, ip + ic, "y1"
    nodes.append(helper.make_node("Add", ["a", other], ["y"], name="add"))
    model, record = fold(block_model(nodes, inits))
    assert op_types(model) == ["Conv", "Conv"]
    assert record["applied"] == 1 and record["refused"] == []
    assert record["sites"][0]["into"] == "cheap/branches"
    assert any(label.startswith("identity") for label in record["sites"][0]["branches"])


def repmixer_block(rng: np.random.Generator) -> tuple[list, list]:
    """timm's FastViT RepMixer: ``x + γ·(mixer(x) − norm(x))``, ``mixer`` a depthwise
    MobileOneBlock (``BN(DWConv3×3(x)) + BN(x)``), ``norm`` its identity BN alone, ``γ`` of
    shape (C, 1, 1)."""
    mixer, im = conv_bn("x", "a", rng, (3, 3), name="mixer", group=C)
    ident, ii = bn_node("x", "b", C, rng, name="mixer.identity")
    norm, inorm = bn_node("x", "n", C, rng, name="norm.identity")
    gamma = array("gamma", rng.uniform(0.5, 1.5, size=(C, 1, 1)))
    nodes = mixer + [ident, norm,
                     helper.make_node("Add", ["a", "b"], ["m"], name="mixer.add"),
                     helper.make_node("Sub", ["m", "n"], ["d"], name="sub"),
                     helper.make_node("Mul", ["d", "gamma"], ["g"], name="layer_scale"),
                     helper.make_node("Add", ["x", "g"], ["y"], name="residual")]
    return nodes, im + ii + inorm + [gamma]


def test_fastvit_repmixer_becomes_one_conv() -> None:
    """The Sub's subtracted BN and the layer scale (a per-channel Mul) are part of the kernel:
    the inner difference merges first, then the residual around its scaled Conv."""
    model, record = fold(block_model(*repmixer_block(np.random.default_rng(14))))
    assert op_types(model) == ["Conv"]
    assert record["applied"] == 2 and record["refused"] == []


def test_sub_of_conv_branches_and_a_scaled_difference_in_the_default_passes() -> None:
    rng = np.random.default_rng(15)
    proto = block_model(*repmixer_block(rng))
    feeds = feeds_for(proto)
    model = io.load(proto)
    for each in create_passes(None, PassOptions()):
        each(model)
    assert op_types(model) == ["Conv"]
    assert rel_error(runtime.run(model, feeds), runtime.run(proto, feeds)) < 1e-5


def test_subtracted_conv_and_a_subtracted_other_tensor() -> None:
    """``(x − BN(Conv3×3(x))) − z``: the Conv's kernel enters negated beside the identity, and
    ``z`` (another tensor) stays subtracted from the merged Conv."""
    rng = np.random.default_rng(17)
    nc, ic = conv_bn("x", "a", rng, (3, 3), name="c3")
    nodes = nc + [helper.make_node("Sub", ["x", "a"], ["d"], name="sub1"),
                  helper.make_node("Sub", ["d", "z"], ["y"], name="sub2")]
    proto = make(nodes, ic, {"x": ("N", C, 5, 5), "z": ("N", C, 5, 5)}, ["y"])
    model, record = fold(proto)
    assert op_types(model) == ["Conv", "Sub"]
    assert record["applied"] == 1


def test_dynamo_zero_terms_go_with_the_merge() -> None:
    """timm's MobileOneBlock starts its sum at ``0``; dynamo without its optimizer keeps
    ``Add(BN(x), 0)`` in the RepMixer's norm and mixer. The zeros go, the block is one Conv."""
    rng = np.random.default_rng(18)
    block, inits = repmixer_block(rng)
    nodes = []
    for node in block:
        nodes.append(node)
        if node.op_type == "BatchNormalization" and node.input[0] == "x":
            name = node.output[0]
            node.output[0] = f"{name}.bn"
            nodes.append(helper.make_node("Add", [f"{name}.bn", "zero"], [name], name=f"{name}.plus0"))
    model, record = fold(block_model(nodes, inits + [array("zero", np.zeros(()))]))
    assert op_types(model) == ["Conv"]
    assert record["applied"] == 2


def test_scale_that_is_not_per_channel_keeps_its_branch() -> None:
    """``x + Conv(x)·s`` with ``s`` varying along the width: no kernel holds it; the sum stays."""
    rng = np.random.default_rng(16)
    nc, ic = conv("x", "a", rng, (3, 3), name="c3")
    scale = array("s", rng.uniform(0.5, 1.5, size=(1, 1, 1, 6)))
    nodes = nc + [helper.make_node("Mul", ["a", "s"], ["g"], name="scale"),
                  helper.make_node("Add", ["x", "g"], ["y"], name="residual")]
    model, record = fold(block_model(nodes, ic + [scale]))
    assert op_types(model) == ["Conv", "Mul", "Add"]
    assert record["applied"] == 0
    assert "not one value per channel" in record["refused"][0]["reason"]


def test_float16_merge_is_judged_against_float32() -> None:
    """Merged in float64 and cast once: no further from the float32 run than the fp16 graph."""
    nodes32, inits32 = repvgg_block(np.random.default_rng(6))
    nodes16, inits16 = repvgg_block(np.random.default_rng(6), dtype=np.float16)
    reference = block_model(nodes32, inits32)
    proto16 = block_model(nodes16, inits16, elem=TensorProto.FLOAT16)
    feeds32 = feeds_for(reference)
    feeds16 = {k: v.astype(np.float16) for k, v in feeds32.items()}
    expected = runtime.run(reference, feeds32)
    unfolded = rel_error(runtime.run(proto16, feeds16), expected)
    model, _ = fold(proto16, tol=5e-3, feeds=feeds16)
    assert op_types(model) == ["Conv", "Relu"]
    merged = rel_error(runtime.run(model, feeds16), expected)
    assert merged <= max(2 * unfolded, 1e-3), (merged, unfolded)


# --- refused -----------------------------------------------------------------------------


def test_float16_overflow_is_refused() -> None:
    """An identity BN with a tiny variance scales its diagonal past float16's range."""
    rng = np.random.default_rng(12)
    n3, i3 = conv("x", "a", rng, (3, 3), name="main", dtype=np.float16)
    ident, ii = bn_node("x", "b", C, rng, name="ident", var="zero", dtype=np.float16,
                        epsilon=1e-12)
    nodes = n3 + [ident, helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = block_model(nodes, i3 + ii, elem=TensorProto.FLOAT16)
    feeds = {k: v.astype(np.float16) for k, v in feeds_for(proto).items()}
    model, record = fold(proto, tol=0, feeds=feeds)
    assert "BatchNormalization" in op_types(model)
    assert "beyond float16's largest value" in record["refused"][0]["reason"]



def test_mismatched_padding_is_refused_with_the_reason() -> None:
    """A second 3×3 branch padded [2, 1, 0, 1] (same output size, window moved) differs at the
    border from the reference's [1, 1, 1, 1]."""
    rng = np.random.default_rng(7)
    proto = block_model(*repvgg_block(rng, small=(3, 3), pads_small=[2, 1, 0, 1]))
    model, record = fold(proto)
    # The 3×3 and the identity still merge; the shifted 1×1 stays, with the reason.
    assert sorted(op_types(model)) == ["Add", "BatchNormalization", "Conv", "Conv", "Relu"]
    (refusal,) = record["refused"]
    assert refusal["node"] == "c1.bn" and "border would change" in refusal["reason"]


def test_pointwise_bias_under_padding_is_refused() -> None:
    """1×1 (biased) → padded 3×3: the border would see the bias, not 0."""
    rng = np.random.default_rng(8)
    n3, i3 = conv("x", "a", rng, (3, 3), name="main")
    n1, i1 = conv("x", "mid", rng, (1, 1), name="pw", bias=True)
    nk, ik = conv("mid", "b", rng, (3, 3), name="kxk")
    nodes = n3 + n1 + nk + [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model, record = fold(block_model(nodes, i3 + i1 + ik), tol=0)
    assert op_types(model).count("Conv") == 3
    assert "border" in record["refused"][0]["reason"]


def test_average_pool_without_count_include_pad_is_refused() -> None:
    rng = np.random.default_rng(9)
    n3, i3 = conv("x", "a", rng, (3, 3), name="main")
    pool = helper.make_node("AveragePool", ["x"], ["p"], name="pool", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1])
    nodes = n3 + [pool, helper.make_node("Add", ["a", "p"], ["y"], name="add")]
    model, record = fold(block_model(nodes, i3), tol=0)
    assert "AveragePool" in op_types(model)
    assert "count_include_pad" in record["refused"][0]["reason"]


def test_branch_read_elsewhere_is_refused() -> None:
    """A branch whose Conv output is also a graph output stays: merging would add a Conv."""
    rng = np.random.default_rng(10)
    n3, i3 = conv("x", "a", rng, (3, 3), name="main")
    n1, i1 = conv_bn("x", "b", rng, (1, 1), name="pw")
    nodes = n3 + n1 + [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = make(nodes, i3 + i1, {"x": ("N", C, 5, 5)}, ["y", "pw.out"])
    model, record = fold(proto, tol=0)
    assert op_types(model).count("Conv") == 2
    assert "also a graph output" in record["refused"][0]["reason"]


def test_branches_of_different_tensors_are_not_a_site() -> None:
    """ResNet's residual: ``BN(conv(h)) + x`` reads two tensors; nothing to merge or refuse."""
    rng = np.random.default_rng(11)
    nc, ic = conv_bn("h", "a", rng, (3, 3), name="c")
    nodes = nc + [helper.make_node("Add", ["a", "x"], ["y"], name="add")]
    proto = make(nodes, ic, {"x": ("N", C, 5, 5), "h": ("N", C, 5, 5)}, ["y"])
    model, record = fold(proto, tol=0)
    assert record["applied"] == 0 and record["refused"] == []


# --- property: every geometry either merges exactly or is refused unchanged ---------------


@settings(max_examples=25, deadline=None)
@given(
    big=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    extra=st.lists(st.sampled_from(["1x1", "1xk", "kx1", "identity", "pool"]),
                   min_size=1, max_size=3, unique=True),
    shifted=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_blocks_merge_exactly_or_are_refused(big, stride, group, extra, shifted, seed):
    rng = np.random.default_rng(seed)
    nodes, inits = conv_bn("x", "t0", rng, (big, big), name="ref", stride=stride, group=group)
    terms = ["t0"]
    for index, kind in enumerate(extra):
        out = f"t{index + 1}"
        kernel = {"1x1": (1, 1), "1xk": (1, big), "kx1": (big, 1)}.get(kind, (big, big))
        pads = [(kernel[0] - 1) // 2, (kernel[1] - 1) // 2] * 2
        if shifted and index == 0:
            # One more row of padding on top (and one less below, where there is one): the
            # window moves; where the output size changes too, the model is invalid (skipped).
            pads = [pads[0] + 1, pads[1], max(pads[2] - 1, 0), pads[3]]
        if kind == "identity":
            if stride != 1:
                continue
            bn, bn_inits = bn_node("x", out, C, rng, name=f"id{index}")
            nodes.append(bn)
            inits += bn_inits
        elif kind == "pool":
            nodes.append(helper.make_node(
                "AveragePool", ["x"], [out], name=f"pool{index}", kernel_shape=[big, big],
                pads=[(big - 1) // 2] * 4, strides=[stride, stride], count_include_pad=1))
        else:
            more, more_inits = conv_bn("x", out, rng, kernel, name=f"b{index}", stride=stride,
                                       group=group, pads=pads)
            nodes += more
            inits += more_inits
        terms.append(out)
    if len(terms) < 2:
        return
    nodes.append(helper.make_node("Sum", terms, ["y"], name="sum"))
    try:
        proto = block_model(nodes, inits, size=7)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return  # a shifted window that changes the output size: not a valid model
    _, record = fold(proto, tol=1e-5)
    merged = sum(len(site["branches"]) for site in record["sites"])
    refused = len(record["refused"])
    if not shifted or extra[0] in ("identity", "pool"):
        assert merged == len(terms) and refused == 0
    else:  # the shifted branch is refused; the reference merges with whatever else fits
        assert refused >= 1
        assert merged + refused == len(terms) if merged else refused == len(terms) - 1


# --- the math on its own -----------------------------------------------------------------


def test_identity_and_pool_kernels_with_groups_in_torch() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    for group in (1, 2, 3, 6):
        kernel = torch.from_numpy(bm.identity_kernel(6, group, 2))
        assert torch.equal(torch.nn.functional.conv2d(x, kernel, groups=group), x)
        pool = torch.from_numpy(bm.average_pool_kernel(6, group, (3, 3)))
        expected = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
        torch.testing.assert_close(torch.nn.functional.conv2d(x, pool, padding=1, groups=group),
                                   expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", [1, 2])
def test_compose_pointwise_matches_two_convs(group: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(group)
    first, first_bias = rng.normal(size=(6, 4 // group, 1, 1)), rng.normal(size=6)
    second, second_bias = rng.normal(size=(8, 6 // group, 3, 3)), rng.normal(size=8)
    kernel, bias = bm.compose_pointwise(first, first_bias, second, second_bias, group)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    F = torch.nn.functional
    expected = F.conv2d(F.conv2d(x, torch.from_numpy(first), torch.from_numpy(first_bias),
                                 groups=group),
                        torch.from_numpy(second), torch.from_numpy(second_bias), groups=group)
    actual = F.conv2d(x, torch.from_numpy(kernel), torch.from_numpy(bias), groups=group)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_sub_kernel_offsets_reasons() -> None:
    assert bm.sub_kernel_offsets((1, 3), (0, 1, 0, 1), (1, 1), (3, 3), (1, 1, 1, 1), (1, 1)) == (1, 0)
    with pytest.raises(Refusal, match="border would change"):
        bm.sub_kernel_offsets((1, 1), (1, 0, 0, 1), (1, 1), (3, 3), (1, 1, 1, 1), (1, 1))
    with pytest.raises(Refusal, match="cannot be centred"):
        bm.sub_kernel_offsets((2, 2), (0, 0, 1, 1), (1, 1), (3, 3), (1, 1, 1, 1), (1, 1))
    with pytest.raises(Refusal, match="dilation"):
        bm.sub_kernel_offsets((3, 3), (2, 2, 2, 2), (2, 2), (5, 5), (2, 2, 2, 2), (1, 1))


# --- the zoo: every re-parameterizable block becomes one Conv -----------------------------

REPARAM_BLOCKS = {"repvgg": "RepVggBlock", "mobileone": "MobileOneBlock"}


def _variants() -> list:
    try:
        from normfold.models.export import DEFAULT_VARIANT, KNOWN_FAILURES, VARIANTS
    except ImportError:
        return []
    return [
        pytest.param(name, variant, id=f"{name}-{variant}",
                     marks=[] if variant == DEFAULT_VARIANT else [pytest.mark.slow])
        for name in REPARAM_BLOCKS
        for variant in VARIANTS
        if (name, variant) not in KNOWN_FAILURES
    ]


@pytest.mark.parametrize(("name", "variant"), _variants())
def test_zoo_blocks_become_one_conv_each(name: str, variant: str) -> None:
    """The default passes leave one Conv per block and no BN; outputs match in onnxruntime
    (float16 exports judged against the float32 export's run, and against the unfolded fp16)."""
    pytest.importorskip("torch")
    from normfold.models import build
    from normfold.models.export import VARIANTS, cached_export

    zoo = build(name)
    blocks = sum(type(m).__name__ == REPARAM_BLOCKS[name] for m in zoo.module.modules())
    path = cached_export(name, variant)
    half = VARIANTS[variant].half
    feeds = (zoo.half() if half else zoo).feeds()
    model = io.load(path)
    # Weights that are graph inputs (ts13-inputs) fold only when the user freezes them.
    passes = create_passes(None, PassOptions(freeze_initializer_inputs=variant == "ts13-inputs"))
    for each in passes:
        each(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ops = op_types(model)
    assert ops.count("BatchNormalization") == 0 and ops.count("Add") == 0
    assert ops.count("Conv") == blocks
    branches = next(p for p in passes if p.name == "fold-branches").record.to_dict()
    assert branches["applied"] == blocks and branches["refused"] == []
    if not half:
        assert rel_error(runtime.run(model, feeds), runtime.run(path, feeds)) <= 1e-5
        return
    reference = runtime.run(cached_export(name, "ts17"), zoo.feeds())
    unfolded = rel_error(runtime.run(path, feeds), reference)
    merged = rel_error(runtime.run(model, feeds), reference)
    assert merged <= max(2 * unfolded, 2e-3), (merged, unfolded)


