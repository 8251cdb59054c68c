"""Structural re-parameterization: parallel linear branches summed into one convolution.

A *branch* reads a tensor ``x`` and computes ``Conv(pad(x, p), K, stride s, dilation d, groups
g) + b`` for some kernel ``K`` of shape ``(C_out, C_in/g, k…)``. The training-time blocks of
RepVGG, MobileOne, ACNet and DBB sum several of them; each turns into a ``(kernel, bias)`` pair
(the shape of timm's ``reparameterize``), and the pairs add:

* **Conv** (``k×k``, ``1×1``, ``1×k``, ``k×1``): its own weight and bias.
* **BN after a branch** ``s·y + t``: the output channels scaled, ``b' = b·s + t``
  (:func:`normfold.math.batchnorm.fold_after_conv`).
* **identity** (``x`` itself, usually under a BN): a ``1×…×1`` kernel that is 1 where output
  channel ``o`` reads input channel ``o`` — entry ``[o, o mod (C/g)]`` for ``g`` groups.
* **average pool** ``k×k`` counting the padded zeros: the identity's diagonal with ``1/k^n``
  in every tap.
* **1×1 Conv then k×k Conv** (DBB): ``K[o, i] = Σ_m K2[o, m]·K1[m, i]`` within each group,
  ``b = b2 + Σ_m,k K2[o, m, k]·b1[m]`` — exact when the k×k Conv does not pad, or ``b1 = 0``
  (padding inserts zeros where the 1×1 Conv of a zero input would give ``b1``).

**Sub-kernel rule** (:func:`sub_kernel_offsets`): a branch with kernel size ``k`` and pads
``(p_begin, p_end)`` on an axis computes the same windows as the largest kernel ``K`` with pads
``(P_begin, P_end)`` and dilation ``d`` when ``K − k`` is even and ``p = P − d·(K − k)/2`` on both
sides: output ``o`` reads ``x[o·s − p + j·d]`` for ``j < k``, which is tap ``j + (K − k)/2`` of the
big window. Strides must be equal, and dilations equal on every axis where ``k > 1``. The small
kernel is then zero-padded to ``K``, centred (:func:`pad_kernel`). Any other padding changes the
border, and no single kernel reproduces it.

All functions take and return float64 arrays and never touch a graph or a module: the ONNX
pass ``fold-branches`` and ``normfold.torch.reparameterize`` both call them and cast once.
"""

from __future__ import annotations

__all__ = [
    "average_pool_kernel",
    "compose_pointwise",
    "identity_kernel",
    "pad_kernel",
    "prepend_pointwise",
    "sub_kernel_offsets",
]

from collections.abc import Sequence

import numpy as np

from normfold.errors import Refusal
from normfold.math.batchnorm import fold_after_conv

Array = np.ndarray


def sub_kernel_offsets(
    kernel: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    big_kernel: Sequence[int],
    big_pads: Sequence[int],
    big_dilations: Sequence[int],
) -> tuple[int, ...]:
    """Where a branch's kernel sits inside the big one (per spatial axis), or
    :class:`~normfold.errors.Refusal`.

    ``pads`` are ONNX-style ``(begin…, end…)``. Raises with the reason when the branch does not
    read the same windows as the big kernel centred on it (see the module docstring).
    """
    rank = len(big_kernel)
    if len(kernel) != rank:
        raise Refusal(f"a {len(kernel)}-d kernel cannot sit in a {rank}-d one")
    offsets = []
    for axis in range(rank):
        k, big = kernel[axis], big_kernel[axis]
        if k > big or (big - k) % 2:
            raise Refusal(
                f"a kernel of size {k} on axis {axis} cannot be centred in one of size {big}"
            )
        if k > 1 and dilations[axis] != big_dilations[axis]:
            raise Refusal(
                f"dilation {dilations[axis]} on axis {axis} differs from the big kernel's "
                f"{big_dilations[axis]}"
            )
        offset = (big - k) // 2
        want = (big_pads[axis] - big_dilations[axis] * offset,
                big_pads[axis + rank] - big_dilations[axis] * offset)
        have = (pads[axis], pads[axis + rank])
        if have != want:
            raise Refusal(
                f"pads {list(have)} on axis {axis}, but centred in the {big} kernel with pads "
                f"{[big_pads[axis], big_pads[axis + rank]]} it must have {list(want)}: the "
                "border would change"
            )
        offsets.append(offset)
    return tuple(offsets)


