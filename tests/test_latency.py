"""Batch-1 onnxruntime latency: rounds with their spread, and several models timed in turn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfold.latency import measure, measure_interleaved
from normfold.torch.layer_collapse.cost import onnx_of


def _linear(width: int) -> tuple:
    x = torch.randn(1, width)
    model = onnx_of(nn.Sequential(nn.Linear(width, width), nn.Linear(width, width)), (x,))
    return model, {model.graph.input[0].name: x.numpy()}


def test_models_timed_in_turn_each_get_their_rounds_and_keep_their_order():
    small, large = _linear(4), _linear(768)
    timings = measure_interleaved([small, large], runs=5, repeats=3, warmup=2)
    assert [len(t.rounds) for t in timings] == [3, 3]
    for timing in timings:
        q1, q3 = timing.quartiles
        assert 0 < q1 <= timing.median <= q3
    assert timings[1].median > timings[0].median  # 2 x 768² MACs against 2 x 4²
    assert len(measure(*small, runs=5, repeats=4, warmup=1).rounds) == 4


def test_a_measurement_needs_a_round_of_a_run():
    with pytest.raises(ValueError, match="at least one round"):
        measure_interleaved([_linear(4)], runs=0)
