"""TLC layer collapse on torch modules; the entry point is ``normfold.torch.collapse`` (a function).

``collapse(model, calibration, evaluate=..., example_inputs=...)`` returns a
:class:`CollapseResult` (``model``, ``report``, ``history``). The modules, one job each:
:mod:`.graph` (sites and refusals, pad-first), :mod:`.linearize` (activations become per-channel
affine maps), :mod:`.rewrite` (exact merges on the fx graph, verified), :mod:`.calibrate`
(statistics and the loss probe), :mod:`.cost` (params, MACs, latency), :mod:`.report`, and
:mod:`.driver` (the loop). The arithmetic is torch-free, in :mod:`normfold.math`.
"""

from __future__ import annotations

__all__ = [
    "ChannelAffine",
    "CollapseResult",
    "CollapseStep",
    "Collapsed",
    "Merge",
    "MergeResult",
    "collapse",
    "format_report",
    "merge_layers",
]

from normfold.torch.layer_collapse.driver import collapse
from normfold.torch.layer_collapse.linearize import ChannelAffine
from normfold.torch.layer_collapse.report import CollapseResult, CollapseStep, Collapsed, format_report
from normfold.torch.layer_collapse.rewrite import Merge, MergeResult, merge_layers
