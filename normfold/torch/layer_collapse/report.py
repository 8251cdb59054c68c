"""What a collapse run did: one :class:`CollapseStep` per step, and the JSON report.

Decision (e), what "removed" counts: both, because they differ. ``activations_removed`` counts
linearized activation sites; ``layers_merged`` counts Conv/Linear layers that disappeared into a
neighbour (a removed activation between two 3×3 convs whose merge would cost more is not
removed at all, see ``max_flops_growth``; one removal can merge two layers when a residual
block collapses). Every row also carries parameters, MACs per sample and the merged model's
batch-1 onnxruntime latency as a median with its inter-quartile range over the measuring rounds
(``latency``; never one bare number), and the segments the step merged with their cost before
and after.

:class:`Collapsed` is what ``result.model`` is: a plain ``nn.Module`` around the merged
torch.fx GraphModule. torch's TorchScript ONNX exporter takes any module with a ``graph``
attribute for a ScriptModule, so a bare GraphModule fails there once ``dynamic_axes`` is given
("'Graph' object has no attribute 'outputs'"); wrapped, both exporters take it.
"""

from __future__ import annotations

__all__ = ["CollapseResult", "CollapseStep", "Collapsed", "format_report"]

import dataclasses
from typing import Any

import torch
from torch import fx, nn


class Collapsed(nn.Module):
    """A collapsed model: runs ``graph_module``, the merged torch.fx graph (see the module docstring)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args: torch.Tensor) -> Any:
        return self.graph_module(*args)


@dataclasses.dataclass
class CollapseStep:
    """One removal: the site, its channels, the model's quality and cost after it."""

    step: int
    site: str
    kind: str
    mode: str  # "bn" or "empirical": where the channel statistics came from
    score: float
    channels: dict[str, int]
    probe_loss: float | None
    pad_first: bool
    accuracy: float
    accepted: bool
    activations_removed: int
    layers_merged: int
    params: int
    macs: int
    macs_unmerged: int
    latency_ms: float | None  # the median of ``latency``
    merges: list[dict[str, Any]]
    refused: list[dict[str, str]]
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    sites: list[str] = dataclasses.field(default_factory=list)  # every site removed in this step
    candidates: list[str] = dataclasses.field(default_factory=list)  # the removals chosen together
    latency: dict[str, float] | None = None  # median_ms, q1_ms, q3_ms, iqr_ms, rounds
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The joint choice checked on the whole model before fine-tuning: one row per choice measured.
    fit: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The latency over the BN-folded dense model's, timed round for round in turn (same load).
    latency_ratio: dict[str, float] | None = None
    # ``finetune`` calls the step got: 1, more with recovery rounds, 0 without a callback.
    finetune_rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(dataclasses.replace(self, model=None))
        del row["model"]
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> CollapseStep:
        return cls(**row)


@dataclasses.dataclass
class CollapseResult:
    """The shallower model (merges done, eval mode), the report, and every step."""

    model: nn.Module
    report: dict[str, Any]
    history: list[CollapseStep]


def format_report(report: dict[str, Any]) -> str:
    """A table for people: one row for the dense model, one per step."""
    header = ("step", "removed", "acc", "acts", "layers", "MACs", "ORT ms (IQR)", "merges")
    dense = report["dense"]
    rows = [header, ("dense", "-", f"{dense['accuracy']:.4f}", "0", "0", _count(dense["macs_merged"]),
                     _ms(dense.get("latency_merged")), "")]
    for step in report["steps"]:
        kinds = sorted({m["kind"] for m in step["merges"] if m["kind"] != "fold"})
        rows.append((
            str(step["step"]) + ("" if step["accepted"] else " (undone)"),
            ", ".join(step.get("candidates") or [step["site"]]), f"{step['accuracy']:.4f}",
            str(step["activations_removed"]), str(step["layers_merged"]), _count(step["macs"]),
            _ms(step.get("latency")), ", ".join(kinds),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"stopped: {report['stopped']}")
    return "\n".join(lines)


def _count(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"


def _ms(timing: dict[str, float] | None) -> str:
    """A latency as median with its inter-quartile range: ``0.123 (±0.004)``."""
    return "-" if timing is None else f"{timing['median_ms']:.3f} (IQR {timing['iqr_ms']:.3f})"
