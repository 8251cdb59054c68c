"""Exact merges of linear layers, as pure float64 functions on weights (no modules, no graphs).

A convolution here is :class:`Conv`: weight ``(C_out, C_in/g, k…)``, bias ``(C_out,)``, and per
spatial axis a stride ``s``, zero padding ``p`` (the same at both ends), dilation ``d``, with
``g`` groups. Output position ``o`` reads input positions ``s·o + d·j − p`` for taps ``j``.

Rules (each function's docstring repeats its precondition):

1. ``compose_conv(A, B)`` is ``B∘A``: output ``o`` of ``B`` reads ``A`` at ``s_B·o + d_B·j_B``,
   which reads the input at ``s_A·s_B·o + s_A·d_B·j_B + d_A·j_A − (p_A + s_A·p_B)``. So
   ``S = s_A·s_B``, the taps span ``K = d_A(k_A − 1) + s_A·d_B(k_B − 1) + 1``, the padding is
   ``P = p_A + s_A·p_B``, and ``W[o, i, t] = Σ W_B[o, m, j_B]·W_A[m, i, j_A]`` over
   ``d_A·j_A + s_A·d_B·j_B = t``; ``b = b_B + Σ_{m, j_B} W_B[o, m, j_B]·b_A[m]``. When every tap
   offset is a multiple of ``D = gcd(d_A, s_A·d_B)`` (over the axes with more than one tap) the
   merged kernel keeps only those taps, with dilation ``D``. Groups: the partitions of both
   layers nest in the one of ``gcd(g_A, g_B)`` groups, which is the merged grouping.
   Exact when ``p_B = 0``. With ``p_B > 0`` it computes the *pad-first* model (``A`` padded by
   ``p_A + s_A·p_B``, ``B`` unpadded), which differs from ``B∘A`` only where ``B``'s zero
   padding would have read its input's border.
2. ``add_identity(C)`` is ``C(x) + x``: one at the centre tap of each channel's own input.
   Needs ``S = 1``, ``C_out = C_in`` and the input's position ``o`` at a tap (``P/D`` an integer
   inside the kernel).
3. ``add_shortcut(C, R)`` is ``C(x) + R(x)`` for another conv ``R`` of the same input with the
   same stride whose taps fall on ``C``'s taps; the grouping becomes ``gcd(g_C, g_R)``.
4. ``compose_linear`` is ``(W_B·W_A, W_B·b_A + b_B)``; ``linear_as_conv`` writes a Linear as a
   1×1 Conv (a classifier moved before a global average pool, which commutes with it).
5. Per-channel affine maps (BatchNorm, a linearized activation) fold into the conv before them
   always, and into the conv after them when it is unpadded or the shift is zero.

:func:`compose_macs` says what a merge costs per output position, so callers can refuse merges
that grow the work (two 3×3 convs of width C cost 18·C², their 5×5 merge 25·C²).
"""

from __future__ import annotations

__all__ = [
    "Conv",
    "add_identity",
    "add_shortcut",
    "affine_after",
    "affine_before",
    "compose_conv",
    "compose_linear",
    "compose_macs",
    "linear_as_conv",
    "regroup",
]

import dataclasses
import math

import numpy as np

from normfold.errors import Refusal
from normfold.math.batchnorm import fold_after_conv, fold_before_conv

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Conv:
    """A zero-padded N-d convolution in float64 (see the module docstring for the layout)."""

    weight: Array
    bias: Array
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        rank = self.weight.ndim - 2
        if not (len(self.stride) == len(self.padding) == len(self.dilation) == rank):
            raise ValueError(f"a {rank}-d conv needs {rank} strides, paddings and dilations")
        if self.weight.shape[0] % self.groups or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"weight {self.weight.shape} / bias {self.bias.shape} / groups {self.groups} disagree")

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def macs_per_output(self) -> int:
        """Multiply-accumulates per output position (all output channels)."""
        return int(np.prod(self.weight.shape))


