"""normfold against the tools users would pick instead, on the zoo, in one run.

    python -m benchmarks.run [--models resnet,bert] [--variants ts13-keepbn,dynamo23]
                             [--tools normfold,onnxsim] [--repeat 1] [--json results.json]

Defaults: the seven zoo models, exported three ways -- ``ts13-keepbn`` (every BatchNorm a
node, LayerNorm decomposed), ``ts13-inputs`` (the same with every weight also a graph input, as
old exporters wrote) and ``dynamo23`` (torch.export at opset 23, the one opset where
onnxscript's ``onnx_fusions`` acts) -- and the eleven tools of :data:`DEFAULT_TOOLS`, once
each: 5 to 8 minutes on 2 shared cores. ``ts17-keepbn``, ``dynamo18`` and the zoo's other
variants can be named with ``--variants``. An export that onnxruntime cannot run itself is
skipped with the reason (today: LLaMA ``dynamo23``, whose RotaryEmbedding-23 nodes get cos/sin
caches of batch 1, which onnxruntime rejects at batch 2).

Each tool runs in its own process per (model, variant), ``--repeat`` times (min and median wall
time; peak RSS of the tool's process, its ``VmHWM``). Each output is then judged the way normfold
checks its own: onnxruntime with optimizations off on the input and on the output, same inputs.
An output that onnxruntime cannot load or run *fails* (as does a tool that raises); one whose
outputs differ beyond float32 tolerance is *wrong*; one whose graph inputs or outputs changed
name, type or order changed the *interface* (dropping an initializer-input counts: a user may
feed it).

Per tool the summary gives BatchNorms folded and left (normfold refuses every one it leaves,
with a reason in its report), branches merged (multi-branch sums -- RepVGG, MobileOne, ACNet,
DBB -- that became one op: sums with two or more Conv/BN/AvgPool/identity branches of one
tensor, at least one a Conv, counted before and after), fused normalization ops in the outputs -- standard ONNX
(LayerNormalization-17, RMSNormalization-23, GroupNormalization-21) and onnxruntime-only
(com.microsoft ops, or a standard op name below the opset that defines it, which only
onnxruntime runs) -- wrong outputs, interface changes, failures, nodes after, and wall time
and peak memory as ratios to normfold's.

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
    "com.microsoft::SkipGroupNorm",
    "com.microsoft::LayerNormalization",
    "com.microsoft::EmbedLayerNormalization",
    # onnxruntime writes its own ops in the ONNX domain too; no ONNX opset defines this one.
    "SimplifiedLayerNormalization",
)
DEFAULT_MODELS = (
    "resnet", "mobilenetv2", "vgg", "convnext", "bert", "llama", "unet", "t5", "gemma", "yolo", "dit",
    "repvgg", "mobileone", "levit",
)
DEFAULT_VARIANTS = ("ts13-keepbn", "ts13-inputs", "dynamo23")
DEFAULT_TOOLS = (
    "normfold", "normfold-ort", "onnxscript", "onnxscript-fusions", "onnxscript-ort", "ort-basic",
    "ort-extended", "ort-transformers", "onnxsim", "onnxslim", "onnxoptimizer",
)
# Export variants beyond the zoo's own: torch.export at opset 23 for onnx_fusions.
EXTRA_VARIANTS = {"dynamo23": ("dynamo", 23)}


@dataclass
class Row:
    model: str
    variant: str
    tool: str
    status: str  # ok | wrong | interface | fails
    detail: str = ""
    bn_before: int = 0
    bn_after: int = 0
    sums_before: int = 0
    sums_after: int = 0
    fused_norms: int = 0
    standard_norms: int = 0
    runtime_norms: int = 0
    norms_before: int = 0
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


def _norms(path: Path) -> tuple[int, int]:
    """Fused normalization ops: (standard ONNX, onnxruntime-only)."""
    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    standard = runtime = 0
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if key not in FUSED_NORM_OPS:
            continue
        if node.domain in ("", "ai.onnx") and onnx.defs.has(node.op_type, opset):
            standard += 1
        else:
            runtime += 1
    return standard, runtime


def branch_sums(path: Path) -> int:
    """Multi-branch sums in the graph: Add/Sum trees (inner results read once) with two or more
    leaves that are Conv, AveragePool, BatchNormalization-of-x or ``x`` itself for one ``x``, at
    least one a Conv -- what ``fold-branches`` merges when their geometry allows."""
    graph = onnx.load(path, load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}

    def is_sum(name: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type in ("Add", "Sum") and node.domain in ("", "ai.onnx")

    def leaves(node: onnx.NodeProto) -> list[str]:
        found = []
        for name in node.input:
            if is_sum(name) and uses[name] == 1 and name not in outputs:
                found += leaves(producer[name])
            else:
                found.append(name)
        return found

    def source(name: str) -> tuple[str, bool]:
        node = producer.get(name)
        if node is not None and node.op_type == "BatchNormalization":
            name, node = node.input[0], producer.get(node.input[0])
            if node is None or node.op_type not in ("Conv", "AveragePool"):
                return name, False
        if node is not None and node.op_type in ("Conv", "AveragePool"):
            return node.input[0], node.op_type == "Conv"
        return name, False

    count = 0
    for node in graph.node:
        if node.op_type not in ("Add", "Sum") or node.domain not in ("", "ai.onnx"):
            continue
        out = node.output[0]
        if uses[out] == 1 and out not in outputs and any(
            is_sum(o) for user in readers.get(out, []) for o in user.output
        ):
            continue  # an inner node of a larger sum
        groups: dict[str, list[bool]] = {}
        for leaf in leaves(node):
            tensor, conv = source(leaf)
            groups.setdefault(tensor, []).append(conv)
        count += any(len(convs) > 1 and any(convs) for convs in groups.values())
    return count


def interface_changes(source: Path, out: Path) -> list[str]:
    """How ``out``'s graph inputs and outputs differ from ``source``'s: names, element types, and
    the order of the outputs. Initializer-inputs count: a user may feed them, so dropping one
    changes the interface (which ``verify`` deliberately tolerates)."""
    def signature(path: Path) -> tuple[dict[str, int], list[tuple[str, int]]]:
        graph = onnx.load(path, load_external_data=False).graph
        return ({v.name: v.type.tensor_type.elem_type for v in graph.input},
                [(v.name, v.type.tensor_type.elem_type) for v in graph.output])

    (inputs, outputs), (new_inputs, new_outputs) = signature(source), signature(out)
    changes = []
    if dropped := [name for name in inputs if name not in new_inputs]:
        changes.append(f"dropped {len(dropped)} input(s): {', '.join(dropped[:4])}")
    if added := [name for name in new_inputs if name not in inputs]:
        changes.append(f"added {len(added)} input(s): {', '.join(added[:4])}")
    if retyped := [name for name in inputs if name in new_inputs and inputs[name] != new_inputs[name]]:
        changes.append(f"input type changed: {', '.join(retyped[:4])}")
    if outputs != new_outputs:
        changes.append(f"outputs {[n for n, _ in outputs]} became {[n for n, _ in new_outputs]}"
                       if [n for n, _ in outputs] != [n for n, _ in new_outputs] else "output types changed")
    return changes


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
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": f"exit {process.returncode}, no result"}
        # The tool's own VmHWM; wait4's ru_maxrss also holds the parent's, inherited across fork.
        peak = max(peak, result.get("peak_rss_mb") or usage.ru_maxrss / 1024)
        if "error" in result:
            return times, peak, result["error"]
        times.append(result["seconds"])
    return times, peak, None


def _check(source: Path, out: Path) -> tuple[str, float | None, str]:
    """(status, max relative error, detail): fails, then wrong, then interface, else ok."""
    from normfold.verification import verify

    try:
        report = verify(source, out, samples=2)
    except NormfoldError as error:
        return "fails", None, str(error)[:120]
    run_problems = [p.split(": ", 1)[-1] for p in report.problems if "fails to" in p]
    if run_problems:
        return "fails", None, run_problems[0][:120]
    missing = "missing from the candidate's outputs"
    wrong = [f"{name}: {c.problem}" for name, c in report.outputs.items() if not c.passed and c.problem != missing]
    if wrong:
        return "wrong", report.max_rel_error, "; ".join(wrong)[:120]
    changes = interface_changes(source, out)
    if changes or not report.passed:
        return "interface", report.max_rel_error, "; ".join(changes or report.problems)[:120]
    return "ok", report.max_rel_error, ""


def _reference_problem(source: Path) -> str | None:
    """Why onnxruntime cannot run the export on the inputs verification would use, if it cannot."""
    from normfold import io, runtime
    from normfold.inputs import generate_inputs

    try:
        runtime.run(source, generate_inputs(io.load(source)))
    except Exception as error:  # onnxruntime raises its own untyped errors
        return str(error).splitlines()[0][-200:]
    return None


def _export(model: str, variant: str) -> Path:
    from normfold.models.export import ExportVariant, cached_export

    if variant in EXTRA_VARIANTS:
        exporter, opset = EXTRA_VARIANTS[variant]
        return cached_export(model, ExportVariant(variant, exporter, opset))
    return cached_export(model, variant)


def bench(models, variants, tools, repeat: int, folder: Path) -> list[Row]:
    rows: list[Row] = []
    for model in models:
        for variant in variants:
            try:
                source = _export(model, variant)
            except NormfoldError as error:
                print(f"skip {model}/{variant}: {error}", file=sys.stderr)
                continue
            problem = _reference_problem(source)
            if problem:
                print(f"skip {model}/{variant}: the export itself does not run: {problem}", file=sys.stderr)
                continue
            before = _ops(source)
            norms_before = sum(_norms(source))
            sums_before = branch_sums(source)
            for tool in tools:
                out = folder / f"{model}-{variant}-{tool}.onnx"
                print(f"{model:<12} {variant:<14} {tool}", file=sys.stderr)
                times, peak, error = _run_tool(tool, source, out, repeat)
                row = Row(model, variant, tool, "fails", bn_before=before["BatchNormalization"],
                          sums_before=sums_before,
                          nodes_before=sum(before.values()), norms_before=norms_before, peak_rss_mb=round(peak, 1))
                if error is None and out.exists():
                    after = _ops(out)
                    row.status, row.max_rel_error, row.detail = _check(source, out)
                    row.bn_after = after["BatchNormalization"]
                    row.sums_after = branch_sums(out)
                    row.fused_norms = sum(after[op] for op in FUSED_NORM_OPS)
                    row.standard_norms, row.runtime_norms = _norms(out)
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
    header = (f"{'tool':<20}{'BN folded':>10}{'BN left':>8}{'branches merged':>16}{'sums left':>10}"
              f"{'norms std':>10}{'norms ORT':>10}{'wrong':>7}"
              f"{'iface':>7}{'fails':>7}{'nodes after':>13}{'time x':>8}{'RSS x':>7}")
    lines = [header, "-" * len(header)]
    for tool in tools:
        mine = [r for r in rows if r.tool == tool]
        if not mine:
            continue
        # Counts over the outputs that run; a failed one has nothing to count.
        runs = [r for r in mine if r.status != "fails"]
        count = {status: sum(r.status == status for r in mine) for status in ("wrong", "interface", "fails")}
        lines.append(
            f"{tool:<20}{sum(r.bn_before - r.bn_after for r in runs):>10}{sum(r.bn_after for r in runs):>8}"
            f"{sum(r.sums_before - r.sums_after for r in runs):>16}{sum(r.sums_after for r in runs):>10}"
            f"{sum(r.standard_norms for r in runs):>10}{sum(r.runtime_norms for r in runs):>10}"
            f"{count['wrong']:>7}{count['interface']:>7}{count['fails']:>7}{sum(r.nodes_after for r in runs):>13}"
            f"{total(tool, 'seconds_min') / base_time:>8.2f}{total(tool, 'peak_rss_mb') / base_rss:>7.2f}"
        )
    first = [r for r in rows if r.tool == tools[0]]
    lines.append(
        f"(over {len(first)} exports holding {sum(r.bn_before for r in first)} BatchNorms, "
        f"{sum(r.sums_before for r in first)} multi-branch sums, "
        f"{sum(r.norms_before for r in first)} fused norm ops and {sum(r.nodes_before for r in first)} nodes; "
        "BN and node counts over the outputs that run; time and RSS summed, as ratios to normfold)"
    )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    lines = [f"{'model':<12}{'variant':<14}{'tool':<20}{'status':<10}{'BN':>7}{'norms':>7}{'nodes':>11}{'max rel':>10}{'s':>7}  detail"]
    for r in rows:
        rel = f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else "-"
        sec = f"{r.seconds_min:.2f}" if r.seconds_min is not None else "-"
        lines.append(
            f"{r.model:<12}{r.variant:<14}{r.tool:<20}{r.status:<10}{f'{r.bn_before}>{r.bn_after}':>7}"
            f"{f'{r.standard_norms}+{r.runtime_norms}':>7}{f'{r.nodes_before}>{r.nodes_after}':>11}{rel:>10}{sec:>7}  {r.detail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    parser.add_argument("--repeat", type=int, default=1)
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
