"""The float64 folding arithmetic (normfold/math/batchnorm.py) against torch and numpy in float64.

Each fold is compared with the unfolded computation done by torch's own convolutions and batch
norm (or numpy for Gemm/MatMul), over random shapes, groups, strides, pads, dilations and BN
statistics, including running_var 0 and 1e-10 with various eps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.errors import Refusal
from normfold.math import batchnorm as fm

torch = pytest.importorskip("torch")
F = torch.nn.functional

SETTINGS = settings(max_examples=40, deadline=None)
EPS = [1e-5, 1e-3, 1e-12, 0.1]


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-11) -> None:
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _stats(rng: np.random.Generator, channels: int, var_kind: str) -> tuple[np.ndarray, ...]:
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.normal(size=channels)
    mean = rng.normal(size=channels)
    var = {
        "random": rng.uniform(0.1, 3.0, channels),
        "zero": np.zeros(channels),
        "tiny": np.full(channels, 1e-10),
    }[var_kind]
    return gamma, beta, mean, var


def _bn_torch(y: torch.Tensor, stats: tuple[np.ndarray, ...], eps: float) -> torch.Tensor:
    gamma, beta, mean, var = (torch.from_numpy(a) for a in stats)
    return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=eps)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    dims = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    return {
        "dims": dims,
        "group": group,
        "in_per_group": draw(st.integers(1, 3)),
        "out_per_group": draw(st.integers(1, 3)),
        "kernel": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "pad": draw(st.integers(0, 2)),
        "bias": draw(st.booleans()),
        "var": draw(st.sampled_from(["random", "zero", "tiny"])),
        "eps": draw(st.sampled_from(EPS)),
        "seed": draw(st.integers(0, 2**16)),
    }


def test_bn_scale_shift_is_batch_norm() -> None:
    rng = np.random.default_rng(0)
    for var_kind in ("random", "zero", "tiny"):
        for eps in EPS:
            stats = _stats(rng, 5, var_kind)
            y = rng.normal(size=(2, 5, 3))
            scale, shift = fm.bn_scale_shift(*stats, eps)
            expected = _bn_torch(torch.from_numpy(y), stats, eps).numpy()
            _close(y * scale[:, None] + shift[:, None], expected)


def test_bn_scale_shift_of_affine_false_is_pure_normalization() -> None:
    mean, var = np.array([0.5, -1.0]), np.array([4.0, 0.25])
    scale, shift = fm.bn_scale_shift(np.ones(2), np.zeros(2), mean, var, 0.0)
    np.testing.assert_array_equal(scale, [0.5, 2.0])
    np.testing.assert_array_equal(shift, [-0.25, 2.0])


@SETTINGS
@given(conv_cases())
def test_fold_after_conv(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    g, dims = case["group"], case["dims"]
    c_in, c_out = g * case["in_per_group"], g * case["out_per_group"]
    weight = rng.normal(size=(c_out, case["in_per_group"]) + (case["kernel"],) * dims)
    bias = rng.normal(size=c_out) if case["bias"] else None
    x = torch.from_numpy(rng.normal(size=(2, c_in) + (6,) * dims))
    stats = _stats(rng, c_out, case["var"])
    conv = dict(stride=case["stride"], padding=case["pad"], dilation=case["dilation"], groups=g)
    y = _CONV[dims](
        x, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias), **conv
    )
    expected = _bn_torch(y, stats, case["eps"]).numpy()
    new_w, new_b = fm.fold_after_conv(weight, bias, *fm.bn_scale_shift(*stats, case["eps"]))
    _close(
        _CONV[dims](x, torch.from_numpy(new_w), torch.from_numpy(new_b), **conv).numpy(), expected
    )


@SETTINGS
@given(conv_cases(), st.integers(0, 1))
def test_fold_after_conv_transpose(case: dict, output_padding: int) -> None:
    rng = np.random.default_rng(case["seed"])
    g, dims = case["group"], case["dims"]
    c_in, c_out = g * case["in_per_group"], g * case["out_per_group"]
    weight = rng.normal(size=(c_in, case["out_per_group"]) + (case["kernel"],) * dims)
    bias = rng.normal(size=c_out) if case["bias"] else None
    x = torch.from_numpy(rng.normal(size=(2, c_in) + (4,) * dims))
    stats = _stats(rng, c_out, case["var"])
    # output_padding must be smaller than the stride or the dilation.
    extra = min(output_padding, max(case["stride"], case["dilation"]) - 1)
    conv = dict(
        stride=case["stride"], padding=0, output_padding=extra, dilation=case["dilation"], groups=g
    )
    y = _CONV_T[dims](
        x, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias), **conv
    )
    expected = _bn_torch(y, stats, case["eps"]).numpy()
    new_w, new_b = fm.fold_after_conv_transpose(
        weight, bias, *fm.bn_scale_shift(*stats, case["eps"]), g
    )
    _close(
        _CONV_T[dims](x, torch.from_numpy(new_w), torch.from_numpy(new_b), **conv).numpy(), expected
    )


def _gemm(a, b, c, *, trans_a, trans_b, alpha, beta):
    product = alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    return product if c is None else product + beta * c


_C_SHAPES = [None, (), (1,), ("N",), (1, "N"), ("M", "N"), ("M", 1)]


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 5),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1.0, 0.5, -2.0]),
    st.sampled_from([1.0, 0.0, 3.0]),
    st.sampled_from(_C_SHAPES),
    st.sampled_from(["random", "zero", "tiny"]),
    st.integers(0, 2**16),
)
def test_fold_after_gemm(m, k, n, trans_a, trans_b, alpha, beta, c_shape, var, seed) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, m) if trans_a else (m, k))
    b = rng.normal(size=(n, k) if trans_b else (k, n))
    c = (
        None
        if c_shape is None
        else rng.normal(size=tuple({"M": m, "N": n}.get(d, d) for d in c_shape))
    )
    stats = _stats(rng, n, var)
    y = _gemm(a, b, c, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    expected = _bn_torch(torch.from_numpy(y), stats, 1e-5).numpy()
    new_b, new_c = fm.fold_after_gemm(
        b, c, *fm.bn_scale_shift(*stats, 1e-5), trans_b=trans_b, beta=beta
    )
    _close(
        _gemm(a, new_b, new_c, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=1.0), expected
    )


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 5),
    st.sampled_from([None, (), ("N",), ("M", "N")]),
    st.integers(0, 2**16),
)
def test_fold_after_matmul(m, k, n, bias_shape, seed) -> None:
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    bias = (
        None
        if bias_shape is None
        else rng.normal(size=tuple({"M": m, "N": n}[d] for d in bias_shape))
    )
    stats = _stats(rng, n, "random")
    y = x @ w + (0 if bias is None else bias)
    expected = _bn_torch(torch.from_numpy(y), stats, 1e-5).numpy()
    new_w, new_b = fm.fold_after_matmul(w, bias, *fm.bn_scale_shift(*stats, 1e-5))
    _close(x @ new_w + new_b, expected)


@SETTINGS
@given(conv_cases(), st.booleans())
def test_fold_before_conv(case: dict, zero_shift: bool) -> None:
    """Unpadded: exact for any shift; padded: exact when the shift is zero."""
    rng = np.random.default_rng(case["seed"])
    g, dims = case["group"], case["dims"]
    c_in, c_out = g * case["in_per_group"], g * case["out_per_group"]
    weight = rng.normal(size=(c_out, case["in_per_group"]) + (case["kernel"],) * dims)
    bias = rng.normal(size=c_out) if case["bias"] else None
    x = rng.normal(size=(2, c_in) + (6,) * dims)
    scale, shift = fm.bn_scale_shift(*_stats(rng, c_in, case["var"]), case["eps"])
    if zero_shift:
        shift = np.zeros_like(shift)
    pad = case["pad"] if zero_shift else 0
    conv = dict(stride=case["stride"], padding=pad, dilation=case["dilation"], groups=g)
    normalized = x * scale.reshape((-1,) + (1,) * dims) + shift.reshape((-1,) + (1,) * dims)
    t = torch.from_numpy
    expected = _CONV[dims](
        t(normalized), t(weight), None if bias is None else t(bias), **conv
    ).numpy()
    new_w, new_b = fm.fold_before_conv(weight, bias, scale, shift, g)
    _close(_CONV[dims](t(x), t(new_w), t(new_b), **conv).numpy(), expected, rtol=1e-10)


def test_fold_before_padded_conv_with_a_shift_is_not_exact() -> None:
    """Why the consumer rule refuses a padded Conv: the border sees 0 instead of the shift."""
    rng = np.random.default_rng(1)
    weight, x = rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(1, 2, 5, 5))
    scale, shift = np.ones(2), np.array([1.0, -2.0])
    t = torch.from_numpy
    expected = F.conv2d(t(x + shift.reshape(-1, 1, 1)), t(weight), padding=1).numpy()
    new_w, new_b = fm.fold_before_conv(weight, None, scale, shift, 1)
    folded = F.conv2d(t(x), t(new_w), t(new_b), padding=1).numpy()
    assert np.abs(folded - expected)[..., 1:-1, 1:-1].max() < 1e-12
    assert np.abs(folded - expected).max() > 0.1


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 5),
    st.booleans(),
    st.sampled_from([1.0, -0.5]),
    st.sampled_from([1.0, 2.0]),
    st.sampled_from([None, ("N",), ("M", "N")]),
    st.integers(0, 2**16),
)
def test_fold_before_gemm(m, k, n, trans_b, alpha, beta, c_shape, seed) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(m, k)), rng.normal(size=(n, k) if trans_b else (k, n))
    c = None if c_shape is None else rng.normal(size=tuple({"M": m, "N": n}[d] for d in c_shape))
    scale, shift = fm.bn_scale_shift(*_stats(rng, k, "random"), 1e-5)
    expected = _gemm(
        a * scale + shift, b, c, trans_a=False, trans_b=trans_b, alpha=alpha, beta=beta
    )
    new_b, new_c = fm.fold_before_gemm(b, c, scale, shift, trans_b=trans_b, alpha=alpha, beta=beta)
    _close(_gemm(a, new_b, new_c, trans_a=False, trans_b=trans_b, alpha=alpha, beta=1.0), expected)


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_fold_before_matmul_through_flatten(n, c, out, side, seed) -> None:
    """BN on (N, C, H, W) then Flatten then MatMul: each channel is a block of H·W features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, side, side + 1))
    block = side * (side + 1)
    w = rng.normal(size=(c * block, out))
    scale, shift = fm.bn_scale_shift(*_stats(rng, c, "random"), 1e-5)
    expected = (x * scale[:, None, None] + shift[:, None, None]).reshape(n, -1) @ w
    new_w, new_b = fm.fold_before_matmul(
        w, fm.repeat_channels(scale, block), fm.repeat_channels(shift, block)
    )
    _close(x.reshape(n, -1) @ new_w + new_b, expected)


