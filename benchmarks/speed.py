"""The everyday run: normfold against the simplifiers, whole processes, start-up included.

    python -m benchmarks.speed [--cases resnet,mobilenetv2,bert-small,resnet34,bert-base,llama-150m]
                               [--runs 5] [--json speed.json]

An export pipeline runs its optimizer on every model, every time, so what counts is the wall
time of the whole command a user types, interpreter start-up and imports included. Each tool
runs as its own command in its own process, with its defaults:

- ``onnxslim IN OUT`` and ``onnxsim IN OUT`` (what their console scripts run, with this
  interpreter; neither checks its output by default);
- ``normfold optimize IN -o OUT --no-verify -q`` (compared with onnxslim, the fastest
  simplifier) and ``normfold optimize IN -o OUT -q`` with its default verification (three
  random samples through onnxruntime, compared with onnxsim).

Cases are zoo exports (:func:`normfold.models.export.cached_export`, exported in a child
process before any timing): the zoo's default sizes of ResNet, MobileNetV2 and BERT (small),
and the latency benchmark's medium models (:data:`benchmarks.latency.CASES`: ResNet-34 at
224x224 with its BatchNorms kept, BERT-base, a 150 M LLaMA). One run of the benchmark times
every tool on every case ``--runs`` times, round-robin (case by case, each round runs every
tool once), so load from other processes on a shared machine falls on all tools alike; the
page cache is flushed to disk (``os.sync()``) before each command, so no run pays for the
previous one's writeback. The table gives each tool's median and min wall seconds, its median
CPU seconds (user + system, ``wait4``: less sensitive than wall time to other processes on a
busy machine), its peak resident memory (``wait4``; the harness itself imports nothing heavy,
so the child's high-water mark is its own), and the ratio of normfold's median to its peer's.

normfold's modules are byte-compiled before any timing, as ``pip install`` does for every
package it installs (onnxslim's and onnxsim's included): from a checkout with
``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile normfold's ~100 modules
from source again (about 0.1 s), which no installed normfold pays.
"""

from __future__ import annotations

__all__ = ["CASES", "TOOLS", "main"]

import argparse
import compileall
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 900

