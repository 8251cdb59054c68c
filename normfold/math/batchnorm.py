"""Folding BatchNorm (or any per-channel affine map) into a linear op, in float64, no graph.

The one BatchNorm arithmetic of normfold: the ONNX passes (``fold-bn``, ``fold-affine``, the
collapse pass) and the torch side (:func:`normfold.torch.fold_batchnorm`, layer collapse) all
call these functions, on numpy float64 arrays.

A BatchNormalization in inference form is a per-channel affine map::

    BN(y)[c] = γ[c]·(y[c] − μ[c]) / sqrt(σ²[c] + ε) + β[c] = s[c]·y[c] + t[c]
    s = γ / sqrt(σ² + ε),   t = β − μ·s      (γ = 1, β = 0 for a BatchNorm without affine)

and so is a constant ``Mul``/``Add``/``Sub``/``Div`` that broadcasts per channel. An affine map
folds into the linear op on either side of it:

* **into the producer** ``y = L(x)`` with weight ``W`` and bias ``b``, scaling output channel ``c``:
  ``W'[c-th output slice] = W[c-th output slice]·s[c]``, ``b' = b·s + t``. Where the output
  channels sit in ``W`` depends on the op: axis 0 for Conv ``(C_out, C_in/g, k…)`` and torch's
  Linear ``(out, in)``; axis 1 within
  each group for ConvTranspose ``(C_in, C_out/g, k…)``; for Gemm the rows of ``B`` when
  ``transB`` else its columns (``C' = beta·C·s + t``, ``beta`` becomes 1, ``alpha`` stays); for
  MatMul the columns of the 2-D weight ``(K, N)``.
* **into the consumer** ``z = L(s·x + t)``, scaling input channel ``i``:
  ``W'[…, i, …] = W[…, i, …]·s[i]`` and ``b' = b + Σ_i,k W[…, i, k]·t[i]``. For a grouped Conv,
  output channel ``o`` reads input channels ``g(o)·C_in/g … (g(o)+1)·C_in/g − 1``. The bias
  formula assumes every output position sums the whole kernel window over real inputs, which
  holds for an unpadded Conv (or a zero shift ``t``), not for a zero-padded border.

Every function takes and returns float64 arrays; the caller casts once to the model's dtype.
The functions mirror ``torch.nn.utils.fusion``: weights in, weights out, testable without a graph.
"""

from __future__ import annotations

__all__ = [
    "affine_of_binary",
    "bn_scale_shift",
    "fold_after_conv",
    "fold_after_conv_transpose",
    "fold_after_gemm",
    "fold_after_matmul",
    "fold_before_conv",
    "fold_before_gemm",
    "fold_before_matmul",
    "per_channel",
    "repeat_channels",
]

import numpy as np

from normfold.errors import Refusal

Array = np.ndarray


def _f64(array: Array | float) -> Array:
    return np.asarray(array, dtype=np.float64)


def bn_scale_shift(
    gamma: Array | None, beta: Array | None, mean: Array, var: Array, eps: float
) -> tuple[Array, Array]:
    """The per-channel ``(s, t)`` of ``BN(y) = s·y + t``: ``s = γ/sqrt(σ²+ε)``, ``t = β − μ·s``.

    The arguments come in the order of BatchNormalization's inputs (scale, B, mean, var);
    ``gamma``/``beta`` None (a torch BatchNorm with ``affine=False``) mean 1 and 0.
    """
    scale = 1.0 / np.sqrt(_f64(var) + np.float64(eps))
    if gamma is not None:
        scale = _f64(gamma) * scale
    shift = -_f64(mean) * scale
    return scale, shift if beta is None else _f64(beta) + shift


def _bias_after(bias: Array | None, scale: Array, shift: Array) -> Array:
    return shift if bias is None else _f64(bias) * scale + shift


