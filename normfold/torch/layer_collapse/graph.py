"""Collapse candidates in a torch.fx graph, and the ones that cannot merge, with the reason.

A *site* is one call of an activation (a module called twice is two sites): ``nn.ReLU``,
``nn.ReLU6``, ``nn.Hardtanh(0, U)``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.GELU``, ``nn.SiLU``
(exactly those classes), and ``F.relu``/``torch.relu``/``.relu()``, ``F.relu6``,
``F.leaky_relu``, ``F.gelu``, ``F.silu``.

Removing a site buys depth only if the linear layers on both sides can merge. :func:`refusal`
walks from the site through the ops merging sees through (BatchNorm, linearized activations,
Identity, Dropout) and refuses, with the reason:

1. an input that does not come from a Conv, Linear or residual Add (a MaxPool, another
   nonlinear op, the model input);
2. a reader that is a MaxPool or another nonlinear op; a Mul by another computed tensor
   (gating, squeeze-excitation); a matmul, softmax or attention call; a concat (with a
   nonlinear branch, or of linear ones: merging across a concat is not supported); the model
   output.

What structure allows, cost may still forbid: the driver asks the merge engine
(:mod:`.rewrite`), which refuses merges that grow the work by more than ``max_flops_growth``.

Decision (a), an activation after a residual Add: its input is ``BN(branch) + shortcut``, so
the branch BatchNorm does not describe it (the shortcut shifts the mean; measured, the branch
BN calls channels "off" that are mostly on). Such sites are always scored in empirical mode, from
the statistics of the sum over the calibration set; channels are then linearized or pruned like
any other (a pruned channel of the sum is its mean, for both branches at once).

:func:`pad_first` moves a conv's zero padding to the head of the linear conv chain that feeds
it, so the chain merges exactly (see :mod:`normfold.math.conv_merge`).
"""

from __future__ import annotations

__all__ = [
    "Activation",
    "activation_of",
    "channel_axis",
    "describe",
    "is_conv",
    "is_elementwise_linear",
    "is_linear",
    "module_of",
    "pad_first",
    "padding_of",
    "readers_of",
    "refusal",
    "sites",
    "source_of",
    "why_no_merge",
]

import copy
import dataclasses
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from normfold.math.padding import symmetric, torch_conv_pads
from normfold.torch.layer_collapse.linearize import ChannelAffine

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ATTENTION_FUNCTIONS = {
    torch.matmul, torch.bmm, torch.einsum, torch.softmax, F.softmax, operator.matmul,
    F.scaled_dot_product_attention,
}
_ATTENTION_MODULES = (nn.MultiheadAttention, nn.Softmax)
_MULS = {operator.mul, torch.mul, operator.truediv}
_ADDS = {operator.add, torch.add}
_CATS = {torch.cat, torch.concat, torch.stack}


