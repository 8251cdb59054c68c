"""Whether a fold is safe in the model's precision: the rule every fold rule applies, in float64.

A fold is exact in real arithmetic, but its new weights are cast once to the model's dtype.
In float16/bfloat16 that cast can do what the unfolded graph never did:

1. **overflow**: a folded value beyond the dtype's range becomes ±inf (a BN with a tiny variance
   scales a weight past float16's 65504);
2. **underflow**: a folded value that is not zero rounds to 0 (all of its information gone);
3. **precision**: the folded site computes something farther from the unfolded site than
   rounding allows. The classic case is cancellation: with ``b ≈ μ`` and a large
   BN scale ``s``, the unfolded graph computes ``s·(y − μ)`` from a ``y`` already rounded
   (onnxruntime runs float16 Conv+BN in float32), so its output moves in steps of
   ``s·ulp(y)``, while the folded Conv computes the smooth exact value: 2–20% apart on outputs
   where float32 and float16 runs of the unfolded graph agree to 3e-4.

:func:`cast_problem` checks 1 and 2. :func:`precision_problem` checks 3 on probe data: the
*reference* is the unfolded site computed in float64 from float32-rounded intermediates (what
onnxruntime computes: it runs float16 ops in float32 and keeps float32 between them, so the
unfolded graph rounds only its output; float64 models keep float64), and the folded site
(dtype-rounded weights, float64 arithmetic) may err by at most::

    max|folded − reference| ≤ FLOOR · max|reference|

with, for float16/bfloat16, ``FLOOR = 2u`` (``u`` the dtype's unit roundoff: 9.8e-4 for
float16, 7.8e-3 for bfloat16), half the floor of the rule verification applies to whole models
(``normfold.low_precision``: a candidate may err by 4x the reference's own error plus 4u of
the largest output), so that a fold that passes here passes there although the probes only
estimate the inputs. float32 and float64 folds get a tenth of
verification's ``rtol`` (1e-5, 1e-10): they round far below it, except where the unfolded
site cancels (a BN scale of 1e6 on ``y − μ`` computed in float32) and the fold does not. :func:`site_outputs` builds the probe outputs for a linear op
whose output channel ``o`` is ``rows[o]·u + bias[o]``, with a per-channel affine map before it
(consumer folds) or after it (producer folds, fold-affine); :func:`output_rows` and
:func:`input_rows` lay a Conv/ConvTranspose/Gemm/MatMul weight out as those rows.

Pure numpy: no graph, no torch; the ONNX passes and the torch side share it.
"""

from __future__ import annotations

__all__ = [
    "Affine",
    "cast_problem",
    "channel_vector",
    "input_rows",
    "lowered_outputs",
    "is_low_precision",
    "output_rows",
    "precision_problem",
    "site_outputs",
]

import dataclasses
import functools
from typing import Any

import ml_dtypes
import numpy as np

from normfold.low_precision import floor, is_low_precision, rounded

Array = np.ndarray

_PROBES = 8
_SEED = 0


def _dtype(dtype: object) -> np.dtype:
    return np.dtype(dtype)


def cast_problem(folded: Array, dtype: object, what: str) -> str | None:
    """Why casting the float64 ``folded`` values to ``dtype`` loses them, or None.

    Overflow: a finite value becomes ±inf. Underflow: a nonzero value becomes 0.
    """
    folded = np.asarray(folded, np.float64)
    if _dtype(dtype) in _NATIVE_FLOATS and _casts_cleanly(folded, _dtype(dtype)):
        return None
    cast = rounded(folded, dtype)
    name = _dtype(dtype).name
    overflow = np.isfinite(folded) & ~np.isfinite(cast)
    if overflow.any():
        worst = float(np.abs(folded[overflow]).max())
        return (
            f"the folded {what} reaches {worst:.3g}, beyond {name}'s largest value "
            f"{float(ml_dtypes.finfo(_dtype(dtype)).max):.5g}: it would become inf"
        )
    underflow = (folded != 0) & (cast == 0)
    if underflow.any():
        tiniest = float(np.abs(folded[underflow]).min())
        return (
            f"{int(underflow.sum())} value(s) of the folded {what} (down to {tiniest:.3g}) "
            f"round to 0 in {name}"
        )
    return None


