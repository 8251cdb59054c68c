"""The one padding rule: the explicit zero padding a Conv applies, from ONNX's or torch's form.

ONNX's Conv (and its pooling ops) give padding as ``auto_pad`` plus ``pads``:

* ``NOTSET`` (the default): ``pads = [x1_begin, x2_begin, …, x1_end, x2_end]``, all 0 when absent.
* ``VALID``: no padding.
* ``SAME_UPPER`` / ``SAME_LOWER``: pad so that ``out[i] = ceil(in[i] / stride[i])``; the total
  ``max(0, (out[i] − 1)·stride[i] + (kernel[i] − 1)·dilation[i] + 1 − in[i])`` is split in half,
  an odd extra element going to the end (UPPER) or the beginning (LOWER). With stride 1 the
  total is ``(kernel[i] − 1)·dilation[i]`` whatever the input size; with a larger stride it
  depends on the input size, so without it the padding is unknown (``None``).

torch's ``ConvNd.padding`` is a tuple per spatial axis (the same at both ends), ``'valid'`` or
``'same'``; torch allows ``'same'`` only with stride 1 and puts an odd extra element at the end,
which is ONNX's ``SAME_UPPER``.

Pads are returned in ONNX's layout, ``(begins…, ends…)``.
"""

from __future__ import annotations

__all__ = ["conv_pads", "symmetric", "torch_conv_pads"]

import math
from collections.abc import Sequence

from normfold.errors import Refusal


def conv_pads(
    auto_pad: str,
    pads: Sequence[int] | None,
    kernel: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    input_size: Sequence[int | None] | None = None,
) -> tuple[int, ...] | None:
    """The explicit ``(begins…, ends…)`` zero padding of an ONNX Conv; None when it depends on an
    input size that is not known (``SAME_*`` with a stride above 1).

    Raises :class:`~normfold.errors.Refusal` for an ``auto_pad`` the ONNX spec does not define.
    """
    rank = len(kernel)
    strides = tuple(strides or (1,) * rank)
    dilations = tuple(dilations or (1,) * rank)
    if auto_pad == "NOTSET":
        return tuple(int(p) for p in pads) if pads else (0,) * (2 * rank)
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise Refusal(f"auto_pad={auto_pad} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    begins, ends = [], []
    for axis in range(rank):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        if strides[axis] == 1:
            total = span - 1
        else:
            size = input_size[axis] if input_size is not None else None
            if not isinstance(size, int):
                return None
            total = max(0, (math.ceil(size / strides[axis]) - 1) * strides[axis] + span - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return (*begins, *ends)


def torch_conv_pads(padding: str | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The explicit ``(begins…, ends…)`` padding of a torch ``ConvNd`` (stride irrelevant: torch
    refuses ``'same'`` with a stride above 1)."""
    if isinstance(padding, str):
        auto_pad = {"valid": "VALID", "same": "SAME_UPPER"}[padding]
        pads = conv_pads(auto_pad, None, kernel, dilations=dilation)
        assert pads is not None  # stride 1: known without the input size
        return pads
    return (*padding, *padding)


def symmetric(pads: Sequence[int]) -> tuple[int, ...] | None:
    """The per-axis padding when every axis is padded equally at both ends, else None."""
    rank = len(pads) // 2
    begins, ends = tuple(pads[:rank]), tuple(pads[rank:])
    return begins if begins == ends else None
