"""The ``normfold`` command: a thin shell over the Python API, one module per verb.

Exit codes scripts can trust: 0 done (and verified, or equivalent), 1 verification failed
(nothing written), 2 bad input or usage (one line on stderr naming the file and the problem,
nothing written; also for a full disk, a folder that cannot be written, no memory), 3 an
internal error (a normfold bug: please report it with ``--debug``). Unless ``--debug``, that
one line is all stderr shows (:func:`normfold.quiet.quiet_command`).

Each verb module (:mod:`.optimize`, :mod:`.verify`, :mod:`.inspect`, :mod:`.collapse`,
:mod:`.passes`) has ``add_command(commands, groups)``, registering its subcommand with the shared
argument groups of :mod:`.options`, and the function the subcommand runs.
"""

from __future__ import annotations

__all__ = ["main", "parser", "run"]

import argparse
import sys
from collections.abc import Sequence

from normfold import __version__, deferred_imports
from normfold.cli import collapse, inspect, optimize, options, passes, verify
from normfold.errors import NormfoldError, first_line
from normfold.quiet import quiet_command

EXIT_INTERNAL = 3


def run(argv: Sequence[str] | None = None) -> int:
    """The ``normfold`` process (its console script and ``python -m normfold``): :func:`main`, with
    the start-up imports a run may never use deferred to their first use
    (:mod:`normfold.deferred_imports`). A program calling normfold in-process uses :func:`main`,
    which leaves its imports alone."""
    deferred_imports.defer(deferred_imports.PROCESS_DEFERRED)
    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argument_parser = parser()
    args = argument_parser.parse_args(argv)
    if not hasattr(args, "run"):
        argument_parser.print_help()
        return options.EXIT_BAD_INPUT
    try:
        with quiet_command(args.debug):
            return args.run(args)
    except NormfoldError as error:
        if args.debug:
            raise
        print(f"normfold: error: {error}", file=sys.stderr)
        return error.exit_code
    except (OSError, MemoryError) as error:
        # The environment, not normfold: a full disk, a read-only or vanished folder, no memory.
        if args.debug:
            raise
        print(f"normfold: error: {_environment_problem(error)}", file=sys.stderr)
        return options.EXIT_BAD_INPUT
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


def _environment_problem(error: OSError | MemoryError) -> str:
    if isinstance(error, MemoryError):
        return f"out of memory ({first_line(error)})"
    where = error.filename or "normfold"
    return f"{where}: {error.strerror or first_line(error)}"


def parser() -> argparse.ArgumentParser:
    """The ``normfold`` argument parser (its verbs and their flags), for :func:`main` and tools."""
    built = argparse.ArgumentParser(
        prog="normfold",
        description="Fold BatchNorm, fuse normalization patterns and verify ONNX graphs with onnxruntime.",
    )
    built.add_argument("--version", action="version", version=f"normfold {__version__}")
    groups = options.Groups.create()
    commands = built.add_subparsers(title="commands", metavar="COMMAND")
    for verb in (optimize, verify, inspect, collapse, passes):
        verb.add_command(commands, groups)
    return built
