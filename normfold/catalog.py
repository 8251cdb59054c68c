"""The passes by name: what ``normfold passes`` lists and ``--passes`` accepts, without the passes.

The pass modules import onnx_ir and onnxscript's rewriter (about a second); listing the passes,
and refusing a misspelled or approximate one, must not wait for that. So each pass's name,
one-line summary and exactness live here, in :data:`PASSES` (in the order ``optimize`` runs
them), and the pass classes read theirs from :func:`pass_info`; ``normfold.passes.REGISTRY``
maps the same names to the classes. A pass added at run time goes into both ``REGISTRY`` and
:data:`BY_NAME`.
"""

from __future__ import annotations

__all__ = ["BY_NAME", "DEFAULT_PASSES", "PASSES", "PassInfo", "check_exact_passes", "pass_info"]

import dataclasses
from collections.abc import Sequence

from normfold.errors import InputError


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A pass as users see it: its stable name, one line for ``normfold passes``, and whether
    it is exact (approximate passes never run in ``optimize``)."""

    name: str
    summary: str
    exact: bool = True


PASSES: tuple[PassInfo, ...] = (
    PassInfo("cleanup", "fold constants (keeping tiny eps), drop Identity/eval Dropout, dead code, sort"),
    PassInfo("fold-bn", "fold BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before or after it"),
    PassInfo(
        "fold-branches",
        "merge parallel Conv/BN/AvgPool/identity branches of one tensor into one Conv (RepVGG, MobileOne, ACNet, DBB)",
    ),
    PassInfo("fold-affine", "fold constant per-channel Mul/Add/Sub/Div after a Conv/ConvTranspose/Gemm/MatMul into it"),
    PassInfo("fuse-norm", "fuse decomposed LayerNorm/RMSNorm/GroupNorm into single ops"),
    PassInfo(
        "collapse",
        "TLC layer collapse: linearize near-linear activations, merge the layers around them (approximate)",
        exact=False,
    ),
)

DEFAULT_PASSES: tuple[str, ...] = tuple(info.name for info in PASSES if info.exact)

BY_NAME: dict[str, PassInfo] = {info.name: info for info in PASSES}


def pass_info(name: str) -> PassInfo:
    """The catalog entry of pass ``name`` (``KeyError`` for a name that is not a pass)."""
    return BY_NAME[name]


def check_exact_passes(names: Sequence[str]) -> None:
    """Raise :class:`InputError` for a name that is no pass, or a pass that is not exact.

    ``optimize`` only runs exact passes; an approximate one (``collapse``) has its own command,
    which measures what it costs and asks for a budget.
    """
    for name in names:
        info = BY_NAME.get(name)
        if info is None:
            raise InputError(f"unknown pass {name!r}; known passes: {', '.join(BY_NAME)}")
        if not info.exact:
            raise InputError(
                f"pass {name!r} is approximate and never part of optimize: use `normfold {name}` "
                f"(see `normfold {name} --help`)"
            )
