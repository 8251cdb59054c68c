"""Replace one activation call with its per-channel linear plan (TLC step 2).

An activation site becomes a :class:`ChannelAffine` module computing ``slope·y + offset`` per
channel (the plan of :func:`normfold.math.collapse_scores.channel_plan`): slope 1 for linearized
channels, 0 (a constant) for pruned ReLU channels, the negative slope for LeakyReLU/PReLU.

Decision (d), pruned channels during fine-tuning: ``slope`` and ``offset`` are *buffers*, fixed
when the site is removed, not parameters. The constant of a pruned channel is the mean of the
activation's output (so the replacement is unbiased), and the next layer's bias, which fine-tuning
does train, absorbs any further constant shift exactly away from zero-padded borders; a learnable
constant would add a parameter that merging deletes again and nothing the bias cannot learn.

The site keeps its torch.fx node name (an ``F.relu`` call is turned into a module call in place),
so a checkpoint can name the sites it removed and replay them on a fresh trace.
"""

from __future__ import annotations

__all__ = ["ChannelAffine", "linearize_site"]

import numpy as np
import torch
from torch import fx, nn

from normfold.math.collapse_scores import ChannelPlan


class ChannelAffine(nn.Module):
    """``y ↦ slope·y + offset`` along ``axis`` (per channel); what a removed activation became."""

    def __init__(self, slope: torch.Tensor, offset: torch.Tensor, axis: int, source: str = "") -> None:
        super().__init__()
        self.register_buffer("slope", slope.detach().clone())
        self.register_buffer("offset", offset.detach().clone())
        self.axis = axis
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return x * self.slope.view(shape) + self.offset.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.slope.numel()}, axis={self.axis}, source={self.source!r}"


def linearize_site(
    gm: fx.GraphModule, node_name: str, plan: ChannelPlan, axis: int, *, source: str, like: torch.Tensor
) -> str:
    """Make node ``node_name`` of ``gm`` call a new :class:`ChannelAffine`; returns its module name.

    ``like`` gives the dtype and device of the buffers (a parameter of the model).
    """
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    name = _fresh(gm, f"linearized_{node_name}")
    module = ChannelAffine(
        torch.as_tensor(np.asarray(plan.slope), dtype=like.dtype, device=like.device),
        torch.as_tensor(np.asarray(plan.offset), dtype=like.dtype, device=like.device),
        axis,
        source,
    )
    gm.add_submodule(name, module)
    source_value = node.args[0] if node.args else node.kwargs["input"]
    node.op, node.target, node.args, node.kwargs = "call_module", name, (source_value,), {}
    gm.recompile()
    return name


def _fresh(gm: fx.GraphModule, stem: str) -> str:
    existing = dict(gm.named_modules())
    name, index = stem, 1
    while name in existing or hasattr(gm, name):
        name, index = f"{stem}_{index}", index + 1
    return name