def regroup(weight: Array, groups: int, new_groups: int) -> Array:
    """``weight`` of a ``groups``-group conv written for ``new_groups`` groups (``new_groups | groups``).

    The result computes the same conv: each coarser group's block holds the finer groups' weights
    on its diagonal and zeros elsewhere. ``new_groups = 1`` gives the dense weight.
    """
    if groups % new_groups:
        raise ValueError(f"{new_groups} groups do not coarsen {groups}")
    c_out, per_group = weight.shape[:2]
    ratio = groups // new_groups
    dense = np.zeros((c_out, per_group * ratio) + weight.shape[2:], dtype=np.float64)
    out_per_group = c_out // groups
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        start = (group % ratio) * per_group
        dense[rows, start : start + per_group] = weight[rows]
    return dense


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where ``second∘first``'s taps fall (rule 1 of the module docstring)."""

    groups: int
    span: tuple[int, ...]  # taps before keeping only the multiples of ``dilation``
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple((span - 1) // d + 1 for span, d in zip(self.span, self.dilation))


def _geometry(first: Conv, second: Conv) -> _Geometry:
    if first.out_channels != second.in_channels:
        raise ValueError(f"{first.out_channels} channels out of the first conv, {second.in_channels} into the second")
    if len(first.stride) != len(second.stride):
        raise ValueError("the convs have different spatial ranks")
    k1, k2 = first.kernel, second.kernel
    s1, d1, d2 = first.stride, first.dilation, second.dilation
    dilation = []
    for i in range(len(k1)):
        steps = [step for step, taps in ((d1[i], k1[i]), (s1[i] * d2[i], k2[i])) if taps > 1]
        dilation.append(math.gcd(*steps) if steps else 1)
    return _Geometry(
        groups=math.gcd(first.groups, second.groups),
        span=tuple(d1[i] * (k1[i] - 1) + s1[i] * d2[i] * (k2[i] - 1) + 1 for i in range(len(k1))),
        dilation=tuple(dilation),
        stride=tuple(s1[i] * second.stride[i] for i in range(len(k1))),
        padding=tuple(first.padding[i] + s1[i] * second.padding[i] for i in range(len(k1))),
    )


def compose_conv(first: Conv, second: Conv, *, weights: bool = True) -> Conv:
    """``second∘first`` as one conv; exact when ``second`` is unpadded (else the pad-first model).

    ``weights=False`` gives the merged conv's shape and settings with zero weights, without the
    arithmetic (for planning: counting and timing merged layers, whose values do not matter).
    """
    geometry = _geometry(first, second)
    groups, span = geometry.groups, geometry.span
    in_per = first.in_channels // groups
    if not weights:
        return Conv(np.zeros((second.out_channels, in_per) + geometry.kernel), np.zeros(second.out_channels),
                    geometry.stride, geometry.padding, geometry.dilation, groups)
    k1, k2 = first.kernel, second.kernel
    s1, d1, d2 = first.stride, first.dilation, second.dilation
    out_per, mid_per = second.out_channels // groups, first.out_channels // groups
    weight = np.zeros((second.out_channels, in_per) + span, dtype=np.float64)
    bias = second.bias.astype(np.float64).copy()
    for block in range(groups):
        rows = slice(block * out_per, (block + 1) * out_per)
        mids = slice(block * mid_per, (block + 1) * mid_per)
        outer = regroup(second.weight[rows], second.groups // groups, 1)  # (out_per, mid_per, k2…)
        inner = regroup(first.weight[mids], first.groups // groups, 1)  # (mid_per, in_per, k1…)
        bias[rows] += outer.reshape(out_per, mid_per, -1).sum(axis=2) @ first.bias[mids]
        for tap in np.ndindex(*k2):
            where = tuple(
                slice(s1[i] * d2[i] * tap[i], s1[i] * d2[i] * tap[i] + d1[i] * (k1[i] - 1) + 1, d1[i])
                for i in range(len(k1))
            )
            weight[(rows, slice(None)) + where] += np.tensordot(outer[(Ellipsis,) + tap], inner, axes=([1], [0]))
    keep = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in geometry.dilation)
    return Conv(weight[keep].copy(), bias, geometry.stride, geometry.padding, geometry.dilation, groups)


def compose_macs(first: Conv, second: Conv) -> tuple[int, int]:
    """``(unmerged, merged)`` MACs per output position of ``second∘first``.

    ``first`` runs at ``prod(s_B)`` positions per output position of ``second``.
    """
    merged = compose_conv_shape(first, second)
    unmerged = second.macs_per_output + first.macs_per_output * int(np.prod(second.stride))
    return unmerged, merged


def compose_conv_shape(first: Conv, second: Conv) -> int:
    """MACs per output position of the merged conv, without building its weight."""
    geometry = _geometry(first, second)
    return second.out_channels * (first.in_channels // geometry.groups) * int(np.prod(geometry.kernel))


def _tap_of(offset: int, dilation: int, size: int) -> int | None:
    if offset % dilation:
        return None
    tap = offset // dilation
    return tap if 0 <= tap < size else None


def add_identity(conv: Conv) -> Conv:
    """``conv(x) + x`` as one conv: needs stride 1, ``C_out = C_in``, ``P/D`` a tap of the kernel."""
    if any(s != 1 for s in conv.stride):
        raise Refusal(f"an identity shortcut needs stride 1 (the conv has stride {conv.stride})")
    if conv.out_channels != conv.in_channels:
        raise Refusal(f"an identity shortcut needs C_out = C_in ({conv.out_channels} != {conv.in_channels})")
    centre = tuple(_tap_of(p, d, k) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel))
    if any(tap is None for tap in centre):
        raise Refusal(
            f"input position o is not a tap of the conv (padding {conv.padding}, dilation {conv.dilation})"
        )
    weight = conv.weight.copy()
    per_group = weight.shape[1]
    for channel in range(conv.out_channels):
        weight[(channel, channel % per_group) + centre] += 1.0
    return dataclasses.replace(conv, weight=weight)


def add_shortcut(conv: Conv, shortcut: Conv) -> Conv:
    """``conv(x) + shortcut(x)`` as one conv; ``shortcut``'s taps must fall on ``conv``'s."""
    if conv.stride != shortcut.stride:
        raise Refusal(f"the shortcut's stride {shortcut.stride} differs from the conv's {conv.stride}")
    if (conv.out_channels, conv.in_channels) != (shortcut.out_channels, shortcut.in_channels):
        raise Refusal("the shortcut and the conv map different channel counts")
    starts = []
    for i, size in enumerate(conv.kernel):
        step = shortcut.dilation[i] * (shortcut.kernel[i] - 1)
        first, last = (
            _tap_of(conv.padding[i] - shortcut.padding[i], conv.dilation[i], size),
            _tap_of(conv.padding[i] - shortcut.padding[i] + step, conv.dilation[i], size),
        )
        if first is None or last is None or (shortcut.kernel[i] > 1 and shortcut.dilation[i] % conv.dilation[i]):
            raise Refusal("the shortcut's taps do not fall on the conv's kernel")
        starts.append(slice(first, last + 1, max(shortcut.dilation[i] // conv.dilation[i], 1)))
    groups = math.gcd(conv.groups, shortcut.groups)
    weight = regroup(conv.weight, conv.groups, groups)
    weight[(slice(None), slice(None)) + tuple(starts)] += regroup(shortcut.weight, shortcut.groups, groups)
    return Conv(weight, conv.bias + shortcut.bias, conv.stride, conv.padding, conv.dilation, groups)


def compose_linear(first: tuple[Array, Array], second: tuple[Array, Array]) -> tuple[Array, Array]:
    """``second∘first`` for Linear layers ``(W (out, in), b (out,))``: exact."""
    (w1, b1), (w2, b2) = first, second
    return w2 @ w1, w2 @ b1 + b2


def linear_as_conv(weight: Array, bias: Array, rank: int) -> Conv:
    """A Linear ``(out, in)`` as the 1×1 ``rank``-d conv computing it at every position."""
    return Conv(weight.reshape(weight.shape + (1,) * rank), bias, (1,) * rank, (0,) * rank, (1,) * rank)


def affine_after(conv: Conv, scale: Array, shift: Array) -> Conv:
    """``scale·conv(x) + shift`` per output channel: always exact."""
    weight, bias = fold_after_conv(conv.weight, conv.bias, scale, shift)
    return dataclasses.replace(conv, weight=weight, bias=bias)


def affine_before(conv: Conv, scale: Array, shift: Array) -> Conv:
    """``conv(scale·x + shift)`` per input channel: exact when unpadded or ``shift = 0``."""
    weight, bias = fold_before_conv(conv.weight, conv.bias, scale, shift, conv.groups)
    return dataclasses.replace(conv, weight=weight, bias=bias)