def pad_kernel(kernel: Array, offsets: Sequence[int], big_kernel: Sequence[int]) -> Array:
    """``kernel`` ``(C_out, C_in/g, k…)`` zero-padded to ``big_kernel``, starting at ``offsets``."""
    kernel = np.asarray(kernel, dtype=np.float64)
    widths = [(0, 0), (0, 0)] + [
        (offset, big - offset - size)
        for offset, big, size in zip(offsets, big_kernel, kernel.shape[2:], strict=True)
    ]
    return np.pad(kernel, widths)


def identity_kernel(channels: int, group: int, spatial_rank: int, value: float = 1.0) -> Array:
    """The ``(C, C/g, 1…)`` kernel of ``y = value·x``: entry ``[o, o mod C/g]`` is ``value``.

    Output channel ``o`` of a grouped Conv reads input channels ``g(o)·C/g … (g(o)+1)·C/g − 1``
    of its own group, and channel ``o`` itself is number ``o mod C/g`` among them.
    """
    if channels % group:
        raise ValueError(f"{channels} channels are not divisible by {group} groups")
    per_group = channels // group
    kernel = np.zeros((channels, per_group) + (1,) * spatial_rank, dtype=np.float64)
    rows = np.arange(channels)
    kernel[(rows, rows % per_group) + (0,) * spatial_rank] = value
    return kernel


def average_pool_kernel(channels: int, group: int, window: Sequence[int]) -> Array:
    """The ``(C, C/g, k…)`` kernel of an average pool over ``window`` that counts padded zeros."""
    size = int(np.prod(window))
    diagonal = identity_kernel(channels, group, len(window), 1.0 / size)
    return np.broadcast_to(diagonal, diagonal.shape[:2] + tuple(window)).copy()


def compose_pointwise(
    first: Array, first_bias: Array | None, second: Array, second_bias: Array | None, group: int
) -> tuple[Array, Array]:
    """``Conv(Conv(x; K1, b1); K2, b2)`` with a ``1×…×1`` ``K1`` as one Conv (same ``group``).

    ``K1`` is ``(M, C/g, 1…)`` and ``K2`` ``(O, M/g, k…)``; within group ``q``, output channel
    ``o`` reads middle channels ``m`` of that group, which read input channels of that group:
    ``K[o, i] = Σ_m K2[o, m]·K1[q·M/g + m, i]``. Exact as one unpadded step; the caller checks
    the padding condition (zero ``b1`` or an unpadded second Conv).
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    middle, in_per_group = first.shape[:2]
    out_channels, mid_per_group = second.shape[:2]
    if middle != mid_per_group * group or middle % group or out_channels % group:
        raise ValueError(
            f"a {list(first.shape)} kernel cannot feed a {list(second.shape)} one in {group} groups"
        )
    spatial = second.shape[2:]
    grouped_first = first.reshape(group, middle // group, in_per_group)
    grouped_second = second.reshape(group, out_channels // group, mid_per_group, *spatial)
    kernel = np.einsum("qom...,qmi->qoi...", grouped_second, grouped_first)
    kernel = kernel.reshape((out_channels, in_per_group) + spatial)
    bias = np.zeros(out_channels) if second_bias is None else np.asarray(second_bias, np.float64)
    if first_bias is not None:
        grouped_bias = np.asarray(first_bias, np.float64).reshape(group, 1, mid_per_group)
        spilled = (grouped_second.reshape(group, out_channels // group, mid_per_group, -1).sum(-1)
                   * grouped_bias).sum(-1)
        bias = bias + spilled.reshape(out_channels)
    return kernel, bias


def prepend_pointwise(
    first: Array,
    first_bias: Array | None,
    middle_affine: tuple[Array, Array] | None,
    second: Array,
    second_bias: Array | None,
    group: int,
    *,
    padded: bool,
    first_name: str,
    second_name: str,
) -> tuple[Array, Array]:
    """A 1×1 Conv ``first`` (then the per-channel ``middle_affine``, if any) before the Conv
    ``second``, as one kernel and bias (:func:`compose_pointwise`).

    Exact only when ``second`` pads nothing or the 1×1 output's bias is zero: zero padding
    is applied to that output, which on a zero input is its bias. Otherwise :class:`Refusal`.
    """
    if middle_affine is not None:
        first, first_bias = fold_after_conv(first, first_bias, *middle_affine)
    if padded and first_bias is not None and np.any(first_bias):
        raise Refusal(
            f"{second_name} zero-pads the output of the 1×1 {first_name}, which is its bias "
            "(nonzero) on a zero input: the merged Conv's border would differ"
        )
    return compose_pointwise(first, first_bias, second, second_bias, group)
