"""normfold against the tools users would pick instead, on the zoo, in one run.

    python -m benchmarks.run [--models resnet,bert] [--variants ts17-keepbn,dynamo18]
                             [--tools normfold,onnxsim] [--repeat 3] [--json results.json]

Each tool runs in its own process per (model, variant), ``--repeat`` times (min and median wall
time; peak RSS of the process from ``wait4``). Each output is then checked the way normfold
checks its own: onnxruntime with optimizations off on the input and on the output, same inputs;
an output that differs beyond float32 tolerance is *wrong*, one that does not load or run
*fails*. Per tool it prints BatchNorms left, fused normalization ops, nodes after, wrong/failed
outputs, and wall time and peak memory as ratios to normfold's.

Needs the benchmark extra: ``pip install -e ".[bench]"`` (onnxsim, onnxslim, onnxoptimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from normfold.errors import NormfoldError

FUSED_NORM_OPS = (
    "LayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "com.microsoft::SimplifiedLayerNormalization",
    "com.microsoft::SkipLayerNormalization",
    "com.microsoft::SkipSimplifiedLayerNormalization",
    "com.microsoft::GroupNorm",
    "com.microsoft::LayerNormalization",
)
DEFAULT_MODELS = ("resnet", "mobilenetv2", "vgg", "convnext", "bert", "llama", "unet")
DEFAULT_VARIANTS = ("ts17-keepbn", "ts13-keepbn", "dynamo18")
DEFAULT_TOOLS = (
    "normfold", "normfold-ort", "onnxscript", "onnxscript-ort", "ort-basic", "ort-extended",
    "onnxsim", "onnxslim", "onnxoptimizer",
)


@dataclass
class Row:
    model: str
    variant: str
    tool: str
    status: str  # ok | wrong | fails | error
    detail: str = ""
    bn_before: int = 0
    bn_after: int = 0
    fused_norms: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    max_rel_error: float | None = None
    seconds_min: float | None = None
    seconds_median: float | None = None
    peak_rss_mb: float | None = None
    ops_after: dict[str, int] = field(default_factory=dict)


def _ops(path: Path) -> Counter[str]:
    model = onnx.load(path, load_external_data=False)
    return Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )


def _run_tool(tool: str, source: Path, out: Path, repeat: int) -> tuple[list[float], float, str | None]:
    """Wall seconds per repeat, peak RSS in MB, and the tool's error if it failed."""
    times, peak = [], 0.0
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.tools", tool, str(source), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
            text=True,
        )
        stdout = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak = max(peak, usage.ru_maxrss / 1024)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": f"exit {process.returncode}, no result"}
        if "error" in result:
            return times, peak, result["error"]
        times.append(result["seconds"])
    return times, peak, None


def _check(source: Path, out: Path) -> tuple[str, float | None, str]:
    from normfold.verification import verify

    try:
        report = verify(source, out, samples=2)
    except NormfoldError as error:
        return "fails", None, str(error)
    if report.passed:
        return "ok", report.max_rel_error, ""
    problems = [f"{name}: {c.problem or 'values'}" for name, c in report.outputs.items() if not c.passed]
    return "wrong", report.max_rel_error, "; ".join(problems)[:120]


def bench(models, variants, tools, repeat: int, folder: Path) -> list[Row]:
    from normfold.models.export import cached_export

    rows: list[Row] = []
    for model in models:
        for variant in variants:
            try:
                source = cached_export(model, variant)
            except NormfoldError as error:
                print(f"skip {model}/{variant}: {error}", file=sys.stderr)
                continue
            before = _ops(source)
            for tool in tools:
                out = folder / f"{model}-{variant}-{tool}.onnx"
                print(f"{model:<12} {variant:<14} {tool}", file=sys.stderr)
                times, peak, error = _run_tool(tool, source, out, repeat)
                row = Row(model, variant, tool, "error", bn_before=before["BatchNormalization"],
                          nodes_before=sum(before.values()), peak_rss_mb=round(peak, 1))
                if error is None and out.exists():
                    after = _ops(out)
                    row.status, row.max_rel_error, row.detail = _check(source, out)
                    row.bn_after = after["BatchNormalization"]
                    row.fused_norms = sum(after[op] for op in FUSED_NORM_OPS)
                    row.nodes_after = sum(after.values())
                    row.ops_after = dict(after.most_common())
                    row.seconds_min, row.seconds_median = min(times), statistics.median(times)
                else:
                    row.detail = error or "no output written"
                rows.append(row)
    return rows


def summarize(rows: list[Row], tools) -> str:
    """One line per tool over all (model, variant) pairs, with time and memory relative to normfold."""
    def total(tool: str, attribute: str) -> float:
        return sum(getattr(r, attribute) or 0 for r in rows if r.tool == tool)

    base_time, base_rss = total("normfold", "seconds_min") or 1.0, total("normfold", "peak_rss_mb") or 1.0
    header = f"{'tool':<20}{'BN left':>8}{'fused norms':>13}{'nodes after':>13}{'wrong':>7}{'fails':>7}{'time ×':>9}{'RSS ×':>8}"
    lines = [header, "-" * len(header)]
    for tool in tools:
        mine = [r for r in rows if r.tool == tool]
        if not mine:
            continue
        runs = [r for r in mine if r.status in ("ok", "wrong")]
        lines.append(
            f"{tool:<20}{sum(r.bn_after for r in runs):>8}{sum(r.fused_norms for r in runs):>13}"
            f"{sum(r.nodes_after for r in runs):>13}{sum(r.status == 'wrong' for r in mine):>7}"
            f"{sum(r.status in ('fails', 'error') for r in mine):>7}"
            f"{total(tool, 'seconds_min') / base_time:>9.2f}{total(tool, 'peak_rss_mb') / base_rss:>8.2f}"
        )
    bn_total = sum(r.bn_before for r in rows if r.tool == tools[0])
    lines.append(f"(over {len({(r.model, r.variant) for r in rows})} exports holding {bn_total} BatchNorms; "
                 "time and RSS summed over them, as ratios to normfold)")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    lines = [f"{'model':<12}{'variant':<14}{'tool':<20}{'status':<7}{'BN':>7}{'norms':>6}{'nodes':>11}{'max rel':>10}{'s':>7}  detail"]
    for r in rows:
        rel = f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else "-"
        sec = f"{r.seconds_min:.2f}" if r.seconds_min is not None else "-"
        lines.append(
            f"{r.model:<12}{r.variant:<14}{r.tool:<20}{r.status:<7}{f'{r.bn_before}>{r.bn_after}':>7}"
            f"{r.fused_norms:>6}{f'{r.nodes_before}>{r.nodes_after}':>11}{rel:>10}{sec:>7}  {r.detail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(prefix="normfold-bench-") as folder:
        rows = bench(args.models.split(","), args.variants.split(","), tools, args.repeat, Path(folder))
    print(details(rows))
    print()
    print(summarize(rows, tools))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
