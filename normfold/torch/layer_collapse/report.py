"""What a collapse run did: one :class:`CollapseStep` per step, and the JSON report.

Decision (e), what "removed" counts: both, because they differ. ``activations_removed`` counts
linearized activation sites; ``layers_merged`` counts Conv/Linear layers that disappeared into a
neighbour (a removed activation between two 3×3 convs whose merge would cost more is not
removed at all, see ``max_flops_growth``; one removal can merge two layers when a residual
block collapses). Every row also carries parameters, MACs per sample and batch-1 CPU latency of
the merged model and of the linearized-but-unmerged one: linearizing without merging adds
elementwise work and is slower than the dense model, merging is where depth turns into speed.
"""

from __future__ import annotations

__all__ = ["CollapseResult", "CollapseStep", "format_report"]

import dataclasses
from typing import Any

from torch import nn


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
    latency_ms: float | None
    latency_ms_unmerged: float | None
    merges: list[dict[str, Any]]
    refused: list[dict[str, str]]
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

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
    header = ("step", "removed", "acc", "acts", "layers", "MACs", "ms", "ms unmerged", "merges")
    dense = report["dense"]
    rows = [header, ("dense", "-", f"{dense['accuracy']:.4f}", "0", "0", _count(dense["macs_merged"]),
                     _ms(dense.get("latency_ms_merged")), _ms(dense.get("latency_ms")), "")]
    for step in report["steps"]:
        kinds = ", ".join(m["kind"] for m in step["merges"] if m["kind"] != "fold")
        rows.append((
            str(step["step"]) + ("" if step["accepted"] else " (undone)"),
            step["site"], f"{step['accuracy']:.4f}", str(step["activations_removed"]),
            str(step["layers_merged"]), _count(step["macs"]), _ms(step["latency_ms"]),
            _ms(step["latency_ms_unmerged"]), kinds,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"stopped: {report['stopped']}")
    return "\n".join(lines)


def _count(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
