"""normfold on billion-parameter models: speed and memory against the file's own read and write.

    python -m benchmarks.scale [--models llama-1b,bert-base,llama-150m] [--tools normfold,onnx-ir,...]
                               [--repeat 3] [--latency-runs 5] [--layers 2,8,32,128]
                               [--memory-limit-gb 18] [--timeout 600] [--json scale.json]

Three parts, one run:

1. **Tools on large models.** ``llama-1b`` is the zoo's LLaMA at Llama-3.2-1B's shape with a
   32000-word vocabulary (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192: 1.1 B
   parameters, 4.4 GB of float32 weights in one external data file), ``bert-base`` the zoo's
   BERT at BERT-base's shape (12 layers, hidden 768, vocab 30522: 0.11 B parameters, one
   file). Both are exported by torch's dynamo exporter at opset 18 (``--variant``) in a child
   process and cached in the zoo cache (:func:`normfold.models.export.cached_export`; the
   LLaMA takes about 1.5 minutes and 5 GB to build once; the export is killed above
   ``--memory-limit-gb``, as a tool is). ``llama-150m`` is the everyday-speed benchmark's
   150 M LLaMA (TorchScript, opset 17), handed to the tools with its weights moved to one
   external data file (an onnx_ir load + save, not timed). Each tool of
   :mod:`benchmarks.tools` runs in its own process ``--repeat`` times, one process at a time,
   round-robin (every tool once per round), after ``os.sync()`` so no run pays for the
   previous one's writes: the table shows the min
   and median of the time the tool reports (imports included, interpreter start excluded),
   the peak RSS of the process (its own ``VmHWM``), both as ratios to ``onnx_ir`` load + save of the
   same model, and what the tool did to the graph. A run that goes over ``--memory-limit-gb``
   of resident memory (or over what the machine has available less 2 GB; polled every 50 ms)
   or ``--timeout`` seconds is killed and recorded as failed with the reason, as is a tool
   that raises.
2. **Latency of each output.** Batch 1 (sequence 32 for the LLaMA, 128 for BERT), in
   onnxruntime's CPU provider with graph optimizations off (``ORT_DISABLE_ALL``; weights
   pre-packed as usual) and on (``ORT_ENABLE_ALL``), ``--threads`` intra-op threads, the
   fastest of ``--latency-runs`` runs after one warm-up (the least disturbed by other work on
   a shared machine), each model in its own process. ``max rel`` is each output's largest
   error against the input's (optimizations off, same inputs), relative to the largest
   magnitude of that output.
3. **Layer scaling.** ``normfold optimize --no-verify`` on the zoo's LLaMA and BERT builders
   at ``--layers`` layers (hidden 32, so the time is about node count), for each of
   ``--scaling-variants``, each size in its own process, the fastest of ``--repeat`` runs:
   nodes, seconds spent in the passes (load, check and save excluded) and microseconds per
   node, which stays flat when the passes are linear.

Needs the benchmark extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

__all__ = ["LARGE_MODELS", "LargeModel", "main"]

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.speed import CASES as SPEED_CASES
from benchmarks.speed import byte_compile_normfold

ROOT = Path(__file__).resolve().parent.parent

@dataclasses.dataclass(frozen=True)
class LargeModel:
    """A zoo model at a large size: its size parameters, the sequence length its latency is
    timed at, its export variant (None: ``--variant``), and whether the benchmark hands the tools
    a copy with every weight in one external data file (an export small enough to be one file)."""

    zoo: str
    size: dict[str, Any]
    seq: int
    variant: str | None = None
    external: bool = False


LARGE_MODELS: dict[str, LargeModel] = {
    "llama-1b": LargeModel(
        "llama", {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000}, 32
    ),
    "bert-base": LargeModel("bert", {"layers": 12, "hidden": 768, "heads": 12, "vocab": 30522}, 128),
    # The everyday-speed benchmark's 150 M LLaMA (TorchScript, opset 17), weights moved to a data file.
    "llama-150m": LargeModel(SPEED_CASES["llama-150m"][0], SPEED_CASES["llama-150m"][2], 32,
                             variant=SPEED_CASES["llama-150m"][1], external=True),
}
BASELINE = "onnx-ir"
DEFAULT_TOOLS = (
    "onnx-ir", "normfold", "onnx", "onnxscript", "onnxscript-ort", "ort-basic", "onnxsim", "onnxslim",
)
FUSED_NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                  "com.microsoft::SkipLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization")
_MB = 1024 * 1024


@dataclasses.dataclass
class ToolRow:
    model: str
    tool: str
    status: str = "ok"  # ok | failed
    detail: str = ""
    seconds: list[float] = dataclasses.field(default_factory=list)
    peak_rss_mb: float = 0.0
    nodes_after: int | None = None
    fused_norms: int | None = None
    files: int | None = None
    latency_off_ms: float | None = None
    latency_on_ms: float | None = None
    max_rel_error: float | None = None
    latency_detail: str = ""

    @property
    def seconds_min(self) -> float | None:
        return min(self.seconds) if self.seconds else None

    @property
    def seconds_median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


# --- running a child under limits ------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def run_limited(command: list[str], *, memory_limit_mb: float, timeout: float) -> tuple[str, float, str | None]:
    """Run ``command`` (stdout captured); returns stdout, the child's peak RSS in MB (``wait4``)
    and why it was killed (None if it was not): over ``memory_limit_mb`` resident (or over what
    the machine has available less 2 GB, when that is less: other work must not be pushed out),
    or running longer than ``timeout`` seconds."""
    memory_limit_mb = min(memory_limit_mb, _available_mb() - 2048)
    # No RLIMIT_AS: onnx_ir maps the whole external data file for every tensor it reads, so a
    # tool that reads a few dozen small tensors of a 4 GB file reserves 100+ GB of address space
    # while using 0.2 GB; an address-space cap fails it for nothing. The resident size counts.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    killed, start = None, time.perf_counter()
    while True:
        # wait4, not Popen.poll: the child must be reaped here to get its resource usage.
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if killed is None and _rss_mb(process.pid) > memory_limit_mb:
            killed = f"killed: over {memory_limit_mb / 1024:.0f} GB resident after {time.perf_counter() - start:.0f} s"
        elif killed is None and time.perf_counter() - start > timeout:
            killed = f"killed: still running after {timeout:.0f} s"
        if killed:
            process.kill()
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return "".join(chunks), usage.ru_maxrss / 1024, killed


# --- building the models -----------------------------------------------------------------


def build(name: str, variant: str, args: argparse.Namespace) -> Path:
    """The cached export of large model ``name`` (exported in a child process on first use,
    killed above ``--memory-limit-gb`` resident, or what the machine has available less 2 GB,
    so that an export too large for the machine fails alone instead of pushing out other work)."""
    spec = LARGE_MODELS[name]
    variant = spec.variant or variant
    code = (
        "import json; from normfold.models.export import cached_export\n"
        f"try: print(json.dumps({{'path': str(cached_export({spec.zoo!r}, {variant!r}, **{spec.size!r}))}}))\n"
        "except Exception as error: print(json.dumps({'error': f'{type(error).__name__}: {error}'.splitlines()[0]}))"
    )
    print(f"building {name} ({variant}; cached after the first run)", file=sys.stderr)
    stdout, _, killed = run_limited([sys.executable, "-c", code], memory_limit_mb=args.memory_limit_gb * 1024,
                                    timeout=args.build_timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": killed or "no result"}
    if killed or "path" not in result:
        raise RuntimeError(f"cannot build {name}: {killed or result['error']}")
    return Path(result["path"])


def with_external_data(source: Path, folder: Path, args: argparse.Namespace) -> Path:
    """A copy of ``source`` in ``folder`` with every weight in one data file next to it
    (``<name>.onnx.data``), written by onnx_ir in a child process (not timed; this process
    stays small, so the tools it starts do not inherit its peak memory)."""
    copy = folder / f"{source.stem}-external.onnx"
    code = (
        "import onnx_ir as ir; "
        f"ir.save(ir.load({str(source)!r}), {str(copy)!r}, external_data={copy.name + '.data'!r}); print('{{}}')"
    )
    stdout, _, killed = run_limited([sys.executable, "-c", code], memory_limit_mb=args.memory_limit_gb * 1024,
                                    timeout=args.timeout)
    if killed or not stdout.strip():
        raise RuntimeError(f"cannot write {copy}: {killed or 'onnx_ir failed'}")
    return copy


# --- part 1: tools --------------------------------------------------------------------------


def _graph_summary(path: Path) -> tuple[int, int]:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)
    return sum(ops.values()), sum(ops[op] for op in FUSED_NORM_OPS)


def _remove_outputs(out: Path) -> None:
    for file in out.parent.glob(out.name + "*"):
        file.unlink()
    for file in out.parent.glob(out.stem + ".data"):
        file.unlink()


def run_tool(row: ToolRow, source: Path, out: Path, args: argparse.Namespace) -> bool:
    """Run ``row.tool`` once on ``source`` after ``os.sync()``; add its time and peak to
    ``row``, or mark it failed. Returns whether it succeeded (its output is left in place)."""
    _remove_outputs(out)
    os.sync()  # the previous run's dirty pages are written back before this one starts
    stdout, peak, killed = run_limited(
        [sys.executable, "-m", "benchmarks.tools", row.tool, str(source), str(out)],
        memory_limit_mb=args.memory_limit_gb * 1024, timeout=args.timeout,
    )
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": killed or "no result"}
    # The tool's own high-water mark: wait4's starts from this process's (fork and exec
    # keep it), so it would show this harness's memory for every tool below it.
    row.peak_rss_mb = max(row.peak_rss_mb, round(result.get("peak_rss_mb") or peak, 1))
    if killed or "error" in result:
        row.status, row.detail = "failed", killed or result["error"]
        return False
    if not out.exists():
        row.status, row.detail = "failed", "no output written"
        return False
    row.seconds.append(result["seconds"])
    row.nodes_after, row.fused_norms = _graph_summary(out)
    row.files = len(list(out.parent.glob(out.name + "*"))) + len(list(out.parent.glob(out.stem + ".data")))
    return True


# --- part 2: latency ------------------------------------------------------------------------


def _latency_child(model: str, feeds_path: str, outputs_path: str, runs: int, threads: int) -> None:
    """In a child process: median ms with optimizations off and on; the off outputs to a file."""
    import numpy as np

    from normfold.runtime import session

    feeds = dict(np.load(feeds_path))
    result: dict[str, Any] = {}
    for optimized in (False, True):
        sess = session(model, optimize=optimized, threads=threads, prepack=True, spinning=True)
        outputs = sess.run(None, feeds)  # warm-up
        if not optimized:
            names = [o.name for o in sess.get_outputs()]
            np.savez(outputs_path, **dict(zip(names, outputs)))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - start) * 1000)
        # The minimum: on a machine shared with other work, the least disturbed run.
        result["on" if optimized else "off"] = min(times)
        del sess
    print(json.dumps(result))


def _max_rel(reference: dict[str, Any], candidate: dict[str, Any]) -> float:
    import numpy as np

    worst = 0.0
    for name, ref in reference.items():
        if name not in candidate or candidate[name].shape != ref.shape:
            return float("inf")
        r, c = ref.astype(np.float64), candidate[name].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(c - r)) / max(float(np.max(np.abs(r))), 1e-30)))
    return worst


def time_latency(path: Path, feeds: Path, folder: Path, args: argparse.Namespace) -> tuple[dict[str, float] | None, Path, str]:
    outputs = folder / f"{path.stem}-outputs.npz"
    code = (f"from benchmarks.scale import _latency_child; _latency_child({str(path)!r}, {str(feeds)!r}, "
            f"{str(outputs)!r}, {args.latency_runs}, {args.threads})")
    stdout, _, killed = run_limited([sys.executable, "-c", code], memory_limit_mb=args.memory_limit_gb * 1024,
                                    timeout=args.timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if killed or not lines:
        return None, outputs, killed or "onnxruntime cannot load or run it"
    return json.loads(lines[-1]), outputs, ""


def bench_model(model: str, source: Path, tools: list[str], folder: Path, args: argparse.Namespace) -> list[ToolRow]:
    import numpy as np

    import normfold.io
    from normfold.inputs import generate_inputs

    feeds = folder / "feeds.npz"
    rows: list[ToolRow] = []
    reference = None
    if not args.no_latency:
        dims = {"batch": 1, "seq": LARGE_MODELS[model].seq}
        np.savez(feeds, **generate_inputs(normfold.io.load(source, check=False), dims=dims, seed=0))
        print(f"{model:<10} input: latency", file=sys.stderr)
        timing, outputs, problem = time_latency(source, feeds, folder, args)
        nodes, norms = _graph_summary(source)
        rows.append(ToolRow(model, "input", nodes_after=nodes, fused_norms=norms,
                            latency_off_ms=timing and timing["off"], latency_on_ms=timing and timing["on"],
                            latency_detail=problem))
        reference = dict(np.load(outputs)) if timing else None
    timed = [ToolRow(model, tool) for tool in tools]
    # Round-robin: every tool once per round, so load that comes and goes on a shared machine
    # falls on all of them alike. One output on disk at a time; the last round's is timed for
    # latency before it goes.
    for round_ in range(args.repeat):
        for row in timed:
            if row.status != "ok":
                continue
            out = folder / f"{model}-{row.tool}.onnx"
            print(f"{model:<10} {row.tool} (run {round_ + 1} of {args.repeat})", file=sys.stderr)
            if run_tool(row, source, out, args) and round_ == args.repeat - 1 and not args.no_latency:
                timing, outputs, row.latency_detail = time_latency(out, feeds, folder, args)
                if timing:
                    row.latency_off_ms, row.latency_on_ms = timing["off"], timing["on"]
                    if reference is not None:
                        row.max_rel_error = _max_rel(reference, dict(np.load(outputs)))
            _remove_outputs(out)
    rows += timed
    return rows


# --- part 3: layer scaling ------------------------------------------------------------------


def _scaling_child(name: str, variant: str, layers: int, repeat: int) -> None:
    """In a child process: export (cached), then the fastest of ``repeat`` optimize runs."""
    import normfold
    from normfold.models.export import cached_export

    path = cached_export(name, variant, layers=layers)
    best: dict[str, Any] | None = None
    for _ in range(repeat):
        start = time.perf_counter()
        report = normfold.optimize(path, verify=False).report
        total = time.perf_counter() - start
        passes = sum(v for k, v in report["seconds"].items() if k not in ("load", "check", "save"))
        if best is None or passes < best["passes_seconds"]:
            best = {"model": name, "variant": variant, "layers": layers, "nodes": report["nodes_before"],
                    "nodes_after": report["nodes_after"], "passes_seconds": passes, "total_seconds": total,
                    "steps": report["seconds"]}
    print(json.dumps(best))


def layer_scaling(models: list[str], variants: list[str], layers: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        for variant in variants:
            for count in layers:
                print(f"scaling {name} {variant} {count} layers", file=sys.stderr)
                code = f"from benchmarks.scale import _scaling_child; _scaling_child({name!r}, {variant!r}, {count}, {args.repeat})"
                stdout, _, killed = run_limited([sys.executable, "-c", code], memory_limit_mb=args.memory_limit_gb * 1024,
                                                timeout=args.timeout * (args.repeat + 1))
                lines = [line for line in stdout.splitlines() if line.startswith("{")]
                if killed or not lines:
                    print(f"  failed: {killed or 'no result'}", file=sys.stderr)
                    continue
                row = json.loads(lines[-1])
                row["us_per_node"] = 1e6 * row["passes_seconds"] / row["nodes"]
                rows.append(row)
    return rows


# --- printing -------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def _fmt(value: float | None, digits: str = ".2f") -> str:
    return format(value, digits) if value is not None else "-"


def tools_table(rows: list[ToolRow]) -> str:
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        base = next((r for r in mine if r.tool == BASELINE and r.status == "ok"), None)
        base_s, base_rss = (base.seconds_min, base.peak_rss_mb) if base else (None, None)
        header = ("| tool | min s | median s | × onnx_ir | peak RSS GB | × onnx_ir | nodes | fused norms | files "
                  "| latency off ms | latency on ms | max rel | note |")
        lines += [f"## {model}", "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            timed = r.tool != "input"
            rel = f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else "-"
            note = "; ".join(x for x in (r.detail, r.latency_detail) if x)
            lines.append(
                f"| {r.tool} | {_fmt(r.seconds_min) if timed else ''} | {_fmt(r.seconds_median) if timed else ''} "
                f"| {_ratio(r.seconds_min, base_s) if timed else ''} "
                f"| {_fmt(r.peak_rss_mb / 1024) if timed and r.peak_rss_mb else ''} "
                f"| {_ratio(r.peak_rss_mb, base_rss) if timed else ''} | {r.nodes_after if r.nodes_after is not None else '-'} "
                f"| {r.fused_norms if r.fused_norms is not None else '-'} | {r.files or ''} "
                f"| {_fmt(r.latency_off_ms, '.1f')} | {_fmt(r.latency_on_ms, '.1f')} | {rel} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | layers | nodes | passes s | µs / node | total s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['layers']} | {r['nodes']} | {r['passes_seconds']:.2f} "
                     f"| {r['us_per_node']:.0f} | {r['total_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(LARGE_MODELS))
    parser.add_argument("--variant", default="dynamo18")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for latency")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--layers", default="2,8,32,128", help="layer counts for the scaling curve ('' skips it)")
    parser.add_argument("--scaling-models", default="llama,bert")
    parser.add_argument("--scaling-variants", default="ts13-keepbn,dynamo18")
    parser.add_argument("--memory-limit-gb", type=float, default=18.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per tool run")
    parser.add_argument("--build-timeout", type=float, default=3600.0, help="seconds for exporting one model")
    parser.add_argument("--workdir", help="folder for the tools' outputs (default: the system's temporary folder)")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args(argv)

    tool_rows: list[ToolRow] = []
    scaling: list[dict[str, Any]] = []

    def save_json() -> None:
        if args.json:
            data = {"tools": [dict(dataclasses.asdict(r), seconds_min=r.seconds_min, seconds_median=r.seconds_median)
                              for r in tool_rows], "scaling": scaling}
            Path(args.json).write_text(json.dumps(data, indent=2))

    models = [m for m in args.models.split(",") if m]
    byte_compile_normfold()  # timed as installed, like the tools it is compared with
    with tempfile.TemporaryDirectory(prefix="normfold-scale-", dir=args.workdir) as folder:
        for model in models:
            source = build(model, args.variant, args)
            if LARGE_MODELS[model].external:
                source = with_external_data(source, Path(folder), args)
            tool_rows += bench_model(model, source, args.tools.split(","), Path(folder), args)
            save_json()
    if tool_rows:
        print(tools_table(tool_rows), flush=True)
    layers = [int(n) for n in args.layers.split(",") if n]
    if layers:
        scaling = layer_scaling(args.scaling_models.split(","), args.scaling_variants.split(","), layers, args)
        save_json()
        print(scaling_table(scaling))
    return 0

if __name__ == "__main__":
    sys.exit(main())
