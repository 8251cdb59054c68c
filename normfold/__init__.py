"""normfold: fold BatchNorm, fuse normalization patterns and collapse layers in ONNX graphs and
torch modules, and verify with onnxruntime that the result computes what the input did.

    import normfold
    result = normfold.optimize("in.onnx", target="onnx")   # also a ModelProto / onnx_ir.Model
    result.save("out.onnx")                                 # refuses if verification failed
    normfold.verify("ref.onnx", "cand.onnx").passed

``normfold.torch`` needs the ``torch`` extra and is imported only when asked for.
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "NormfoldError",
    "OptimizeResult",
    "PassOptions",
    "VerificationError",
    "VerificationReport",
    "VerifyOptions",
    "__version__",
    "inspect",
    "load",
    "optimize",
    "save",
    "verify",
]

__version__ = "0.1.0"

from normfold.errors import InputError, NormfoldError, VerificationError

# The rest loads on first use: `import normfold` stays fast for the CLI and for tools that only
# need the errors or io.
_LAZY = {
    "load": "normfold.io",
    "save": "normfold.io",
    "OptimizeResult": "normfold.jobs.optimize",
    "PassOptions": "normfold.options",
    "VerifyOptions": "normfold.options",
    "inspect": "normfold.jobs.inspect",
    "optimize": "normfold.jobs.optimize",
    "VerificationReport": "normfold.verification",
    "verify": "normfold.verification",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normfold' has no attribute {name!r}")
