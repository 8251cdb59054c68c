"""Reports: the table people read on stdout and the JSON machines read.

The JSON keys are an interface (DESIGN.md): ``input``, ``output``, ``target``, ``opset_before``,
``opset_after``, ``nodes_before``, ``nodes_after``, ``passes`` (each with ``name``, ``applied``,
``sites``, ``refused``), ``verification``. The tables are for people and may change.
"""

from __future__ import annotations

__all__ = ["format_inspect", "format_optimize", "format_passes_table", "write_json"]

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from normfold.files import write_atomic

# How many refusals a table shows per pass before it says "and N more (see --report)".
_REFUSALS_SHOWN = 8
# How many inputs (outputs) the summary's signature lines name before "and N more".
_SIGNATURE_SHOWN = 6


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON atomically, with a new file's usual permissions
    (:func:`normfold.files.write_atomic`)."""
    text = json.dumps(data, indent=2, default=_jsonable) + "\n"
    return write_atomic(path, lambda file: file.write(text.encode()))


def format_passes_table(passes: list[dict[str, Any]], full: str = "--report") -> str:
    """One row per pass (applied, refused, kept, by op); then the sites kept by design, one line
    per reason with their count; then each refusal for a reason of the graph, at most
    ``_REFUSALS_SHOWN`` per pass (the JSON keeps them all; ``full`` names the option that writes
    it)."""
    rows = [("pass", "applied", "refused", "kept", "detail")]
    for record in passes:
        detail = ", ".join(f"{op} {n}" for op, n in record.get("by_op", {}).items())
        kept = sum(1 for r in record["refused"] if r.get("by_design"))
        rows.append((record["name"], str(record["applied"]), str(len(record["refused"]) - kept), str(kept), detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 6)
    for record in passes:
        by_reason = Counter(r["reason"] for r in record["refused"] if r.get("by_design"))
        for reason, count in by_reason.items():
            lines.append(f"  {record['name']}: kept {count} site{'s' if count > 1 else ''} by design: {reason}")
    for record in passes:
        refused = [r for r in record["refused"] if not r.get("by_design")]
        for refusal in refused[:_REFUSALS_SHOWN]:
            lines.append(f"  {record['name']}: left {refusal['node']}: {refusal['reason']}")
        if len(refused) > _REFUSALS_SHOWN:
            lines.append(f"  {record['name']}: and {len(refused) - _REFUSALS_SHOWN} more refusals (see {full})")
        for note in record.get("notes", []):
            lines.append(f"  {record['name']}: note: {note}")
    return "\n".join(line.rstrip() for line in lines)


def format_optimize(report: dict[str, Any], verification_table: str | None) -> str:
    """The summary ``normfold optimize`` prints: what went in and came out (interface, size,
    ops, time), then what each pass did."""
    seconds = sum(report.get("seconds", {}).values())
    output = f"   -> {report['output']}" if report.get("output") else ""
    lines = [
        f"input   {report['input']}{output}",
        *_signature_lines(report),
        f"target  {report['target']}   opset {report['opset_before']} -> {report['opset_after']}"
        f"   nodes {report['nodes_before']} -> {report['nodes_after']}"
        f"   weights {_size(report['weight_bytes_before'])} -> {_size(report['weight_bytes_after'])}"
        f"   {seconds:.2f} s",
        f"ops     {_op_changes(report['ops_before'], report['ops_after'])}",
        "",
        format_passes_table(report["passes"]),
    ]
    if verification_table is not None:
        lines += ["", verification_table]
    else:
        lines += ["", "verification skipped (--no-verify)"]
    return "\n".join(lines)


def _signature_lines(report: dict[str, Any]) -> list[str]:
    """``in``/``out`` lines: each graph input and output as ``name: dtype[dims]``, at most
    ``_SIGNATURE_SHOWN`` of them (a decoder with its KV cache has dozens; the JSON keeps all); a
    changed interface (``--freeze-initializer-inputs`` drops inputs) shows before -> after."""
    before, after = report["signature_before"], report["signature_after"]
    lines = []
    for key, label in (("inputs", "in      "), ("outputs", "out     ")):
        text = _signature(after[key])
        if before[key] != after[key]:
            text = _signature(before[key]) + "  ->  " + text
        lines.append(label + text)
    return lines


def _signature(values: dict[str, str]) -> str:
    shown = [f"{name}: {kind}" for name, kind in list(values.items())[:_SIGNATURE_SHOWN]]
    more = len(values) - _SIGNATURE_SHOWN
    return ", ".join(shown + ([f"and {more} more"] if more > 0 else []))


def _op_changes(before: dict[str, int], after: dict[str, int]) -> str:
    """The op types whose count changed, ``Op before -> after``, most common first."""
    changed = [op for op in dict.fromkeys([*before, *after]) if before.get(op, 0) != after.get(op, 0)]
    if not changed:
        return "unchanged"
    return ", ".join(f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in changed)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def format_inspect(report: dict[str, Any], flags: str = "") -> str:
    """What ``normfold inspect`` prints: the model's ops, then what each pass would do (``flags``:
    the optimize flags besides ``--target`` it previews, as typed)."""
    histogram = report["ops_before"]
    ops = ", ".join(f"{op} {count}" for op, count in histogram.items())
    lines = [
        f"model   {report['model']}",
        f"opset   {report['opset_before']}   nodes {report['nodes_before']}",
        f"ops     {ops}",
        "",
        f"what `normfold optimize --target {report['target']}{' ' + flags if flags else ''}` would do "
        f"(nodes {report['nodes_before']} -> {report['nodes_after']}, opset -> {report['opset_after']}):",
        format_passes_table(report["passes"], full="--json"),
    ]
    for record in report["passes"]:
        for site in record["sites"][:_REFUSALS_SHOWN]:
            where = f" into {site['into']}" if site.get("into") else ""
            how = f" ({site['how']})" if site.get("how") else ""
            lines.append(f"  {record['name']}: would rewrite {site['node']}{where}{how}")
        if len(record["sites"]) > _REFUSALS_SHOWN:
            lines.append(f"  {record['name']}: and {len(record['sites']) - _REFUSALS_SHOWN} more sites (see --json)")
    lines += ["", _format_collapse(report["collapse"])]
    return "\n".join(lines)


def _format_collapse(record: dict[str, Any]) -> str:
    """Collapse candidates, lowest score (closest to linear) first, and the refused sites."""
    lines = ["what `normfold collapse` could remove (approximate; not part of optimize):"]
    sites = sorted(record["sites"], key=lambda site: site.get("score", 0.0))
    for site in sites[:_REFUSALS_SHOWN]:
        lines.append(f"  candidate {site['node']}: score {site.get('score', 0.0):.3g} ({site.get('mode', '')})")
    if len(sites) > _REFUSALS_SHOWN:
        lines.append(f"  and {len(sites) - _REFUSALS_SHOWN} more candidates (see --json)")
    deviation = record.get("deviation") or {}
    if sites and deviation:
        lines.append(f"  all {len(sites)} linearized at once: output deviation "
                     f"{deviation.get('max_rel_deviation', 0.0):.3g} relative")
    for refusal in record["refused"][:_REFUSALS_SHOWN]:
        lines.append(f"  left {refusal['node']}: {refusal['reason']}")
    if len(record["refused"]) > _REFUSALS_SHOWN:
        lines.append(f"  and {len(record['refused']) - _REFUSALS_SHOWN} more refusals (see --json)")
    lines += [f"  note: {note}" for note in record.get("notes", [])]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
