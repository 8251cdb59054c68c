"""``normfold collapse``: TLC layer collapse of an ONNX model, or the embedded digits example.

    normfold collapse IN.onnx -o OUT.onnx (--remove N | --max-deviation X | --target-latency R [--max-deviation X])
                      [--calibration X.npz] [--report R.json] [--max-flops-growth G] [--no-measure-latency]
                      [--max-segment-sites N] [--max-steps N] [--latency-runs N] [--latency-repeats K]
    normfold collapse --example NAME -o OUT.onnx [--report R.json] [--plot P.png] [--epochs E]
                      [--target-latency R] [--distill A]

Exit codes: 0 written; 1 the result would deviate more than ``--max-deviation`` (nothing
written); 2 bad input or usage. The deviation printed is measured, never assumed: collapse is
approximate by nature.
"""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
from pathlib import Path
from typing import Any

from normfold.cli import options
from normfold.errors import InputError


def add_command(commands: Any, groups: options.Groups) -> None:
    command = commands.add_parser(
        "collapse", parents=[groups.common, groups.targets],
        help="TLC layer collapse: linearize near-linear activations, merge layers (approximate, measured)",
        description="Linearize the activations BatchNorm statistics say are (almost) linear and merge "
                    "the layers around them; the output deviation is measured in onnxruntime.",
    )
    command.add_argument("input", nargs="?", help="input ONNX model (with its BatchNorms: run before folding)")
    command.add_argument("-o", "--output", required=True, help="output ONNX model (written atomically)")
    how = command.add_mutually_exclusive_group()
    how.add_argument("--remove", type=int, metavar="N", help="linearize the N lowest-scoring activations that merge")
    how.add_argument("--max-deviation", type=float, metavar="X",
                     help="keep linearizing while max|y - y_ref| / max|y_ref| stays <= X (default 0.01); "
                          "with --target-latency a bound on the joint choice")
    command.add_argument("--calibration", metavar="X.npz",
                         help="model inputs (one array per input) for empirical scores and the deviation")
    command.add_argument("--max-flops-growth", type=float, default=1.0, metavar="G",
                         help="refuse merges whose MACs exceed G times the unmerged layers' (default 1.0)")
    command.add_argument("--report", help="write the JSON report here")
    command.add_argument("--example", metavar="NAME",
                         help="train a digits CNN (digits-cnn, digits-resnet, digits-vgg), collapse it in torch "
                              "with fine-tuning, write OUT, the report and a plot "
                              "(needs torch, scikit-learn, matplotlib)")
    command.add_argument("--plot", help="with --example: the PNG plot (default OUT with .png)")
    command.add_argument("--epochs", type=int, default=30, help="with --example: training epochs (default 30)")
    command.add_argument("--finetune-epochs", type=int, default=3,
                         help="with --example: fine-tuning epochs after each removal (default 3)")
    command.add_argument("--max-accuracy-drop", type=float, default=0.01,
                         help="with --example: stop when validation accuracy drops more (default 0.01)")
    command.add_argument("--target-latency", type=float, metavar="R",
                         help="choose removals jointly (segment DP) so that the batch-1 onnxruntime latency "
                              "is R times the BN-folded dense model's, e.g. 0.8")
    command.add_argument("--no-measure-latency", dest="measure_latency", action="store_false",
                         help="with IN.onnx: count MACs instead of timing (--target-latency is then a MACs ratio)")
    command.add_argument("--max-segment-sites", type=int, default=2, metavar="N",
                         help="with IN.onnx and --target-latency: longest run of consecutive activations one "
                              "candidate removes (default 2)")
    command.add_argument("--max-steps", type=int, default=3, metavar="N",
                         help="with IN.onnx and --target-latency: joint choices made while the measured model "
                              "is over the budget (default 3)")
    command.add_argument("--latency-runs", type=int, default=50, metavar="N",
                         help="with IN.onnx: timed runs per round (default 50)")
    command.add_argument("--latency-repeats", type=int, default=5, metavar="K",
                         help="with IN.onnx: rounds; latency is their median, with the IQR (default 5, at least 3)")
    command.add_argument("--distill", type=float, default=0.0, metavar="A",
                         help="with --example: fine-tune with logit distillation from the dense model, "
                              "loss (1-A)*CE + A*KD (default 0: plain cross-entropy)")
    command.add_argument("--seed", type=int, default=0, help="with --example: seed (default 0)")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.target_latency is not None and not 0 < args.target_latency <= 1:
        raise InputError(f"--target-latency is a ratio in (0, 1], not {args.target_latency:g}")
    if args.example:
        return _example(args)
    if args.input is None:
        raise InputError("collapse: give an input model (IN.onnx) or --example NAME")
    if args.target_latency is not None and args.remove is not None:
        raise InputError("collapse: give either --remove or --target-latency, not both")
    if min(args.max_segment_sites, args.latency_runs, args.max_steps) < 1 or args.latency_repeats < 3:
        raise InputError("collapse: --max-segment-sites, --max-steps and --latency-runs must be >= 1, "
                         "--latency-repeats >= 3")
    from normfold.jobs.collapse import collapse_onnx
    from normfold.jobs.common import check_paths
    from normfold.report import write_json

    check_paths({"-o": args.output, "--report": args.report}, models=[args.input], inputs=[args.calibration])

    job = collapse_onnx(
        args.input, remove=args.remove, max_deviation=args.max_deviation, calibration=args.calibration,
        max_flops_growth=args.max_flops_growth, target=args.target,
        max_opset=args.max_opset, show_progress=not args.quiet, target_latency=args.target_latency,
        measure_latency=args.measure_latency, max_segment_sites=args.max_segment_sites,
        latency_runs=args.latency_runs, latency_repeats=args.latency_repeats, max_steps=args.max_steps,
    )
    text = _summary(job.report)  # composed before anything is written
    job.save(args.output)
    if args.report:
        write_json(args.report, job.report)
    print(text)
    print(f"wrote {args.output}")
    return options.EXIT_OK


