"""normfold on torch modules: fold BatchNorm before export, in float64, with a report; fuse
hand-written normalizations into torch's; export to an optimized ONNX file verified against the
module (:func:`export`).

Needs the ``torch`` extra; ``import normfold`` alone never imports torch.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401  (fail here, with the install line, not deep inside a submodule)
except ImportError as error:
    raise ImportError(
        f"normfold.torch needs PyTorch ({error}): pip install 'normfold[torch]' torch==2.13.0"
    ) from error

from normfold.torch.fold import (
    FoldedSite,
    FoldReport,
    RefusedSite,
    UntracedModule,
    fold_batchnorm,
    fold_batchnorm_with_report,
)

__all__ = [
    "ExportResult",
    "ExportVerificationError",
    "FoldReport",
    "FoldedSite",
    "FuseNormsReport",
    "RefusedSite",
    "UntracedModule",
    "export",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "fuse_norm_calls",
    "fuse_norm_calls_with_report",
    "fuse_norms",
    "fuse_norms_with_report",
    "MergedSum",
    "RefusedBranch",
    "ReparamReport",
    "reparameterize",
    "reparameterize_with_report",
]
from normfold.torch.layer_collapse import CollapseResult, CollapseStep, collapse  # noqa: E402  (TLC, issue 5)
from normfold.torch.fuse_norm_calls import fuse_norm_calls, fuse_norm_calls_with_report
from normfold.torch.fuse_norms import FuseNormsReport, fuse_norms, fuse_norms_with_report
from normfold.torch.onnx_export import ExportResult, ExportVerificationError, export  # noqa: E402
from normfold.torch.reparameterize import (  # noqa: E402  (issue 14)
    MergedSum,
    RefusedBranch,
    ReparamReport,
    reparameterize,
    reparameterize_with_report,
)
