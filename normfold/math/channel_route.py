"""Where a tensor's channels go through a row-major reshape: pure arithmetic on sizes.

A per-channel affine map (a BatchNorm) commutes with a shape op exactly when every element keeps
its channel. The state is ``(axis, block)``: along ``axis`` the index is ``c·block + j`` with
``j < block`` (``block`` is 1 when the axis holds exactly the channels). A Transpose moves the
axis (:func:`transpose_route`). A Flatten, Reshape, Squeeze, Unsqueeze or ``view`` keeps the
row-major order (:func:`reshape_route`): with ``S`` the number of elements after channel ``c``'s
first one (``block`` times the sizes after ``axis``), channel ``c`` lands on output axis ``b``
when ``T = Π out[b+1:]`` divides ``S`` and ``out[b] = C·S/T``; the index on ``b`` is then
``c·(S/T) + j'`` and no other output axis depends on ``c`` (the elements before channel ``c``
fill the same prefix on both sides, since the totals are equal). The sizes after the channel
axis, on both sides, and ``C`` must be known; sizes before it may be unknown (``None``: a
symbolic batch). A chain of such reshapes is one reshape from its first shape to its last.

Shared by the ONNX folds through shape chains (``passes/_channel_route.py``) and
``normfold.torch.fold_batchnorm``.
"""

from __future__ import annotations

__all__ = ["flatten_sizes", "reshape_route", "transpose_route"]

import math
from collections.abc import Sequence

Sizes = Sequence[int | None]


def _shown(sizes: Sizes) -> list[int | str]:
    return ["?" if d is None else d for d in sizes]


def reshape_route(ins: Sizes, outs: Sizes, axis: int, block: int, channels: int) -> tuple[int, int]:
    """``(axis, block)`` of ``channels`` channels after a row-major reshape of ``ins`` to ``outs``.

    Raises ``ValueError`` with the reason when the channels are split over several axes, merged
    with an axis before them, or sizes the rule needs are unknown.
    """
    after = list(ins[axis + 1:])
    if any(d is None for d in after):
        raise ValueError(
            f"the sizes {_shown(after)} after the channel axis {axis} are not static"
        )
    span = block * math.prod(after)  # elements after channel c's first one
    trailing = 1
    for out_axis in range(len(outs) - 1, -1, -1):
        if trailing > span:
            break
        size = outs[out_axis]
        if span % trailing == 0 and size == channels * (span // trailing):
            return out_axis, span // trailing
        if size is None:
            break
        trailing *= size
    raise ValueError(
        f"the {channels} channels on axis {axis} of {_shown(ins)} become {_shown(outs)}: they are "
        "split, or merged with an axis before them"
    )


def transpose_route(perm: Sequence[int], axis: int) -> int:
    """The axis the channels are on after a Transpose with ``perm``."""
    return list(perm).index(axis)


def flatten_sizes(ins: Sizes, axis: int) -> list[int | None]:
    """ONNX Flatten's output sizes ``[Π ins[:axis], Π ins[axis:]]`` (None where unknown)."""
    axis += len(ins) if axis < 0 else 0

    def product(sizes: Sizes) -> int | None:
        return None if any(d is None for d in sizes) else math.prod(sizes)

    return [product(ins[:axis]), product(ins[axis:])]