def _summary(report: dict[str, Any]) -> str:
    """What ``normfold collapse IN.onnx`` prints: passes, cost, the budget's steps, the deviation."""
    from normfold.report import format_passes_table

    lines = [f"input   {report['input']}",
             f"nodes   {report['nodes_before']} -> {report['nodes_after']}   "
             f"activations removed {report['collapse']['removed']}", "",
             format_passes_table(report["passes"]), "", _cost_table(report["cost"])]
    summary = report["collapse"]
    if "chosen" in summary:
        unit = "ms" if report["cost"]["by"] == "latency" else "MACs"
        lines.append(f"target {summary['target_latency']:g} x the dense model ({report['cost']['by']}): "
                     + ("reached" if summary["feasible"] else "not reached"))
        for step in summary["steps"]:
            chosen = ", ".join(step["chosen"]) or "nothing (no candidate saves enough)"
            measured = f", measured {step['measured_cost']:.5g} {unit}" if "measured_cost" in step else ""
            undone = f" (undone: {step['undone']})" if "undone" in step else ""
            lines.append(f"step {step['step']}: removed jointly {chosen}; predicted {step['predicted_cost']:.5g} "
                         f"{unit}{measured}{undone}")
    lines.append("")
    verification = report["verification"]
    for name, output in verification["outputs"].items():
        lines.append(f"deviation of {name}: max abs {output['max_abs_error']:.4g}, "
                     f"max rel {output['max_rel_error']:.4g}")
    lines.append(f"measured over {verification['samples']} sample(s), onnxruntime with optimizations off "
                 "(approximate by nature: collapse never claims exactness)")
    return "\n".join(lines)


def _cost_table(cost: dict[str, Any]) -> str:
    """Input, dense (BN folded), predicted and output: MACs and batch-1 latency, median (IQR)."""
    rows = [("model", "MACs", "ORT ms batch 1 (IQR)")]
    predicted = cost.get("predicted", {})
    for key, name in (("input", "input"), ("dense", "dense, BN folded"), ("predicted", "predicted"),
                      ("output", "output")):
        if key == "predicted":
            if not predicted:
                continue
            macs = predicted.get("macs")
            latency = predicted.get("latency_ms")
            rows.append((name, _count(macs), "-" if latency is None else f"{latency:.4f}"))
            continue
        entry = cost[key]
        timing = entry["latency"]
        rows.append((name, _count(entry["macs"]),
                     "not measured" if timing is None else f"{timing['median_ms']:.4f} (IQR {timing['iqr_ms']:.4f})"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a.ljust(widths[0])}  {b.ljust(widths[1])}  {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len(rows[0][2])}")
    return "\n".join(line.rstrip() for line in lines)


def _count(macs: float | None) -> str:
    if macs is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.1f}{suffix}"
    return f"{macs:.0f}"


def _example(args: argparse.Namespace) -> int:
    if args.input:
        raise InputError("collapse: give either IN.onnx or --example, not both")
    if not 0 <= args.distill <= 1:
        raise InputError(f"--distill is a weight in [0, 1], not {args.distill:g}")
    from normfold.jobs.common import check_paths

    # The example's defaults: the report and the plot next to OUT.
    check_paths({"-o": args.output, "--report": args.report or Path(args.output).with_suffix(".json"),
                 "--plot": args.plot or Path(args.output).with_suffix(".png")})
    from normfold.examples.collapse_example import run
    from normfold.torch.layer_collapse import format_report

    report = run(
        args.example, args.output, report_path=args.report, plot_path=args.plot, epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        max_accuracy_drop=args.max_accuracy_drop, max_flops_growth=args.max_flops_growth, seed=args.seed,
        target_latency=args.target_latency, distill=args.distill, progress=not args.quiet,
    )
    example, onnx_check = report["example"], report["onnx"]
    print(format_report(report))
    print(f"test accuracy {example['test_accuracy_dense']:.4f} dense -> "
          f"{example['test_accuracy_collapsed']:.4f} collapsed")
    print(f"ONNX export vs torch: max abs {onnx_check['max_abs_error_vs_torch']:.3g}, "
          f"argmax agreement {onnx_check['argmax_agreement']:.4f}")
    for key in ("model", "report", "plot"):
        print(f"wrote {report['files'][key]}")
    return options.EXIT_OK
