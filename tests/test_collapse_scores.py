"""TLC channel scores against hand-computed values, and their offsets against sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normfold.math.collapse_scores import channel_plan, layer_score, normal_cdf

# Φ(−0.5) = 0.30853753872598688 and φ(0.5) = 0.35206532676429952 from a normal table; Φ(−1.5) =
# 0.066807201268858057; Φ(−1) = 0.15865525393145705, φ(1) = 0.24197072451914337; φ(0) = 1/√(2π).
PHI_M05, PDF_05, PHI_M15 = 0.30853753872598688, 0.35206532676429952, 0.066807201268858057
PHI_M1, PDF_1 = 0.15865525393145705, 0.24197072451914337


def test_normal_cdf_matches_the_table():
    np.testing.assert_allclose(normal_cdf([-0.5, -1.5, 0.0]), [PHI_M05, PHI_M15, 0.5], rtol=1e-15)


def test_relu_channel_from_bn_parameters():
    # BN γ = ±2, β = ±1: y ~ N(β, 4); E = Φ(−|β|/|γ|) = Φ(−0.5) either way.
    plan = channel_plan("relu", mean=[1.0, -1.0], std=[2.0, -2.0])
    np.testing.assert_allclose(plan.error, [PHI_M05, PHI_M05], rtol=1e-14)
    assert plan.linearized.tolist() == [True, False]
    np.testing.assert_array_equal(plan.slope, [1.0, 0.0])
    # E[relu(y)] = m·Φ(m/s) + s·φ(m/s): 1·(1 − Φ(−0.5)) + 2·φ(0.5) for m = 1, minus m for the offset.
    relu_mean_on = (1 - PHI_M05) + 2 * PDF_05
    relu_mean_off = -PHI_M05 + 2 * PDF_05
    np.testing.assert_allclose(plan.offset, [relu_mean_on - 1.0, relu_mean_off], rtol=1e-14)
    assert layer_score(plan) == pytest.approx(PHI_M05)


def test_relu6_adds_the_upper_tail():
    # m = 3, s = 2: P(y < 0) = P(y > 6) = Φ(−1.5); linear is the likeliest piece.
    plan = channel_plan("relu6", mean=[3.0], std=[2.0])
    assert plan.linearized.tolist() == [True]
    np.testing.assert_allclose(plan.error, [2 * PHI_M15], rtol=1e-14)
    # Far above the ceiling: a constant (6) channel.
    saturated = channel_plan("relu6", mean=[20.0], std=[1.0])
    assert saturated.linearized.tolist() == [False]
    np.testing.assert_allclose(saturated.offset, [6.0], atol=1e-9)


def test_leaky_relu_is_scaled_by_one_minus_slope():
    plan = channel_plan("leaky_relu", mean=[-1.0], std=[1.0], negative_slope=0.1)
    np.testing.assert_allclose(plan.error, [0.9 * PHI_M1], rtol=1e-14)
    np.testing.assert_allclose(plan.slope, [0.1])  # the negative piece, not zero
    # offset = E[act] − 0.1·m = 0.9·E[relu(y)] = 0.9·(−Φ(−1) + φ(1)).
    np.testing.assert_allclose(plan.offset, [0.9 * (-PHI_M1 + PDF_1)], rtol=1e-13)


def test_prelu_uses_each_channels_slope():
    plan = channel_plan("prelu", mean=[-1.0, -1.0], std=[1.0, 1.0], negative_slope=[0.0, 1.0])
    np.testing.assert_allclose(plan.error, [PHI_M1, 0.0], atol=1e-15)  # slope 1 is linear already


def test_gelu_offset_of_a_centred_channel():
    # E[y·Φ(y)] for y ~ N(0, 1) is 1/√2·φ(0) = 1/(2√π).
    plan = channel_plan("gelu", mean=[0.0], std=[1.0])
    np.testing.assert_allclose(plan.offset, [1 / (2 * math.sqrt(math.pi))], rtol=1e-14)
    np.testing.assert_allclose(plan.error, [0.5])


@pytest.mark.parametrize("kind", ["relu", "relu6", "leaky_relu", "gelu", "silu"])
def test_offsets_make_the_replacement_unbiased(kind):
    rng = np.random.default_rng(0)
    means, stds = np.array([-1.5, -0.2, 0.3, 2.0, 7.0]), np.array([1.0, 0.5, 2.0, 1.5, 0.7])
    y = rng.normal(means, stds, size=(400_000, 5))
    act = {
        "relu": lambda v: np.maximum(v, 0),
        "relu6": lambda v: np.clip(v, 0, 6),
        "leaky_relu": lambda v: np.where(v > 0, v, 0.2 * v),
        "gelu": lambda v: v * np.vectorize(lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2))))(v),
        "silu": lambda v: v / (1 + np.exp(-v)),
    }[kind]
    plan = channel_plan(kind, means, stds, negative_slope=0.2)
    replaced = y * plan.slope + plan.offset
    # SiLU's closed form goes through the probit approximation of the sigmoid.
    tolerance = 0.015 if kind == "silu" else 0.01
    np.testing.assert_allclose(replaced.mean(0), act(y).mean(0), atol=tolerance)


def test_empirical_output_mean_replaces_the_closed_form():
    plan = channel_plan("silu", mean=[1.0], std=[1.0], output_mean=[0.75])
    np.testing.assert_allclose(plan.offset, [0.75 - 1.0])


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation"):
        channel_plan("tanh", [0.0], [1.0])
