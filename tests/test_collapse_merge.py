"""Each exact merge rule of normfold.math.conv_merge against the unmerged layers, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.errors import Refusal
from normfold.math import conv_merge as merge

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _random_conv(rng, rank, c_in, c_out, groups, kernel, stride, padding, dilation) -> merge.Conv:
    return merge.Conv(
        weight=rng.normal(size=(c_out, c_in // groups, *kernel)),
        bias=rng.normal(size=c_out),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


def _apply(conv: merge.Conv, x: torch.Tensor, *, padding: tuple[int, ...] | None = None) -> torch.Tensor:
    rank = conv.weight.ndim - 2
    return _CONV[rank](
        x,
        torch.from_numpy(conv.weight),
        torch.from_numpy(conv.bias),
        stride=conv.stride,
        padding=conv.padding if padding is None else padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )


@st.composite
def conv_pairs(draw):
    rank = draw(st.integers(1, 2))
    g1, g2 = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
    c_in = g1 * draw(st.integers(1, 2))
    c_mid = math.lcm(g1, g2) * draw(st.integers(1, 2))
    c_out = g2 * draw(st.integers(1, 2))

    def geometry():
        return (
            tuple(draw(st.integers(1, 3)) for _ in range(rank)),
            tuple(draw(st.integers(1, 2)) for _ in range(rank)),
            tuple(draw(st.integers(0, 2)) for _ in range(rank)),
            tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        )

    first, second = geometry(), geometry()
    seed = draw(st.integers(0, 2**16))
    return rank, (c_in, c_mid, c_out), (g1, g2), first, second, seed


@settings(max_examples=25, deadline=None)
@given(conv_pairs())
def test_compose_conv_matches_the_two_convs(case):
    rank, (c_in, c_mid, c_out), (g1, g2), first_geo, second_geo, seed = case
    rng = np.random.default_rng(seed)
    first = _random_conv(rng, rank, c_in, c_mid, g1, *first_geo)
    second = _random_conv(rng, rank, c_mid, c_out, g2, *second_geo)
    size = 12 + rng.integers(0, 4)
    x = torch.from_numpy(rng.normal(size=(2, c_in) + (size,) * rank))
    merged = merge.compose_conv(first, second)
    planned = merge.compose_conv(first, second, weights=False)  # the same conv without its arithmetic
    assert planned.weight.shape == merged.weight.shape and not planned.weight.any()
    assert (planned.stride, planned.padding, planned.dilation, planned.groups) == (
        merged.stride, merged.padding, merged.dilation, merged.groups)

    # pad-first model: the first conv takes the second's padding (times its stride).
    moved = tuple(p1 + s1 * p2 for p1, s1, p2 in zip(first.padding, first.stride, second.padding))
    hidden = _apply(first, x, padding=moved)
    if min(hidden.shape[2:]) < second.dilation[0] * (max(second.kernel) - 1) + 1:
        return  # the second conv has no output on this input
    expected = _apply(second, hidden, padding=(0,) * rank)
    got = _apply(merged, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert merged.groups == math.gcd(g1, g2)
    assert merge.compose_conv_shape(first, second) == merged.macs_per_output
    # With an unpadded second conv the merge is the plain composition.
    if all(p == 0 for p in second.padding):
        torch.testing.assert_close(got, _apply(second, _apply(first, x)), rtol=1e-10, atol=1e-10)


def test_compose_conv_keeps_a_common_dilation():
    rng = np.random.default_rng(0)
    first = _random_conv(rng, 2, 2, 2, 1, (3, 3), (1, 1), (0, 0), (2, 2))
    second = _random_conv(rng, 2, 2, 2, 1, (3, 3), (1, 1), (0, 0), (2, 2))
    merged = merge.compose_conv(first, second)
    assert merged.kernel == (5, 5) and merged.dilation == (2, 2)  # span 9, every other tap
    x = torch.from_numpy(rng.normal(size=(1, 2, 16, 16)))
    torch.testing.assert_close(_apply(merged, x), _apply(second, _apply(first, x)), rtol=1e-10, atol=1e-10)


def test_kernel_growth_costs_more_macs():
    rng = np.random.default_rng(1)
    first = _random_conv(rng, 2, 8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    second = _random_conv(rng, 2, 8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    unmerged, merged = merge.compose_macs(first, second)
    assert (unmerged, merged) == (2 * 9 * 64, 25 * 64)


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3, 5]),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_identity_shortcut_goes_to_the_centre_tap(groups, kernel, dilation, seed):
    rng = np.random.default_rng(seed)
    pad = dilation * (kernel - 1) // 2
    conv = _random_conv(rng, 2, 4, 4, groups, (kernel, kernel), (1, 1), (pad, pad), (dilation, dilation))
    x = torch.from_numpy(rng.normal(size=(2, 4, 9, 9)))
    torch.testing.assert_close(_apply(merge.add_identity(conv), x), _apply(conv, x) + x, rtol=1e-10, atol=1e-10)


def test_identity_shortcut_refuses_a_stride():
    rng = np.random.default_rng(0)
    conv = _random_conv(rng, 2, 4, 4, 1, (3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(Refusal, match="stride"):
        merge.add_identity(conv)


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    shortcut_groups=st.sampled_from([1, 2]),
    stride=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_projection_shortcut_folds_into_the_merged_kernel(groups, shortcut_groups, stride, seed):
    rng = np.random.default_rng(seed)
    first = _random_conv(rng, 2, 4, 6, groups, (3, 3), (stride, stride), (1, 1), (1, 1))
    second = _random_conv(rng, 2, 6, 8, 1, (3, 3), (1, 1), (0, 0), (1, 1))
    # The block's second conv is unpadded here: the first took its padding (pad-first: 1 + s·1).
    moved = (1 + stride, 1 + stride)
    first = merge.Conv(first.weight, first.bias, first.stride, moved, first.dilation, first.groups)
    shortcut = _random_conv(rng, 2, 4, 8, shortcut_groups, (1, 1), (stride, stride), (0, 0), (1, 1))
    x = torch.from_numpy(rng.normal(size=(2, 4, 10, 10)))
    block = _apply(second, _apply(first, x)) + _apply(shortcut, x)
    folded = merge.add_shortcut(merge.compose_conv(first, second), shortcut)
    torch.testing.assert_close(_apply(folded, x), block, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(sizes=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**16))
def test_compose_linear(sizes, seed):
    rng = np.random.default_rng(seed)
    a, b, c = sizes
    first = (rng.normal(size=(b, a)), rng.normal(size=b))
    second = (rng.normal(size=(c, b)), rng.normal(size=c))
    x = rng.normal(size=(5, a))
    w, bias = merge.compose_linear(first, second)
    np.testing.assert_allclose(x @ w.T + bias, (x @ first[0].T + first[1]) @ second[0].T + second[1], rtol=1e-10)


def test_linear_moves_before_a_global_average_pool():
    rng = np.random.default_rng(2)
    conv = _random_conv(rng, 2, 3, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    weight, bias = rng.normal(size=(5, 8)), rng.normal(size=5)
    x = torch.from_numpy(rng.normal(size=(2, 3, 6, 6)))
    reference = _apply(conv, x).mean(dim=(2, 3)) @ torch.from_numpy(weight).T + torch.from_numpy(bias)
    merged = merge.compose_conv(conv, merge.linear_as_conv(weight, bias, 2))
    torch.testing.assert_close(_apply(merged, x).mean(dim=(2, 3)), reference, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_affine_maps_fold_into_neighbouring_convs(groups, padded, seed):
    rng = np.random.default_rng(seed)
    pad = (1, 1) if padded else (0, 0)
    conv = _random_conv(rng, 2, 4, 8, groups, (3, 3), (1, 1), pad, (1, 1))
    scale_in, shift_in = rng.normal(size=4), rng.normal(size=4) * (0.0 if padded else 1.0)
    scale_out, shift_out = rng.normal(size=8), rng.normal(size=8)
    x = torch.from_numpy(rng.normal(size=(2, 4, 7, 7)))
    view = (1, -1, 1, 1)
    before = _apply(conv, x * torch.from_numpy(scale_in).view(view) + torch.from_numpy(shift_in).view(view))
    torch.testing.assert_close(_apply(merge.affine_before(conv, scale_in, shift_in), x), before, rtol=1e-10, atol=1e-10)
    after = _apply(conv, x) * torch.from_numpy(scale_out).view(view) + torch.from_numpy(shift_out).view(view)
    torch.testing.assert_close(_apply(merge.affine_after(conv, scale_out, shift_out), x), after, rtol=1e-10, atol=1e-10)


def test_regroup_to_dense_computes_the_same_conv():
    rng = np.random.default_rng(3)
    conv = _random_conv(rng, 2, 6, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1))
    dense = merge.Conv(merge.regroup(conv.weight, 3, 1), conv.bias, conv.stride, conv.padding, conv.dilation, 1)
    x = torch.from_numpy(rng.normal(size=(1, 6, 5, 5)))
    torch.testing.assert_close(_apply(dense, x), _apply(conv, x), rtol=1e-12, atol=1e-12)
