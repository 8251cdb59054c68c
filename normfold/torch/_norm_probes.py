"""Probes that decide whether a replacement normalization computes what the original computes.

Shared by :mod:`normfold.torch.fuse_norms` (whole modules) and
:mod:`normfold.torch.fuse_norm_calls` (fx subgraphs). The rule, for an original and a new
module that each take one tensor:

1. The probes are seeded float64 inputs of the given shapes (:func:`base_probes`), each with
   its first slice over the normalized dims all zero, so that only eps keeps it finite. Each is
   tried at scales 1, 1e-3, 1e4 and sqrt(eps): small inputs make eps matter most (eps on the
   standard deviation vs the variance), large ones make it vanish.
2. In float64, with both modules converted by ``.to(torch.float64)``, the outputs agree within
   1e-6 relative to the largest output.
3. In the model's dtype (when it is not float64), with both modules as they are and the probes
   cast to that dtype, the outputs agree within 8 units in the last place of that dtype
   (relative to the largest output): a float32 upcast inside a half-precision original must be
   what the replacement does too.
4. Output shapes and dtypes are equal and every output is finite; a probe on which either
   module raises is a mismatch.

A mismatch raises :class:`normfold.errors.Refusal` with the reason; the caller decides whether
it refuses the site or tries another replacement.
"""

from __future__ import annotations

__all__ = ["base_probes", "require_match"]

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normfold.errors import Refusal, first_line

_FLOAT64_RTOL = 1e-6
# Units in the last place allowed between two correct roundings of the same normalization.
_ULPS = 8
_SCALES = (1.0, 1e-3, 1e4)


def base_probes(shapes: Sequence[tuple[int, ...]], normalized_ndim: int) -> list[torch.Tensor]:
    """Seeded float64 probes of ``shapes``; in each, the first slice over the last
    ``normalized_ndim`` dims is all zero (a padding row, or a whole sample for GroupNorm)."""
    generator = torch.Generator().manual_seed(0)
    probes = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        x[(0,) * (len(shape) - normalized_ndim)] = 0.0
        probes.append(x)
    return probes


def require_match(
    original: nn.Module, new: nn.Module, probes: Sequence[torch.Tensor], eps: float, dtype: torch.dtype
) -> None:
    """Return if ``new`` computes what ``original`` computes on ``probes``; else raise
    :class:`Refusal` saying where they differ."""
    checks = [(torch.float64, _FLOAT64_RTOL)]
    if dtype != torch.float64:
        checks.append((dtype, _ULPS * torch.finfo(dtype).eps))
    scales = (*_SCALES, *([math.sqrt(eps)] if eps > 0 else []))
    for probe_dtype, rtol in checks:
        # float64: both converted; the model's dtype: both as they are (their upcasts included).
        a, b = (copy.deepcopy(m).eval() for m in (original, new))
        if probe_dtype == torch.float64:
            a, b = a.to(probe_dtype), b.to(probe_dtype)
        for x in probes:
            for scale in scales:
                probe = (x * scale).to(probe_dtype)
                try:
                    # Mixed-dtype calls warn that they skip a fused kernel; the numbers decide.
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        want, got = a(probe), b(probe)
                except Exception as error:  # noqa: BLE001  (any failure on a probe: it is not this norm)
                    raise Refusal(
                        f"probe {list(x.shape)} raised {type(error).__name__}: {first_line(error)}"
                    ) from error
                why = _compare(want, got, rtol)
                if why is not None:
                    raise Refusal(f"{why} on a {probe_dtype} probe {list(x.shape)} scaled by {scale:g}")


def _compare(want: Any, got: Any, rtol: float) -> str | None:
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return f"the original returns {type(want).__name__}, not a tensor,"
    if want.shape != got.shape:
        return f"output shape {list(want.shape)} != {list(got.shape)}"
    if want.dtype != got.dtype:
        return f"output dtype {want.dtype} != {got.dtype}"
    if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
        return "non-finite output"
    want64, got64 = want.double(), got.double()
    scale = max(float(want64.abs().max()), torch.finfo(want.dtype).tiny)
    error = float((want64 - got64).abs().max()) / scale
    if error > rtol:
        return f"relative error {error:.3g} > {rtol:.3g}"
    return None
