"""Per-channel TLC scores: how often an activation leaves the linear piece it is replaced by.

"Till the Layers Collapse" (Liao et al., AAAI 2025, arXiv 2412.15077) models the input ``y`` of
an activation, channel by channel, as a Gaussian ``N(m, s²)``:

- **BN mode**: the activation reads a BatchNorm ``y = γ·x̂ + β`` whose normalized input ``x̂`` is
  (by its running statistics) zero-mean and unit-variance, so ``m = β`` and ``s = |γ|``.
- **Empirical mode**: ``m`` and ``s`` are the mean and standard deviation of ``y`` measured over
  a calibration set (for an activation after a residual Add, in a GELU/SiLU MLP, or on request),
  and the mean of the activation's output is measured too.

Each channel is replaced by one affine map ``y ↦ a·y + c`` (:class:`ChannelPlan`):

1. ReLU, LeakyReLU and PReLU (negative slope ``u``, 0 for ReLU): ``m ≥ 0`` → *linearized*
   (``a = 1``); ``m < 0`` → *pruned* (``a = u``: a constant for ReLU, the negative piece for a
   leaky one). The score is the probability of the other piece scaled by how much the pieces
   differ: ``E = Φ(−|m|/s)·(1 − u)``.
2. ReLU6 (and any ``clip(y, 0, U)``): three pieces, off (``y < 0``), linear, saturated
   (``y > U``). Linearized when the linear piece is the likeliest, with
   ``E = P(y < 0) + P(y > U)`` (the upper tail is the extra term); otherwise a constant, with
   ``E = 1 − max(P(y < 0), P(y > U))``.
3. GELU and SiLU: as ReLU (``m ≥ 0`` linearized, else a constant), ``E = Φ(−|m|/s)``.
4. The offset ``c`` matches the mean: ``c = E[act(y)] − a·m``, so the replacement is unbiased
   under the model (for the pruned ReLU channel, ``c = E[relu(y)]``, not 0). The closed forms:
   ``E[relu(y − t)] = (m − t)·Φ((m − t)/s) + s·φ((m − t)/s)``; ``E[y·Φ(k·y)] = m·Φ(k·m/r)
   + k·s²/r·φ(k·m/r)`` with ``r = sqrt(1 + k²s²)`` (GELU: ``k = 1``; SiLU through the probit
   approximation ``sigmoid(y) ≈ Φ(y/1.702)``). In empirical mode the measured output mean
   replaces the closed form.

A layer's data-free score is the mean of its channels' ``E`` (:func:`layer_score`); lower means
closer to linear. Φ is computed with ``math.erf`` (no scipy). ``s = 0`` (a constant channel) is
treated as ``s = 1e-12``: the channel is always on one piece and ``E`` is 0.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS",
    "ChannelPlan",
    "channel_plan",
    "layer_score",
    "normal_cdf",
    "normal_pdf",
    "relu_mean",
]

import dataclasses
import math

import numpy as np

Array = np.ndarray

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "prelu", "gelu", "silu")

_TINY = 1e-12
_SILU_PROBIT = 1.0 / 1.702  # sigmoid(y) ≈ Φ(y/1.702), max error 0.01


def normal_cdf(x: Array | float) -> Array:
    """Φ(x), the standard normal CDF, elementwise in float64."""
    values = np.asarray(x, dtype=np.float64)
    erf = np.frompyfunc(math.erf, 1, 1)
    return (0.5 * (1.0 + erf(values / math.sqrt(2.0)))).astype(np.float64)


def normal_pdf(x: Array | float) -> Array:
    """φ(x), the standard normal density, elementwise in float64."""
    values = np.asarray(x, dtype=np.float64)
    return np.exp(-0.5 * values * values) / math.sqrt(2.0 * math.pi)


def relu_mean(mean: Array, std: Array, threshold: Array | float = 0.0) -> Array:
    """``E[max(y − t, 0)]`` for ``y ~ N(mean, std²)``."""
    shifted = np.asarray(mean, dtype=np.float64) - threshold
    std = np.maximum(np.asarray(std, dtype=np.float64), _TINY)
    return shifted * normal_cdf(shifted / std) + std * normal_pdf(shifted / std)


def _gated_mean(mean: Array, std: Array, k: float) -> Array:
    """``E[y·Φ(k·y)]`` for ``y ~ N(mean, std²)``."""
    root = np.sqrt(1.0 + (k * std) ** 2)
    z = k * mean / root
    return mean * normal_cdf(z) + k * std * std / root * normal_pdf(z)


@dataclasses.dataclass(frozen=True)
class ChannelPlan:
    """What each channel of one activation becomes: ``y ↦ slope·y + offset``, and its score."""

    slope: Array
    offset: Array
    error: Array
    linearized: Array  # bool per channel: kept on the identity piece (slope 1)

    @property
    def pruned(self) -> Array:
        return ~self.linearized

    def to_dict(self) -> dict[str, float | int]:
        return {
            "channels": int(self.error.size),
            "linearized": int(self.linearized.sum()),
            "pruned": int(self.pruned.sum()),
            "score": layer_score(self),
        }


def channel_plan(
    kind: str,
    mean: Array,
    std: Array,
    *,
    negative_slope: Array | float = 0.0,
    upper: float = 6.0,
    output_mean: Array | None = None,
) -> ChannelPlan:
    """The per-channel replacement of activation ``kind`` for inputs ``N(mean, std²)``.

    ``negative_slope`` is LeakyReLU's slope or PReLU's per-channel weights; ``upper`` is ReLU6's
    ceiling; ``output_mean`` (empirical mode) is the measured mean of the activation's output and
    replaces the Gaussian closed form in the offsets.
    """
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; known: {', '.join(ACTIVATIONS)}")
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    s = np.maximum(np.abs(np.asarray(std, dtype=np.float64).reshape(-1)), _TINY)
    if kind == "relu6":
        p_off, p_high = normal_cdf(-m / s), normal_cdf((m - upper) / s)
        linear = 1.0 - p_off - p_high
        linearized = linear >= np.maximum(p_off, p_high)
        error = np.where(linearized, p_off + p_high, 1.0 - np.maximum(p_off, p_high))
        slope = np.where(linearized, 1.0, 0.0)
        expected = relu_mean(m, s) - relu_mean(m, s, upper)
    else:
        u = np.zeros_like(m) if kind in ("relu", "gelu", "silu") else np.broadcast_to(
            np.asarray(negative_slope, dtype=np.float64).reshape(-1), m.shape
        ).astype(np.float64)
        linearized = m >= 0.0
        error = normal_cdf(-np.abs(m) / s) * np.abs(1.0 - u)
        slope = np.where(linearized, 1.0, u)
        if kind == "gelu":
            expected = _gated_mean(m, s, 1.0)
        elif kind == "silu":
            expected = _gated_mean(m, s, _SILU_PROBIT)
        else:
            expected = u * m + (1.0 - u) * relu_mean(m, s)
    if output_mean is not None:
        expected = np.asarray(output_mean, dtype=np.float64).reshape(-1)
    return ChannelPlan(
        slope=slope.astype(np.float64),
        offset=(expected - slope * m).astype(np.float64),
        error=error.astype(np.float64),
        linearized=np.asarray(linearized, dtype=bool),
    )


def layer_score(plan: ChannelPlan) -> float:
    """The data-free rank of a layer: the mean channel score (0: the activation is linear)."""
    return float(plan.error.mean()) if plan.error.size else 0.0
