"""Calibration data: batches, activation statistics (empirical mode), and the loss probe.

``calibration`` is an iterable of input batches (a tensor) or of ``(input, target)`` pairs; a
model with several inputs takes ``((x1, x2, ...), target)``, with ``target`` None when there is
none (a bare 2-tuple of tensors is read as input and target). It is read once into a list, then
reused for every step.

Decision (c), how much data the probe uses: ranking candidates on one batch is noise (measured
on a reference implementation, a one-batch probe reorders the candidates against the full
calibration set). The probe runs every candidate on the same first ``probe_samples`` samples
(default 512; all of them when the set is smaller), batch by batch, so two candidates are
compared on paired per-batch losses and the driver knows the noise of a difference.

The loss: ``loss_fn(output, target)`` when given; else cross-entropy for integer targets and
mean-squared error for floating ones; without targets, the mean-squared deviation from the dense
model's outputs.
"""

from __future__ import annotations

__all__ = [
    "Batch", "LossFn", "activation_statistics", "default_loss", "make_batches", "output_means", "probe_losses",
]

import dataclasses
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from normfold.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0])


def make_batches(calibration: Iterable[Any], probe_samples: int | None) -> tuple[list[Batch], list[Batch]]:
    """All calibration batches, and the leading ones that hold ``probe_samples`` samples."""
    batches: list[Batch] = []
    for item in calibration:
        if isinstance(item, torch.Tensor):
            batches.append(Batch((item,)))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and (item[1] is None or torch.is_tensor(item[1])):
            inputs = item[0] if isinstance(item[0], (tuple, list)) else (item[0],)
            batches.append(Batch(tuple(inputs), item[1]))
        elif isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
            batches.append(Batch(tuple(item)))
        else:
            raise InputError(
                f"calibration items must be input tensors or (input, target) pairs, not {type(item).__name__}"
            )
    if not batches:
        raise InputError("the calibration set is empty")
    probe, seen = [], 0
    for batch in batches:
        if probe_samples is not None and seen >= probe_samples:
            break
        probe.append(batch)
        seen += batch.size
    return batches, probe


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode without gradients, then give it back its training mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def activation_statistics(
    gm: fx.GraphModule, batches: Sequence[Batch], axes: dict[str, int]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per site (node name -> channel axis): mean and std of its input, mean of its output."""
    sums: dict[str, list[torch.Tensor]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.name not in axes:
                return super().run_node(n)
            axis = axes[n.name]
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != axis]
            # Read the input before the call: an in-place activation overwrites it.
            moments = [x.sum(dims), (x * x).sum(dims)]
            result = super().run_node(n)
            count = torch.tensor(x.numel() / x.shape[axis], dtype=torch.float64)
            moments += [result.detach().double().sum(dims), count]
            previous = sums.get(n.name)
            sums[n.name] = moments if previous is None else [p + m for p, m in zip(previous, moments)]
            return result

    with _evaluating(gm):
        for batch in batches:
            _Recorder(gm).run(*batch.inputs)
    result = {}
    for name, (total, squares, output, count) in sums.items():
        mean = total / count
        variance = torch.clamp(squares / count - mean * mean, min=0.0)
        result[name] = (mean.numpy(), variance.sqrt().numpy(), (output / count).numpy())
    return result


def output_means(gm: fx.GraphModule, batches: Sequence[Batch], names: set[str]) -> dict[str, np.ndarray]:
    """Per node in ``names``: the mean of its output over ``batches``, per channel (axis 1)."""
    sums: dict[str, tuple[torch.Tensor, int]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in names:
                x = result.detach().double()
                dims = [d for d in range(x.dim()) if d != 1]
                total, count = sums.get(n.name, (0.0, 0))
                sums[n.name] = (total + x.sum(dims), count + x.numel() // x.shape[1])
            return result

    with _evaluating(gm):
        for batch in batches:
            _Recorder(gm).run(*batch.inputs)
    return {name: (total / count).numpy() for name, (total, count) in sums.items()}


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not target.is_floating_point():
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def probe_losses(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn | None, references: Sequence[torch.Tensor] | None
) -> np.ndarray:
    """The loss of ``model`` on each probe batch (``references``: dense outputs, when no targets)."""
    losses = []
    with _evaluating(model):
        for index, batch in enumerate(batches):
            output = model(*batch.inputs)
            if batch.target is not None:
                loss = (loss_fn or default_loss)(output, batch.target)
            else:
                loss = (loss_fn or F.mse_loss)(output, references[index])
            losses.append(float(loss))
    return np.asarray(losses, dtype=np.float64)
