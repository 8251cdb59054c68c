"""``normfold optimize IN.onnx -o OUT.onnx``: run the exact passes, verify, write OUT."""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
import sys
from pathlib import Path
from typing import Any

from normfold.catalog import BY_NAME, check_exact_passes
from normfold.cli import options
from normfold.errors import InputError


def add_command(commands: Any, groups: options.Groups) -> None:
    opt = commands.add_parser("optimize", parents=[groups.common, groups.compare, groups.targets, groups.rewrites],
                              help="run the exact passes, verify, write OUT")
    opt.add_argument("input", nargs="?", help="input ONNX model")
    opt.add_argument("-o", "--output", help="output ONNX model (written atomically; required)")
    opt.add_argument("--example", metavar="NAME[:VARIANT]", nargs="?", const="list",
                     help="use a model from the zoo instead of IN (needs torch), exported with VARIANT "
                          "(default ts13-keepbn); without a value, or 'list': list the zoo")
    opt.add_argument("--passes", help="comma-separated pass names (default: all exact passes)")
    opt.add_argument("--report", help="write the JSON report here")
    opt.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    opt.add_argument("--external-data", metavar="NAME",
                     help="write weights to a data file next to OUT named after NAME with a fresh token per "
                          "save (w.data -> w.nf-1a2b3c4d.data; default: OUT's stem + .data for models over "
                          "1.8 GB or inputs with external data; other models stay one file)")
    opt.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Usage errors first: they answer before the passes and onnxruntime are imported.
    passes = options.names(args.passes)
    if passes == []:
        raise InputError(f"optimize: --passes names no pass; known passes: {', '.join(BY_NAME)}")
    if passes is not None:
        check_exact_passes([name for name in passes if name not in BY_NAME or not BY_NAME[name].exact])
    pass_options, verify_options = options.pass_options(args), options.verify_options(args)
    if args.example == "list":
        print(_zoo_list())
        return options.EXIT_OK
    if args.input is None and not args.example:
        raise InputError("optimize: give an input model (IN.onnx) or --example NAME")
    if args.example and args.input:
        raise InputError("optimize: give either IN.onnx or --example, not both")
    if args.output is None:
        raise InputError("optimize: give the output model with -o OUT.onnx")

    from normfold.jobs.common import check_paths
    from normfold.jobs.optimize import optimize
    from normfold.report import format_optimize, write_json

    source = _example_path(args.example) if args.example else args.input
    check_paths({"-o": args.output, "--report": args.report, "--save-inputs": args.save_inputs},
                models=[source], inputs=[args.inputs], external_data=args.external_data)
    result = optimize(
        source,
        passes=passes,
        options=pass_options,
        verify=not args.no_verify,
        verify_options=verify_options,
        show_progress=not args.quiet,
    )
    table = result.verification.format_table() if result.verification else None
    if result.verification is None or result.verification.passed:
        result.save(args.output, external_data=args.external_data)
    if args.report:
        write_json(args.report, result.report)
    print(format_optimize(result.report, table))
    if result.verification is not None and not result.verification.passed:
        print(f"{args.output}: not written: verification failed", file=sys.stderr)
        return options.EXIT_FAILED
    print(f"wrote {args.output}")
    return options.EXIT_OK


def _example_path(example: str) -> Path:
    """The zoo model ``NAME`` or ``NAME:VARIANT``, exported (or found in the cache)."""
    try:
        from normfold.models.export import DEFAULT_VARIANT, cached_export
    except ImportError as error:
        raise InputError(f"--example needs torch: pip install 'normfold[torch]' torch==2.13.0 ({error})") from None
    name, colon, variant = example.partition(":")
    # ``resnet:`` names no variant: an error listing them, not the default in silence.
    return cached_export(name, variant if colon else DEFAULT_VARIANT)


def _zoo_list() -> str:
    """The zoo's models and export variants, for ``--example`` without a value."""
    from normfold.models import NAMES
    from normfold.models.export import DEFAULT_VARIANT, VARIANTS

    return "\n".join([
        "zoo models (normfold optimize --example NAME[:VARIANT] -o OUT.onnx; needs torch):",
        "  " + ", ".join(NAMES),
        f"export variants (default {DEFAULT_VARIANT}):",
        "  " + ", ".join(VARIANTS),
    ])
