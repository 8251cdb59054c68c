"""What a model costs: parameters, multiply-accumulates per sample, batch-1 onnxruntime latency.

MACs count the Conv and Linear calls of a traced module (``C_out · C_in/g · prod(k)`` per output
position of a conv, ``in · out`` per row of a Linear), from the shapes of one run on a single
sample; elementwise ops are not counted. Latency is the model exported to ONNX (TorchScript
exporter, float32) and timed in onnxruntime by :func:`normfold.latency.measure`: what a deployed
model costs, as a median with its spread (eager torch timings of these small models are noise).
"""

from __future__ import annotations

__all__ = ["macs", "onnx_of", "ort_latencies", "ort_latency", "parameters"]

import copy
import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import fx, nn

from normfold.latency import Timing, measure_interleaved

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


def onnx_of(module: nn.Module, inputs: Sequence[torch.Tensor]) -> onnx.ModelProto:
    """``module`` exported by torch's TorchScript exporter, in memory (opset 17)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), tuple(inputs), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def ort_latency(module: nn.Module, inputs: Sequence[torch.Tensor], *, runs: int = 50, repeats: int = 5) -> Timing:
    """Batch-1 onnxruntime CPU latency (one thread) of ``module`` on the first sample of ``inputs``."""
    (timing,) = ort_latencies([module], inputs, runs=runs, repeats=repeats)
    return timing


def ort_latencies(
    modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor], *, runs: int = 50, repeats: int = 5
) -> list[Timing]:
    """:func:`ort_latency` of each module, their rounds taken in turn (the same load for all)."""
    single = tuple((x[:1].float() if x.is_floating_point() else x[:1]) for x in inputs)
    models = []
    for module in modules:
        model = onnx_of(copy.deepcopy(module).float(), single)
        names = [i.name for i in model.graph.input]
        models.append((model, {name: x.detach().cpu().numpy() for name, x in zip(names, single)}))
    return measure_interleaved(models, runs=runs, repeats=repeats)
