"""``normfold passes``: list the passes, one line each."""

from __future__ import annotations

__all__ = ["add_command", "run"]

import argparse
from typing import Any

from normfold.cli import options


def add_command(commands: Any, groups: options.Groups) -> None:
    lst = commands.add_parser("passes", parents=[groups.common], help="list the passes")
    lst.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normfold.passes import DEFAULT_PASSES, REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name, cls in REGISTRY.items():
        kind = "default" if name in DEFAULT_PASSES else ("approximate" if not cls.exact else "on request")
        print(f"{name.ljust(width)}  {kind:<11}  {cls.summary}")
    return options.EXIT_OK
