"""``normfold inspect IN.onnx``: what the passes would do, with every refusal's reason."""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
import json
from typing import Any

from normfold.cli import options


def add_command(commands: Any, groups: options.Groups) -> None:
    ins = commands.add_parser("inspect", parents=[groups.common, groups.targets, groups.rewrites],
                              help="what the passes would do, with every refusal's reason")
    ins.add_argument("input", help="input ONNX model")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normfold.jobs.inspect import inspect
    from normfold.report import format_inspect

    report = inspect(args.input, options.pass_options(args))
    flags = [flag for flag, given in (("--freeze-initializer-inputs", args.freeze_initializer_inputs),
                                      ("--lower-standalone-bn", args.lower_standalone_bn),
                                      ("--skip-ops", args.skip_ops)) if given]
    if args.max_opset is not None:
        flags.append(f"--max-opset {args.max_opset}")
    print(json.dumps(report, indent=2) if args.json else format_inspect(report, " ".join(flags)))
    return options.EXIT_OK
