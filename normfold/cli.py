"""The ``normfold`` command: a thin shell over the Python API.

Exit codes scripts can trust: 0 done (and verified, or equivalent), 1 verification failed
(nothing written), 2 bad input or usage (one line on stderr naming the file and the problem,
nothing written), 3 an internal error (a normfold bug: please report it with ``--debug``).
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from normfold import __version__
from normfold.collapse_cli import add_collapse_command
from normfold.errors import InputError, NormfoldError, VerificationError, first_line
from normfold.quiet import quiet_command

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        with quiet_command(args.debug):
            return args.run(args)
    except NormfoldError as error:
        if args.debug:
            raise
        print(f"normfold: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("normfold: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # a bug in normfold, not in the user's input
        if args.debug:
            raise
        print(
            f"normfold: internal error: {type(error).__name__}: {first_line(error)} "
            "(nothing written; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _optimize(args: argparse.Namespace) -> int:
    from normfold.pipeline import optimize
    from normfold.report import format_optimize, write_json

    source = _example_path(args.example) if args.example else args.input
    if source is None:
        raise InputError("optimize: give an input model (IN.onnx) or --example NAME")
    if args.example and args.input:
        raise InputError("optimize: give either IN.onnx or --example, not both")
    if Path(args.output).resolve() == Path(source).resolve():
        raise InputError(f"{args.output}: refusing to overwrite the input model; choose another -o")
    result = optimize(
        source,
        passes=_split(args.passes),
        target=args.target,
        max_opset=args.max_opset,
        verify=not args.no_verify,
        freeze_initializer_inputs=args.freeze_initializer_inputs,
        lower_standalone_bn=args.lower_standalone_bn,
        skip_ops=args.skip_ops,
        inputs=args.inputs,
        dims=_dims(args.dims),
        samples=args.samples,
        rtol=args.rtol,
        atol=args.atol,
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
        return EXIT_FAILED
    print(f"wrote {args.output}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from normfold.report import write_json
    from normfold.verification import verify

    report = verify(
        args.reference,
        args.candidate,
        inputs=args.inputs,
        dims=_dims(args.dims),
        samples=args.samples,
        rtol=args.rtol,
        atol=args.atol,
        reference_precision=args.reference_precision,
        progress=not args.quiet,
    )
    if args.report:
        write_json(args.report, report.to_dict())
    print(report.format_table())
    return EXIT_OK if report.passed else EXIT_FAILED


def _inspect(args: argparse.Namespace) -> int:
    from normfold.pipeline import inspect
    from normfold.report import format_inspect

    report = inspect(args.input, target=args.target, max_opset=args.max_opset)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return EXIT_OK


def _passes(args: argparse.Namespace) -> int:
    from normfold.passes import DEFAULT_PASSES, REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name, cls in REGISTRY.items():
        kind = "default" if name in DEFAULT_PASSES else ("approximate" if not cls.exact else "on request")
        print(f"{name.ljust(width)}  {kind:<11}  {cls.summary}")
    return EXIT_OK


def _example_path(name: str) -> Path:
    try:
        from normfold.models.export import cached_export
    except ImportError as error:
        raise InputError(f"--example needs torch: pip install 'normfold[torch]' torch==2.13.0 ({error})") from None
    return cached_export(name)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


def _dims(value: str | None) -> dict[str, int] | None:
    if not value:
        return None
    dims: dict[str, int] = {}
    for item in value.split(","):
        name, _, number = item.partition("=")
        if not name.strip() or not number.strip().isdigit() or int(number) < 1:
            raise InputError(f"--dims: {item!r} is not NAME=POSITIVE_INT (e.g. --dims batch=2,seq=16)")
        dims[name.strip()] = int(number)
    return dims


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normfold",
        description="Fold BatchNorm, fuse normalization patterns and verify ONNX graphs with onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"normfold {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    compare = argparse.ArgumentParser(add_help=False)
    compare.add_argument("--inputs", help="inputs as an .npz whose keys are the model's input names")
    compare.add_argument("--dims", help="bind symbolic dims, e.g. batch=2,seq=16")
    compare.add_argument("--samples", type=int, default=3, help="random input draws (default 3)")
    compare.add_argument("--rtol", type=float, help="relative tolerance (to the output's max |value|)")
    compare.add_argument("--atol", type=float, help="absolute tolerance")
    targets = argparse.ArgumentParser(add_help=False)
    targets.add_argument("--target", choices=["onnx", "onnxruntime"], default="onnx",
                         help="op set of the output: standard ONNX (default) or onnxruntime contrib ops")
    targets.add_argument("--max-opset", type=int, help="never raise the model's opset above N")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    opt = commands.add_parser("optimize", parents=[common, compare, targets],
                              help="run the exact passes, verify, write OUT")
    opt.add_argument("input", nargs="?", help="input ONNX model")
    opt.add_argument("-o", "--output", required=True, help="output ONNX model (written atomically)")
    opt.add_argument("--example", metavar="NAME", help="use a model from the zoo instead of IN (needs torch)")
    opt.add_argument("--passes", help="comma-separated pass names (default: all exact passes)")
    opt.add_argument("--report", help="write the JSON report here")
    opt.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    opt.add_argument("--external-data", metavar="NAME",
                     help="write weights to this data file next to OUT (default: OUT's stem + .data for "
                          "models over 1.8 GB; smaller models stay one file)")
    opt.add_argument("--freeze-initializer-inputs", action="store_true",
                     help="treat initializers listed as graph inputs as constants (removes those inputs)")
    opt.add_argument("--lower-standalone-bn", action="store_true",
                     help="turn BatchNorms with nothing to fold into into one Mul and one Add")
    opt.add_argument("--skip-ops", action="store_true",
                     help="with --target onnxruntime: fuse residual Add + norm into Skip*Normalization "
                          "even though onnxruntime 1.32's CPU provider measured them slower")
    opt.set_defaults(run=_optimize)

    ver = commands.add_parser("verify", parents=[common, compare],
                              help="compare two models in onnxruntime (optimizations off)")
    ver.add_argument("reference", help="the model taken as right")
    ver.add_argument("candidate", help="the model under test")
    ver.add_argument("--reference", dest="reference_precision", choices=["model", "float64"], default="model",
                     help="run the reference as it is, or converted to float64")
    ver.add_argument("--report", help="write the JSON report here")
    ver.set_defaults(run=_verify)

    ins = commands.add_parser("inspect", parents=[common, targets],
                              help="what the passes would do, with every refusal's reason")
    ins.add_argument("input", help="input ONNX model")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(run=_inspect)

    add_collapse_command(commands, [common, targets])

    lst = commands.add_parser("passes", parents=[common], help="list the passes")
    lst.set_defaults(run=_passes)
    return parser