def test_per_channel_accepts_channel_shaped_constants() -> None:
    c = np.arange(1.0, 5.0)
    for shape in [(4, 1, 1), (1, 4, 1, 1)]:
        np.testing.assert_array_equal(fm.per_channel(c.reshape(shape), 4, 1, 4), c)
    np.testing.assert_array_equal(fm.per_channel(np.float64(3.0), 4, 1, 4), [3.0] * 4)
    np.testing.assert_array_equal(fm.per_channel(np.ones((1, 1, 1)), 4, 1, 4), [1.0] * 4)
    np.testing.assert_array_equal(fm.per_channel(c, 2, 1, 4), c)
    np.testing.assert_array_equal(fm.per_channel(c.reshape(1, 4), 2, 1, 4), c)


@pytest.mark.parametrize(
    ("shape", "rank", "message"),
    [
        ((4,), 4, "varies along axis 3"),  # the trap: [C] on the last spatial axis, W == C
        ((4, 1), 4, "varies along axis 2"),
        ((1, 1, 4, 4), 4, "varies along axis 2"),
        ((1, 4, 1, 1, 1), 4, "more axes"),
        ((4, 1), 2, "varies along axis 0"),
        ((2, 1, 1), 4, "2 values along the channel axis"),
    ],
)
def test_per_channel_refuses_other_broadcasts(shape, rank, message) -> None:
    with pytest.raises(Refusal, match=message):
        fm.per_channel(np.ones(shape), rank, 1, 4)


@pytest.mark.parametrize("op_type", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("constant_first", [False, True])
def test_affine_of_binary(op_type: str, constant_first: bool) -> None:
    rng = np.random.default_rng(2)
    y, c = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    if op_type == "Div" and constant_first:
        with pytest.raises(Refusal, match="not an affine map"):
            fm.affine_of_binary(op_type, c, constant_first)
        return
    operation = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op_type]
    expected = operation(c, y) if constant_first else operation(y, c)
    scale, shift = fm.affine_of_binary(op_type, c, constant_first)
    np.testing.assert_allclose(scale * y + shift, expected, rtol=1e-14)


def test_affine_of_binary_refuses_division_by_zero() -> None:
    with pytest.raises(Refusal, match="non-finite"):
        fm.affine_of_binary("Div", np.array([1.0, 0.0]), False)
