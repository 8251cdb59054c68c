"""What a model costs: parameters, multiply-accumulates per sample, batch-1 CPU latency.

MACs count the Conv and Linear calls of a traced module (``C_out · C_in/g · prod(k)`` per output
position of a conv, ``in · out`` per row of a Linear), from the shapes of one run on a single
sample; elementwise ops are not counted. Latency is the median of ``repeats`` timed runs on one
sample after ``warmup`` runs, in inference mode, with torch's current thread settings.
"""

from __future__ import annotations

__all__ = ["latency_ms", "macs", "parameters"]

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from normfold.torch.layer_collapse.graph import is_conv, is_linear, module_of
from normfold.torch.layer_collapse.rewrite import record_shapes, shape_of


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of the Conv and Linear calls of ``gm`` per sample of ``inputs``."""
    single = tuple(x[:1] for x in inputs)
    record_shapes(gm, single)
    total = 0
    for node in gm.graph.nodes:
        if is_conv(gm, node):
            module = module_of(gm, node)
            per_position = module.weight.numel()
            total += per_position * int(np.prod(shape_of(node)[2:]))
        elif is_linear(gm, node):
            module = module_of(gm, node)
            rows = int(np.prod(shape_of(node)[1:-1]))
            total += module.weight.numel() * rows
    return total


def latency_ms(module: nn.Module, inputs: Sequence[torch.Tensor], *, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of one forward pass on the first sample of ``inputs``."""
    single = tuple(x[:1] for x in inputs)
    was_training = module.training
    module.eval()
    timings = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            module(*single)
            if index >= warmup:
                timings.append(time.perf_counter() - start)
    module.train(was_training)
    return statistics.median(timings) * 1e3