# numpy's own float dtypes (the 8-bit floats of ml_dtypes take the elementwise path).
_NATIVE_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _casts_cleanly(folded: Array, dtype: np.dtype) -> bool:
    """Whether ``folded`` casts to ``dtype`` all finite and with no nonzero turned 0: then
    :func:`cast_problem` has nothing to report. One cast and two boolean reductions (nonzeros
    are counted only when the cast holds a zero), against a float64 round trip and six masks
    for the path that finds the values (a ResNet-34's folds check 21 M weights)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cast = folded.astype(dtype)
    if not np.isfinite(cast).all():
        return False
    # A zero stays zero: with as many nonzeros after the cast, none was flushed.
    return not (cast == 0).any() or np.count_nonzero(cast) == np.count_nonzero(folded)


def output_rows(kind: str, weight: Array, *, group: int = 1, trans_b: bool = False) -> Array:
    """``(C_out, fan_in)``: row ``o`` holds the weights output channel ``o`` sums (bias aside).

    ``kind`` is Conv ``(C_out, C_in/g, k…)``, ConvTranspose ``(C_in, C_out/g, k…)`` (output
    channel ``j·C_out/g + m`` reads group ``j``'s input rows at column ``m``), Gemm (``B`` is
    ``(N, K)`` when ``trans_b``) or MatMul ``(K, N)``. Used for the producer's weight and for
    the folded weight alike.
    """
    weight = np.asarray(weight, np.float64)
    if kind == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if kind == "ConvTranspose":
        c_in, per_group = weight.shape[:2]
        grouped = weight.reshape((group, c_in // group, per_group, -1))
        return np.moveaxis(grouped, 2, 1).reshape(group * per_group, -1)
    if kind == "Gemm":
        return weight if trans_b else weight.T
    return weight.T  # MatMul


def input_rows(kind: str, weight: Array, *, trans_b: bool = False) -> tuple[Array, int]:
    """``(rows, per_channel)`` of a consumer: ``rows`` as :func:`output_rows`; column ``k`` of
    a row reads input channel ``k // per_channel`` of its group (Conv: the kernel size)."""
    weight = np.asarray(weight, np.float64)
    if kind == "Conv":
        return weight.reshape(weight.shape[0], -1), int(np.prod(weight.shape[2:], dtype=np.int64))
    return output_rows(kind, weight, trans_b=trans_b), 1


def channel_vector(bias: Array, channels: int) -> Array:
    """A bias that broadcasts over a linear op's output as one value per output channel; a
    Gemm ``C`` of shape ``(M, N)`` is probed at its first row."""
    bias = np.asarray(bias, np.float64)
    last = bias.shape[-1] if bias.ndim else 1
    return np.broadcast_to(bias.reshape(-1, last)[0], (channels,))


@dataclasses.dataclass(frozen=True)
class Affine:
    """A per-channel ``s·v + t``: ``(C_out,)`` arrays after a linear op; before one, ``(groups,
    fan_in)`` arrays giving the scale/shift each weight column of a group's rows sees."""

    scale: Array
    shift: Array


def site_outputs(
    rows: Array,
    bias: Array | None,
    folded_rows: Array,
    folded_bias: Array,
    dtype: object,
    *,
    before: Affine | None = None,
    after: Affine | None = None,
    probe: Affine | None = None,
    statistics: Affine | None = None,
) -> tuple[Array, Array]:
    """``(reference, folded)`` outputs of a fold site on random probes, ``(probes, C_out)``.

    The site computes output channel ``o`` as ``after(rows[o]·before(x) + bias[o])``; ``rows``
    is ``(C_out, fan_in)`` with groups as consecutive blocks of rows. The probes ``x`` are
    standard normal, or ``probe.shift + probe.scale·N(0, 1)`` per column (same layout as
    ``before``: a consumer fold probes with the BN's own statistics, the inputs it was fitted
    to). ``statistics`` (producer folds of a BN: its input's standard deviation and mean per
    channel) move and shrink the probes until the linear op's output has that mean and, in its
    widest channel, that spread: the inputs the BN was fitted to, where ``s·(y − μ)`` may cancel.
    The reference rounds each intermediate to float32 (the verification reference's precision);
    the folded site uses ``folded_rows``/``folded_bias`` rounded to ``dtype``. Both run in
    float64.
    """
    rows = np.asarray(rows, np.float64)
    normal = np.random.default_rng(_SEED).standard_normal((_PROBES, rows.shape[1]))
    if statistics is not None and before is None:
        spread = np.std(_probe_product(normal, rows), axis=0)
        ratios = np.divide(statistics.scale, spread, out=np.zeros_like(spread), where=spread > 0)
        target = statistics.shift - (0.0 if bias is None else np.asarray(bias, np.float64))
        offset = np.linalg.lstsq(rows, target, rcond=None)[0]
        normal = float(ratios.max(initial=0.0)) * normal + offset
    folded_rows = rounded(folded_rows, dtype)
    if before is not None:
        groups = before.scale.shape[0]
        per_group = rows.shape[0] // groups
        linear_blocks, folded_blocks = [], []
        for j in range(groups):
            x = normal if probe is None else probe.shift[j] + probe.scale[j] * normal
            block = slice(j * per_group, (j + 1) * per_group)
            inner = _intermediate(before.scale[j] * x + before.shift[j], dtype)
            linear_blocks.append(_probe_product(inner, rows[block]))
            folded_blocks.append(_probe_product(x, folded_rows[block]))
        linear, folded = np.concatenate(linear_blocks, axis=1), np.concatenate(folded_blocks, axis=1)
    else:
        linear, folded = _probe_product(normal, rows), _probe_product(normal, folded_rows)
    if bias is not None:
        linear = linear + np.asarray(bias, np.float64)
    reference = _intermediate(linear, dtype)
    if after is not None:
        reference = after.scale * reference + after.shift
    return reference, folded + rounded(folded_bias, dtype)


