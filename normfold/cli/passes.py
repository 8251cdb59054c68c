"""``normfold passes``: list the passes, one line each."""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
from typing import Any

from normfold.catalog import BY_NAME, DEFAULT_PASSES
from normfold.cli import options


def add_command(commands: Any, groups: options.Groups) -> None:
    lst = commands.add_parser("passes", parents=[groups.common], help="list the passes")
    lst.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # From the catalog: listing the passes does not import them (nor onnxscript, nor onnxruntime).
    width = max(len(name) for name in BY_NAME)
    for name, info in BY_NAME.items():
        kind = "default" if name in DEFAULT_PASSES else ("approximate" if not info.exact else "on request")
        print(f"{name.ljust(width)}  {kind:<11}  {info.summary}")
    return options.EXIT_OK
