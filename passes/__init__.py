"""normfold's graph passes and their registry.

Each pass is one file with a docstring that states its rule and preconditions. Names in
:data:`REGISTRY` are stable: the CLI (``--passes``), reports and users' scripts refer to them.
``DEFAULT_PASSES`` are the exact passes ``normfold optimize`` runs when none are named, in order.

The rewrite rules the rule-based passes (fold-bn, fold-affine, fuse-norm) run, one per file, are
listed once, in order, in :mod:`normfold.passes.rules`; :mod:`normfold.passes.base` is what a
pass or a rule builds on (options, the record, :class:`~normfold.errors.Refusal` handling).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_PASSES",
    "REGISTRY",
    "NormfoldPass",
    "PassOptions",
    "PassRecord",
    "create_passes",
]

from typing import Any

from normfold.catalog import DEFAULT_PASSES, check_exact_passes
from normfold.errors import InputError
from normfold.passes.base import NormfoldPass, PassOptions, PassRecord
from normfold.passes.cleanup import CleanupPass
from normfold.passes.fold_affine import FoldAffinePass
from normfold.passes.fold_bn import FoldBatchNormPass
from normfold.passes.fold_branches import FoldBranchesPass
from normfold.passes.fuse_norm import FuseNormPass

# Every pass by name; the approximate ``collapse`` joins on first access of REGISTRY (the
# module ``__getattr__`` below), so ``optimize`` never imports collapse's scoring, selection and
# latency modules (~20 ms of every run's start-up). One dict either way: an entry added to
# REGISTRY is one create_passes sees.
REGISTRY: dict[str, type[NormfoldPass]]
_REGISTRY: dict[str, type[NormfoldPass]] = {
    cls.name: cls
    for cls in (
        CleanupPass,
        FoldBatchNormPass,
        FoldBranchesPass,
        FoldAffinePass,
        FuseNormPass,
    )
}


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        from normfold.passes.collapse import CollapsePass

        _REGISTRY.setdefault(CollapsePass.name, CollapsePass)
        globals()["REGISTRY"] = _REGISTRY
        return _REGISTRY
    raise AttributeError(f"module 'normfold.passes' has no attribute {name!r}")


def create_passes(names: list[str] | tuple[str, ...] | None, options: PassOptions) -> list[NormfoldPass]:
    """Instantiate the named passes (default: all exact ones), ``cleanup`` always first."""
    chosen = list(DEFAULT_PASSES if names is None else names)
    check_exact_passes([name for name in chosen if name not in _REGISTRY or not _REGISTRY[name].exact])
    unknown = [name for name in chosen if name not in _REGISTRY]
    if unknown:
        raise InputError(
            f"unknown pass {unknown[0]!r}; known passes: {', '.join(_REGISTRY)}"
        )
    if "cleanup" in chosen:
        chosen.remove("cleanup")
    return [_REGISTRY[name](options) for name in ["cleanup", *chosen]]
