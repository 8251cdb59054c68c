"""``normfold verify REF.onnx CAND.onnx``: run both in onnxruntime (optimizations off), compare."""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
from typing import Any

from normfold.cli import options


def add_command(commands: Any, groups: options.Groups) -> None:
    ver = commands.add_parser("verify", parents=[groups.common, groups.compare],
                              help="compare two models in onnxruntime (optimizations off)")
    ver.add_argument("reference", help="the model taken as right")
    ver.add_argument("candidate", help="the model under test")
    ver.add_argument("--reference", dest="reference_precision", choices=["model", "float64"], default="model",
                     help="run the reference as it is, or converted to float64")
    ver.add_argument("--report", help="write the JSON report here")
    ver.add_argument("--localize", action="store_true",
                     help="when outputs differ, name the first intermediate tensor (shared by name) that differs")
    ver.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks = options.verify_options(args)  # a usage error answers before onnx and onnxruntime load

    from normfold.jobs.common import check_paths
    from normfold.report import write_json
    from normfold.verification import verify

    check_paths({"--report": args.report, "--save-inputs": args.save_inputs},
                models=[args.reference, args.candidate], inputs=[args.inputs])

    report = verify(args.reference, args.candidate, checks, progress=not args.quiet)
    if args.report:
        write_json(args.report, report.to_dict())
    print(report.format_table())
    return options.EXIT_OK if report.passed else options.EXIT_FAILED