def lowered_outputs(
    scale: Array, shift: Array, mean: Array, std: Array, dtype: object
) -> tuple[Array, Array]:
    """``(reference, lowered)`` probe outputs of a BatchNormalization lowered to ``Mul`` + ``Add``.

    The probes follow the BN's own statistics, ``y = μ + σ·N(0, 1)`` per channel, rounded to
    ``dtype``. The BN computes ``s·(y − μ) + β`` (its kernels subtract the mean first); the
    lowered form ``y·s + t`` rounds the product and the sum to ``dtype``, so where ``|μ·s|`` dwarfs
    the output it cancels.
    """
    rng = np.random.default_rng(_SEED)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    y = rounded(mean + std * rng.standard_normal((_PROBES, mean.size)), dtype)
    reference = scale * y + shift
    lowered = rounded(rounded(y * rounded(scale, dtype), dtype) + rounded(shift, dtype), dtype)
    return reference, lowered


def _probe_product(x: Array, rows: Array) -> Array:
    """``x @ rows.T``, through BLAS on one thread when the product is large, einsum's own loop
    otherwise. The probes are few (8 rows), and OpenBLAS's threads spin for them: on a loaded
    2-core machine one 8x4608 by 4608x512 product took 330 ms through multithreaded BLAS and
    22 ms through einsum (a ResNet-34's fold-bn: 8.8 s against 0.5 s); single-threaded BLAS
    takes a quarter of einsum's time (1.4 ms against 5.8 ms on an idle machine). Small products
    skip BLAS: limiting its threads costs about 50 µs a call."""
    if x.shape[0] * rows.size < _BLAS_MIN_PRODUCT:
        return np.einsum("pk,ok->po", x, rows)
    with _blas_controller().limit(limits=1, user_api="blas"):
        return x @ rows.T


# Multiply-adds from which a probe product goes through single-threaded BLAS.
_BLAS_MIN_PRODUCT = 1 << 20


@functools.cache
def _blas_controller() -> Any:
    # Imported and created on first use (about 10 ms): models with small layers never need it.
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def _intermediate(array: Array, dtype: object) -> Array:
    """An intermediate of the unfolded site as the reference holds it: float32 (float64 models:
    float64)."""
    if _dtype(dtype) == np.float64:
        return array
    with np.errstate(over="ignore"):
        return array.astype(np.float32).astype(np.float64)


# A tenth of verification's float32/float64 rtol.
_WIDE_FLOORS = {"float32": 1e-5, "float64": 1e-10}


def _floor(dtype: object) -> float:
    # Half the verification floor: the probes estimate what verification measures on real inputs.
    return floor(dtype) / 2 if is_low_precision(dtype) else _WIDE_FLOORS.get(_dtype(dtype).name, 1e-5)


def precision_problem(reference: Array, folded: Array, dtype: object) -> str | None:
    """Why the folded site is farther from the reference than ``FLOOR · max|reference|``, or None.

    ``FLOOR`` is half the verification rule's floor for float16/bfloat16 (``low_precision.floor``),
    a tenth of verification's ``rtol`` for float32 and float64 (1e-5, 1e-10).
    """
    reference, folded = np.asarray(reference, np.float64), np.asarray(folded, np.float64)
    scale = float(np.abs(reference).max(initial=0.0))
    error = float(np.abs(folded - reference).max(initial=0.0))
    if error <= _floor(dtype) * scale:
        return None
    return (
        f"in {_dtype(dtype).name} the folded weights compute {error / max(scale, 1e-300):.2g} of "
        f"the output's scale away from the unfolded site (computed in float32, rounded once), "
        f"more than {_floor(dtype):.2g}"
    )