def fold_after_conv(
    weight: Array, bias: Array | None, scale: Array, shift: Array
) -> tuple[Array, Array]:
    """``s·Conv(x; W, b) + t`` as one Conv: weight ``(C_out, C_in/g, k…)`` scaled along axis 0.

    Also torch's ``Linear``, whose weight is ``(out, in)``: output channel ``c`` is row ``c``.
    """
    weight = _f64(weight)
    expand = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return weight * expand, _bias_after(bias, scale, shift)


def fold_after_conv_transpose(
    weight: Array, bias: Array | None, scale: Array, shift: Array, group: int
) -> tuple[Array, Array]:
    """``s·ConvTranspose(x; W, b) + t`` as one ConvTranspose.

    The weight is ``(C_in, C_out/g, k…)``; output channel ``o = j·C_out/g + m`` is column ``m`` of
    the input rows of group ``j``, so the scale is applied along axis 1 per group.
    """
    weight = _f64(weight)
    c_in, out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    grouped = weight.reshape((group, c_in // group, out_per_group) + kernel)
    factor = scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
    return (grouped * factor).reshape(weight.shape), _bias_after(bias, scale, shift)


def fold_after_gemm(
    b_matrix: Array, c: Array | None, scale: Array, shift: Array, *, trans_b: bool, beta: float
) -> tuple[Array, Array]:
    """``s·(alpha·A'·B' + beta·C) + t`` as one Gemm with ``beta = 1`` (``alpha`` unchanged).

    The output channels are the columns of ``B' = B.T if transB else B``. ``C`` may have any shape
    that broadcasts to ``(M, N)`` (or be absent); the new ``C`` has the broadcast of its shape
    with ``[N]``.
    """
    b_matrix = _f64(b_matrix)
    new_b = b_matrix * (scale[:, None] if trans_b else scale[None, :])
    new_c = shift if c is None else np.float64(beta) * _f64(c) * scale + shift
    return new_b, new_c


def fold_after_matmul(
    weight: Array, bias: Array | None, scale: Array, shift: Array
) -> tuple[Array, Array]:
    """``s·(X·W + b) + t`` with a 2-D weight ``(K, N)``: columns scaled, ``b' = b·s + t``."""
    return _f64(weight) * scale[None, :], _bias_after(bias, scale, shift)


def fold_before_conv(
    weight: Array, bias: Array | None, scale: Array, shift: Array, group: int
) -> tuple[Array, Array]:
    """``Conv(s·x + t; W, b)`` as one Conv, exact when the Conv is unpadded or ``t = 0``.

    ``W'[o, i, k] = W[o, i, k]·s[g(o)·C_in/g + i]`` and
    ``b'[o] = b[o] + Σ_i,k W[o, i, k]·t[g(o)·C_in/g + i]``.
    """
    weight = _f64(weight)
    c_out, in_per_group = weight.shape[:2]
    # Row o of these (C_out, C_in/g) tables holds the channels output channel o reads.
    scale_rows = np.repeat(scale.reshape(group, in_per_group), c_out // group, axis=0)
    shift_rows = np.repeat(shift.reshape(group, in_per_group), c_out // group, axis=0)
    trailing = (1,) * (weight.ndim - 2)
    new_weight = weight * scale_rows.reshape(scale_rows.shape + trailing)
    spilled = (
        (weight * shift_rows.reshape(shift_rows.shape + trailing)).reshape(c_out, -1).sum(axis=1)
    )
    new_bias = spilled if bias is None else _f64(bias) + spilled
    return new_weight, new_bias


def fold_before_gemm(
    b_matrix: Array,
    c: Array | None,
    scale: Array,
    shift: Array,
    *,
    trans_b: bool,
    alpha: float,
    beta: float,
) -> tuple[Array, Array]:
    """``alpha·(s·A + t)·B' + beta·C`` as one Gemm with ``beta = 1``; ``A`` not transposed.

    ``B'`` is ``(K, N)`` (``B.T`` when ``transB``); its row ``k`` is scaled by ``s[k]``, and
    ``C' = beta·C + alpha·t·B'`` (shape: the broadcast of ``C``'s with ``[N]``).
    """
    b_matrix = _f64(b_matrix)
    effective = b_matrix.T if trans_b else b_matrix
    new_b = b_matrix * (scale[None, :] if trans_b else scale[:, None])
    spilled = np.float64(alpha) * (shift @ effective)
    new_c = spilled if c is None else np.float64(beta) * _f64(c) + spilled
    return new_b, new_c


def fold_before_matmul(weight: Array, scale: Array, shift: Array) -> tuple[Array, Array]:
    """``(s·X + t)·W`` with a 2-D ``W`` as ``X·W' + b'``: ``W' = diag(s)·W``, ``b' = t·W``."""
    weight = _f64(weight)
    return weight * scale[:, None], shift @ weight


def repeat_channels(vector: Array, block: int) -> Array:
    """Per-feature values after ``Flatten`` of ``(N, C, d…)``: feature ``c·block + j`` is ``c``."""
    return np.repeat(_f64(vector), block)


def per_channel(constant: Array, rank: int, axis: int, channels: int, *, of: str = "the output") -> Array:
    """The length-``channels`` vector a constant holds along ``axis`` of a rank-``rank`` output
    (``of`` names that output in the reasons).

    NumPy broadcasting aligns the constant's shape to the *last* axes, so a ``[C]`` vector on a
    rank-4 ``(N, C, H, W)`` output scales the ``W`` axis, not the channels, even when ``W == C``.
    Raises :class:`~normfold.errors.Refusal` with the reason when the constant is not per
    channel along ``axis`` (it varies along another axis, has more axes than the tensor, or a
    channel length that neither matches nor is 1).
    """
    constant = _f64(constant)
    if constant.ndim > rank:
        raise Refusal(
            f"the constant of shape {list(constant.shape)} has more axes than the rank-{rank} "
            f"output, so it would change the shape of {of}"
        )
    aligned = (1,) * (rank - constant.ndim) + constant.shape
    for position, size in enumerate(aligned):
        if position != axis and size != 1:
            raise Refusal(
                f"the constant of shape {list(constant.shape)} varies along axis {position} of the "
                f"rank-{rank} output, not only along the channel axis {axis} of {of}"
            )
    if aligned[axis] not in (1, channels):
        raise Refusal(
            f"the constant has {aligned[axis]} values along the channel axis {axis}, "
            f"but {of} has {channels} channels"
        )
    return np.broadcast_to(constant.reshape(-1), (channels,)).copy()


def affine_of_binary(op_type: str, constant: Array, constant_first: bool) -> tuple[Array, Array]:
    """``(s, t)`` with ``op(y, c) = s·y + t`` elementwise, for Mul, Add, Sub and Div.

    ``Div(y, c)`` is ``y·(1/c)``; ``Sub(c, y)`` is ``−y + c``; ``Div(c, y)`` is not affine in
    ``y`` and raises :class:`~normfold.errors.Refusal`, as do values that make ``s`` or ``t``
    non-finite (a division by zero; an infinite scale turns ``0·∞`` into NaN).
    """
    constant = _f64(constant)
    ones, zeros = np.ones_like(constant), np.zeros_like(constant)
    if op_type == "Mul":
        scale, shift = constant, zeros
    elif op_type == "Add":
        scale, shift = ones, constant
    elif op_type == "Sub":
        scale, shift = (-ones, constant) if constant_first else (ones, -constant)
    elif op_type == "Div" and not constant_first:
        with np.errstate(divide="ignore"):
            scale, shift = 1.0 / constant, zeros
    else:
        raise Refusal(
            f"{op_type} with the constant first is not an affine map of its other input"
        )
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise Refusal(f"the {op_type} constant makes a non-finite scale or shift")
    return scale, shift
