"""onnxruntime's contrib ops that live in the ONNX domain, and checking models that use them.

onnxruntime registers two normalization ops of its own in the default (ONNX) domain, with CPU
kernels for float, float16 and double: ``SimplifiedLayerNormalization`` (RMSNorm, at every
opset; ONNX has no op of that name) and ``LayerNormalization`` below opset 17 (ONNX defines it
from 17 on, with the same semantics). onnxruntime's transformers optimizer writes both, and so
does ``fuse-norm`` for target ``onnxruntime``, which then needs no opset change. Their
com.microsoft spellings have no kernel.

``onnx.checker`` knows neither, so a model that uses them fails it with "No Op registered".
:func:`checkable` moves exactly those nodes, for the length of a check, into a domain of their
own (which the checker treats like any contrib domain: names, types and edges checked, the op
itself opaque); every other node is checked as usual.
"""

from __future__ import annotations

__all__ = ["CHECK_DOMAIN", "ONNX_DOMAIN_OPS", "checkable", "is_onnx_domain_contrib"]

import contextlib
from collections.abc import Iterator

import onnx_ir as ir

# Op -> the first default-domain opset at which ONNX itself defines it (None: never).
ONNX_DOMAIN_OPS: dict[str, int | None] = {
    "SimplifiedLayerNormalization": None,
    "LayerNormalization": 17,
}

# Where :func:`checkable` puts those nodes while ``onnx.checker`` looks at the model.
CHECK_DOMAIN = "normfold.onnxruntime_onnx_domain"


def is_onnx_domain_contrib(node: ir.Node, opset: int) -> bool:
    """Whether ``node`` is one of onnxruntime's ONNX-domain contrib ops at default-domain ``opset``."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_DOMAIN_OPS:
        return False
    since = ONNX_DOMAIN_OPS[node.op_type]
    return since is None or opset < since


def _default_opset(imports: dict[str, int]) -> int:
    return imports.get("", imports.get("ai.onnx", 1))


@contextlib.contextmanager
def checkable(model: ir.Model) -> Iterator[bool]:
    """Within the block, ``model``'s ONNX-domain contrib nodes are in :data:`CHECK_DOMAIN`.

    Yields whether there were any. Node domains and opset imports are restored on exit.
    """
    owners: list[ir.Model | ir.Function] = [model, *model.functions.values()]
    moved: list[ir.Node] = []
    imported: list[dict[str, int]] = []
    try:
        for owner in owners:
            imports = owner.opset_imports
            opset = _default_opset(imports)
            nodes = [
                node
                for node in ir.traversal.RecursiveGraphIterator(owner.graph if isinstance(owner, ir.Model) else owner)
                if is_onnx_domain_contrib(node, opset)
            ]
            for node in nodes:
                node.domain = CHECK_DOMAIN
                moved.append(node)
            if nodes and CHECK_DOMAIN not in imports:
                imports[CHECK_DOMAIN] = 1
                imported.append(imports)
        yield bool(moved)
    finally:
        for node in moved:
            node.domain = ""
        for imports in imported:
            del imports[CHECK_DOMAIN]
