"""normfold: fold BatchNorm, fuse normalization patterns and collapse layers in ONNX graphs and
torch modules, and verify with onnxruntime that the result computes what the input did.

``normfold.torch`` needs the ``torch`` extra and is imported only when asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"