@dataclasses.dataclass(frozen=True)
class Activation:
    """What a site computes: ``kind`` (see :data:`normfold.math.collapse_scores.ACTIVATIONS`) and its constants."""

    kind: str
    negative_slope: np.ndarray | float = 0.0
    upper: float = 6.0


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def activation_of(gm: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The activation ``node`` calls, or None when it is not a site."""
    module = module_of(gm, node)
    if module is not None:
        kind = type(module)
        if kind is nn.ReLU:
            return Activation("relu")
        if kind is nn.ReLU6:
            return Activation("relu6")
        if kind is nn.Hardtanh and module.min_val == 0.0 and module.max_val > 0.0:
            return Activation("relu6", upper=float(module.max_val))
        if kind is nn.LeakyReLU:
            return Activation("leaky_relu", negative_slope=float(module.negative_slope))
        if kind is nn.PReLU:
            return Activation("prelu", negative_slope=module.weight.detach().double().cpu().numpy())
        if kind is nn.GELU:
            return Activation("gelu")
        if kind is nn.SiLU:
            return Activation("silu")
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return Activation("relu")
        if node.target is F.relu6:
            return Activation("relu6")
        if node.target is F.leaky_relu:
            return Activation("leaky_relu", negative_slope=float(_arg(node, 1, "negative_slope", 0.01)))
        if node.target is F.gelu:
            return Activation("gelu")
        if node.target is F.silu:
            return Activation("silu")
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return Activation("relu")
    return None


def sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Every activation site of ``gm``, in graph order."""
    return [node for node in gm.graph.nodes if activation_of(gm, node) is not None]


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of exactly Conv1d/2d/3d with zero padding given as numbers (or 'valid')."""
    module = module_of(gm, node)
    return (
        type(module) in _CONVS
        and module.padding_mode == "zeros"
        and (not isinstance(module.padding, str) or module.padding == "valid")
    )


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return type(module_of(gm, node)) is nn.Linear


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    return type(module) in _BATCHNORMS and module.running_mean is not None


def is_elementwise_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops merging sees through: eval BatchNorm, linearized activations, Identity, Dropout."""
    module = module_of(gm, node)
    return is_batchnorm(gm, node) or type(module) in (ChannelAffine, *_PASSTHROUGH)


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return "alpha" not in node.kwargs and all(isinstance(a, fx.Node) for a in node.args[:2])
    return node.op == "call_method" and node.target == "add" and all(isinstance(a, fx.Node) for a in node.args[:2])


def is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
    return False


def is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if type(module) is nn.Flatten:
        return module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    return node.op == "call_method" and node.target == "flatten" and _arg(node, 1, "start_dim", 0) == 1


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a node is named in reasons: ``MaxPool2d features.3`` or ``add add_1``."""
    module = module_of(gm, node)
    if module is not None:
        # Modules normfold made (merged layers, linearized sites) are named after their node.
        generated = node.target.startswith(("collapsed_", "linearized_"))
        return f"{type(module).__name__} {node.name if generated else node.target}"
    if node.op == "placeholder":
        return f"the model input {node.name}"
    if node.op == "output":
        return "the model output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} {node.name}"


def source_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The first node before ``node`` (itself included) that merging does not see through."""
    while is_elementwise_linear(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def readers_of(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The readers of ``node``, looking through the ops merging sees through."""
    found: list[fx.Node] = []
    for user in node.users:
        found.extend(readers_of(gm, user) if is_elementwise_linear(gm, user) else [user])
    return found


def _nonlinear_origin(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """A nonlinear op ``node`` is computed from (looking back through linear ops), or None."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen or current.op == "placeholder":
            continue
        seen.add(current)
        if activation_of(gm, current) is not None:
            return current
        linear = (
            is_conv(gm, current) or is_linear(gm, current) or is_elementwise_linear(gm, current)
            or is_add(current) or is_global_pool(gm, current) or is_flatten(gm, current)
        )
        if not linear:
            return current
        stack.extend(a for a in current.args if isinstance(a, fx.Node))
    return None


def refusal(gm: fx.GraphModule, site: fx.Node) -> str | None:
    """Why removing ``site`` can merge nothing, judged from the graph's structure; None if it may."""
    source = source_of(gm, site.args[0]) if site.args else None
    if source is None or not (is_conv(gm, source) or is_linear(gm, source) or is_add(source)):
        what = describe(gm, source) if source is not None else "nothing"
        return f"its input comes from {what}, not from a Conv, Linear or residual Add: nothing to merge it into"
    reasons = [r for r in (_reader_refusal(gm, site, reader) for reader in readers_of(gm, site)) if r]
    # Name the most telling reader when there are several (attention before its reshapes).
    return min(reasons, key=lambda r: [r.startswith(p) for p in _PRIORITY].index(True)) if reasons else None


_PRIORITY = ("attention", "gating", "concat", "")
_RESHAPES = {"transpose", "permute", "view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze"}


def _reader_refusal(gm: fx.GraphModule, site: fx.Node, reader: fx.Node) -> str | None:
    if is_conv(gm, reader) or is_linear(gm, reader) or is_add(reader):
        return None
    if is_global_pool(gm, reader) or is_flatten(gm, reader):
        onward = readers_of(gm, reader)
        if onward and all(is_linear(gm, n) or is_flatten(gm, n) for n in onward):
            return None
        return f"{describe(gm, reader)} is followed by {describe(gm, onward[0]) if onward else 'nothing'}, not a Linear"
    module = module_of(gm, reader)
    if reader.op == "output":
        return "it feeds the model output: there is no layer after it to merge"
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) or reader.target in (
        F.max_pool1d, F.max_pool2d, F.max_pool3d
    ):
        return f"{describe(gm, reader)} (nonlinear) lies between it and the next layer"
    if reader.op == "call_function" and reader.target in _MULS:
        other = next((a for a in reader.args if isinstance(a, fx.Node) and a is not site), None)
        if other is not None:
            return (f"gating: {describe(gm, reader)} multiplies it by {describe(gm, other)}, "
                    "which depends on the input (SE-style)")
    attention_call = reader.op == "call_function" and reader.target in _ATTENTION_FUNCTIONS
    if isinstance(module, _ATTENTION_MODULES) or attention_call:
        return f"attention: it feeds {describe(gm, reader)}"
    if reader.op == "call_function" and reader.target in _CATS:
        for branch in reader.args[0]:
            origin = _nonlinear_origin(gm, branch) if isinstance(branch, fx.Node) and branch is not site else None
            if origin is not None and origin is not site:
                return f"concat: {describe(gm, reader)} joins it with a nonlinear branch ({describe(gm, origin)})"
        return f"concat: merging across {describe(gm, reader)} is not supported"
    if reader.op in ("call_method", "call_function") and getattr(reader.target, "__name__", reader.target) in _RESHAPES:
        onward = [r for r in (_reader_refusal(gm, reader, n) for n in reader.users) if r]
        attention = [r for r in onward if r.startswith("attention")]
        if attention:
            return attention[0]
    if activation_of(gm, reader) is not None:
        return f"it feeds another activation ({describe(gm, reader)}) directly"
    return f"it feeds {describe(gm, reader)}, which merging cannot see through"


def why_no_merge(gm: fx.GraphModule, site: fx.Node) -> str:
    """Why a linearized ``site`` merged no layers although its neighbours are layers."""
    readers = readers_of(gm, site)
    source = source_of(gm, site.args[0])
    if len(readers) > 1:
        names = ", ".join(describe(gm, r) for r in readers)
        return f"its output is read by {len(readers)} ops ({names}): a layer merges into one reader only"
    if is_add(source):
        return (f"its input is the residual {describe(gm, source)}: a block merges only once its branch "
                "is one linear layer")
    if readers and is_add(readers[0]):
        return (f"it feeds the residual {describe(gm, readers[0])}: a block merges only once its branch "
                "is one linear layer")
    if len(source.users) > 1:
        return f"{describe(gm, source)} is also read by other ops: merging it would change what they read"
    return "removing it merges no layers: the layers on its two sides are not joined by linear ops only"


def channel_axis(gm: fx.GraphModule, site: fx.Node, rank: int) -> int:
    """The channel axis of a site's input: 1 after a Conv or BatchNorm, the last after a Linear."""
    node = site.args[0]
    seen: set[fx.Node] = set()
    while isinstance(node, fx.Node) and node not in seen:
        seen.add(node)
        if is_conv(gm, node) or is_batchnorm(gm, node):
            return 1
        if is_linear(gm, node):
            return rank - 1
        module = module_of(gm, node)
        if isinstance(module, ChannelAffine):
            return module.axis % rank
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return 1


def batchnorm_before(gm: fx.GraphModule, site: fx.Node) -> nn.Module | None:
    """The eval BatchNorm feeding ``site`` directly (its only reader), for BN-mode scores."""
    source = site.args[0] if site.args else None
    if isinstance(source, fx.Node) and is_batchnorm(gm, source) and len(source.users) == 1:
        return module_of(gm, source)
    return None


def pad_first(gm: fx.GraphModule, conv: fx.Node) -> str | None:
    """Move ``conv``'s padding to the head of the linear conv chain that feeds it.

    The chain is followed back through single-reader convs and the ops merging sees through.
    Each conv's padding ``p`` becomes ``p_head_side + s·p`` one level up, so the head is padded
    by ``p_k + s_k·(… + s_1·p_0)`` and the rest are unpadded: the composition then merges
    exactly, and differs from the original model only near the border. Returns why it cannot
    (nothing to move, the chain crosses an Add), or None when done. Modules called at several
    sites are copied first.
    """
    chain = [conv]
    node = conv
    while True:
        source = source_of(gm, node.args[0])
        if not is_conv(gm, source) or len(source.users) != 1 or not _single_path(gm, source, node):
            break
        chain.append(source)
        node = source
    if len(chain) == 1:
        source = source_of(gm, conv.args[0])
        return f"its input comes from {describe(gm, source)}, not from a conv its padding could move to"
    carried = None
    for index, member in enumerate(chain):
        module = _own_module(gm, member)
        own = padding_of(module)  # is_conv refuses 'same': never None here
        if carried is None:
            carried = own
        else:
            carried = tuple(p + s * c for p, s, c in zip(own, module.stride, carried))
        if index < len(chain) - 1:
            module.padding = (0,) * len(own)
        else:
            module.padding = carried
    gm.recompile()
    return None


def _single_path(gm: fx.GraphModule, source: fx.Node, target: fx.Node) -> bool:
    node = source
    while node is not target:
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
        if node is not target and not is_elementwise_linear(gm, node):
            return False
    return True


def padding_of(module: nn.Module) -> tuple[int, ...] | None:
    """A Conv module's zero padding per spatial axis (the rule of :mod:`normfold.math.padding`),
    None when its two ends differ (``'same'`` with an even kernel)."""
    return symmetric(torch_conv_pads(module.padding, module.kernel_size, module.dilation))


def _own_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module ``node`` calls, copied under a new name when another node calls it too."""
    callers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    if len(callers) == 1:
        return gm.get_submodule(node.target)
    name = f"{node.target.replace('.', '_')}_{node.name}"
    gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)))
    node.target = name
    return gm.get_submodule(name)
