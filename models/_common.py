"""What every zoo builder shares: seeding, non-trivial normalization parameters, packaging.

A freshly constructed ``BatchNorm`` has mean 0, variance 1, weight 1 and bias 0, so folding it
wrongly (or dropping it) changes nothing; a ``LayerNorm`` with weight 1 and bias 0 hides a
swapped scale and shift. :func:`randomize_norms` gives every normalization random statistics
(variance in [0.5, 2]) and affine parameters (some scales negative), so a wrong rewrite shows.
"""

from __future__ import annotations

__all__ = ["finish", "randomize_norms", "seeded"]

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from normfold.models import ZooModel

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block and restore the caller's state afterwards.

    Module constructors draw their initial weights from the global generator, so building under
    this context makes a model a pure function of ``seed`` without disturbing the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_norms(module: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> None:
    """Give every normalization in ``module`` random statistics and affine parameters.

    ``extra`` names hand-written normalization modules (with ``weight`` and optional ``bias``
    parameters) to treat the same way. Draws from torch's global generator: call it under
    :func:`seeded`.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                sub.running_mean.uniform_(-1.0, 1.0)
                sub.running_var.uniform_(0.5, 2.0)
            if not isinstance(sub, _NORMS + extra):
                continue
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor):
                sign = torch.where(torch.rand_like(weight) < 0.2, -1.0, 1.0)
                weight.copy_(torch.empty_like(weight).uniform_(0.5, 1.5) * sign)
            bias = getattr(sub, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.uniform_(-0.5, 0.5)


def finish(
    name: str,
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, dict[int, str]],
) -> ZooModel:
    """Package a built module: eval mode, inputs in ``forward`` order, symbolic axes by name.

    ``inputs`` maps each forward argument's name to its example tensor; ``outputs`` maps each
    output's name to its symbolic axes. An input's symbolic axes are "batch" on axis 0 and, for
    2-D integer inputs (token ids, masks), "seq" on axis 1.
    """
    module.eval()
    axes: dict[str, dict[int, str]] = {}
    for input_name, tensor in inputs.items():
        axes[input_name] = {0: "batch"}
        if tensor.dim() == 2 and not tensor.is_floating_point():
            axes[input_name][1] = "seq"
    axes.update({output: dict(dims) for output, dims in outputs.items()})
    return ZooModel(
        name=name,
        module=module,
        example_inputs=tuple(inputs.values()),
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        dynamic_axes=axes,
    )