# (zoo model, variant, size parameters); the medium ones are the latency benchmark's cases.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "resnet": ("resnet", "ts13-keepbn", {}),
    "mobilenetv2": ("mobilenetv2", "ts13-keepbn", {}),
    "bert-small": ("bert", "ts14", {}),
    "resnet34": ("resnet", "ts13-keepbn", {"width": 64, "blocks": (3, 4, 6, 3), "image": 224, "classes": 1000}),
    "bert-base": ("bert", "ts14", {"layers": 12, "hidden": 768, "heads": 12, "vocab": 30522}),
    "llama-150m": ("llama", "ts17", {"layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "vocab": 32000}),
}


def _script(entry_point: str, name: str) -> list[str]:
    """What the tool's console script ``MODULE:FUNCTION`` (as its pyproject names it) runs, with
    this interpreter."""
    module, function = entry_point.split(":")
    return [sys.executable, "-c",
            f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; sys.exit({function}())"]


# Each tool: the command for (IN, OUT). normfold's rows name the peer they are compared with.
TOOLS: dict[str, tuple[Any, str | None]] = {
    "onnxslim": (lambda i, o: [*_script("onnxslim.cli:main", "onnxslim"), i, o], None),
    "onnxsim": (lambda i, o: [*_script("onnxsim:main", "onnxsim"), i, o], None),
    "normfold --no-verify": (
        lambda i, o: [*_script("normfold.cli:run", "normfold"), "optimize", i, "-o", o, "--no-verify", "-q"], "onnxslim"
    ),
    "normfold": (lambda i, o: [*_script("normfold.cli:run", "normfold"), "optimize", i, "-o", o, "-q"], "onnxsim"),
}


def _export(cases: list[str]) -> dict[str, Path]:
    """Export (or find in the zoo cache) every case in a child process: this one stays small."""
    code = (
        "import json, sys\n"
        "from benchmarks.speed import CASES\n"
        "from normfold.models.export import cached_export\n"
        "print(json.dumps({c: str(cached_export(CASES[c][0], CASES[c][1], **CASES[c][2])) for c in sys.argv[1:]}))\n"
    )
    process = subprocess.run([sys.executable, "-c", code, *cases], cwd=ROOT, check=True, capture_output=True, text=True)
    return {name: Path(path) for name, path in json.loads(process.stdout.splitlines()[-1]).items()}


def byte_compile_normfold() -> None:
    """Write the bytecode of normfold's packages (the folders its import resolves to), as ``pip
    install`` does: a checkout run with ``PYTHONDONTWRITEBYTECODE`` would otherwise compile them
    from source in every timed process."""
    for package in ("normfold", "normfold.passes", "normfold.models"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1)


def _run(command: list[str]) -> dict[str, Any]:
    """Run one command after a sync: wall seconds, peak RSS in MB (``wait4``), error if any."""
    os.sync()
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        timer = threading.Timer(_TIMEOUT_S, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").strip().splitlines()
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
    }
    if process.returncode != 0:
        result["error"] = f"exit {process.returncode}: {lines[-1][:160] if lines else ''}"
    return result


def measure(paths: dict[str, Path], runs: int, tools: list[str], folder: Path) -> dict[str, dict[str, list[dict]]]:
    results: dict[str, dict[str, list[dict]]] = {case: {tool: [] for tool in tools} for case in paths}
    for case, source in paths.items():
        for round_ in range(runs):
            for tool in tools:
                out = folder / f"{case}-{tool.replace(' ', '_')}.onnx"
                result = _run(TOOLS[tool][0](str(source), str(out)))
                results[case][tool].append(result)
                seconds = result["seconds"]
                print(f"speed: {case} round {round_ + 1}/{runs}: {tool} "
                      f"{'-' if seconds is None else f'{seconds:.2f}'} s {result.get('error', '')}", file=sys.stderr)
                for written in folder.iterdir():
                    written.unlink()
    return results


def summarize(results: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for case, by_tool in results.items():
        rows: dict[str, dict[str, Any]] = {}
        for tool, runs in by_tool.items():
            good = [r for r in runs if r.get("seconds") is not None and "error" not in r]
            errors = [r["error"] for r in runs if "error" in r]
            if not good:
                rows[tool] = {"error": errors[0] if errors else "no run"}
                continue
            seconds = [r["seconds"] for r in good]
            rows[tool] = {
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "median_cpu_s": statistics.median(r["cpu_s"] for r in good),
                "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in good),
                "runs": len(good),
            }
        for tool, row in rows.items():
            peer = TOOLS[tool][1]
            if peer and "median_s" in row and "median_s" in rows.get(peer, {}):
                row["vs"] = peer
                row["ratio"] = row["median_s"] / rows[peer]["median_s"]
        summary[case] = rows
    return summary


def table(summary: dict[str, dict[str, dict[str, Any]]], runs: int) -> str:
    header = f"{'case':<12}{'tool':<22}{'median s':>10}{'min s':>8}{'cpu s':>7}{'peak MB':>9}  ratio to peer"
    lines = [header, "-" * len(header)]
    for case, rows in summary.items():
        for tool, row in rows.items():
            if "error" in row:
                lines.append(f"{case:<12}{tool:<22}  fails: {row['error']}")
                continue
            ratio = f"{row['ratio']:.2f}x {row['vs']}" if "ratio" in row else ""
            lines.append(f"{case:<12}{tool:<22}{row['median_s']:>10.2f}{row['min_s']:>8.2f}{row['median_cpu_s']:>7.2f}"
                         f"{row['peak_rss_mb']:>9.0f}  {ratio}")
    lines.append(f"(wall seconds of the whole command, start-up included; median of {runs} runs, round-robin, "
                 "os.sync() before each; cpu s = median user+sys CPU seconds of the process and its threads; "
                 "ratio = normfold's median / the peer's median)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of: {', '.join(TOOLS)}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write every run and the summary here")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    tools = [t for t in args.tools.split(",") if t]
    unknown = [name for name in cases if name not in CASES] + [name for name in tools if name not in TOOLS]
    if unknown:
        parser.error(f"unknown case or tool {unknown[0]!r}")
    paths = _export(cases)
    byte_compile_normfold()
    with tempfile.TemporaryDirectory(prefix="normfold-speed-") as folder:
        results = measure(paths, args.runs, tools, Path(folder))
    summary = summarize(results)
    print(table(summary, args.runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
