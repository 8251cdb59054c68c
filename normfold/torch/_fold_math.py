"""BatchNorm folding arithmetic on plain float64 tensors: no modules, no graphs.

In eval mode a BatchNorm computes, for every channel ``c`` of its input ``y`` (axis 1),

    BN(y)_c = γ_c · (y_c − μ_c) / sqrt(σ²_c + ε) + β_c = s_c · y_c + t_c,
    s_c = γ_c / sqrt(σ²_c + ε),    t_c = β_c − μ_c · s_c

with γ = 1 and β = 0 when the BatchNorm has no affine parameters. When ``y = W ⊛ x + b`` is a
Conv, ConvTranspose or Linear and channel ``c`` of ``y`` is computed from the weight slice
``W[c]`` alone, then ``BN(y) = W' ⊛ x + b'`` exactly, with

    W'[c] = s_c · W[c],    b'_c = s_c · b_c + t_c    (b = 0 when the layer has no bias).

Where output channel ``c`` lives in the weight:

- Linear ``(out, in)`` and Conv ``(C_out, C_in/g, *k)``: ``W[c]`` is row ``c`` (axis 0), for
  any number of groups ``g``.
- ConvTranspose ``(C_in, C_out/g, *k)``: output channel ``c = q·(C_out/g) + j`` of group ``q``
  is ``W[q·(C_in/g) : (q+1)·(C_in/g), j]`` — axis 1 within each group's block of input rows,
  not plain axis 1 (which is only right for ``g = 1``).

Every function takes and returns float64 tensors, so a caller upcasts once, folds, and casts
the result once to the layer's dtype; nothing passes through a low-precision intermediate.
"""

from __future__ import annotations

__all__ = ["bn_scale_shift", "fold_into_weights"]

import torch


def _require_float64(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != torch.float64:
            raise TypeError(f"{name} must be float64 (got {tensor.dtype}): upcast before folding")


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(s, t)`` with ``BN(y) = s · y + t`` for an eval-mode BatchNorm.

    ``weight`` and ``bias`` are γ and β; ``None`` (affine=False) means 1 and 0.
    """
    _require_float64(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def fold_into_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` computing ``scale · layer(x) + shift`` per output channel.

    ``weight`` is a Linear, Conv (``transposed=False``) or ConvTranspose (``transposed=True``)
    weight in torch's layout; ``groups`` matters only for ConvTranspose.
    """
    _require_float64(weight=weight, bias=bias, scale=scale, shift=shift)
    if transposed:
        in_channels, out_per_group = weight.shape[0], weight.shape[1]
        if in_channels % groups or out_per_group * groups != scale.numel():
            raise ValueError(
                f"ConvTranspose weight {tuple(weight.shape)} with {groups} groups does not have "
                f"{scale.numel()} output channels"
            )
        # View the rows as (group, C_in/g) and scale axis 2 (the output channel in the group).
        blocks = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
        per_channel = scale.reshape(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        folded_weight = (blocks * per_channel).reshape(weight.shape)
    else:
        if weight.shape[0] != scale.numel():
            raise ValueError(
                f"weight {tuple(weight.shape)} does not have {scale.numel()} output channels"
            )
        folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias
