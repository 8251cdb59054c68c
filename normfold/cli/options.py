"""The argument groups the verbs share, and the options objects they build.

A flag that several verbs take is defined once here, in a parent parser, so it means the same
thing everywhere: ``common`` (``--debug``, ``--quiet``), ``compare`` (inputs, dims, samples,
tolerances: how two models are run and compared) and ``targets`` (``--target``,
``--max-opset``: what the passes may emit). A flag's destination is the name of the field it
sets in :class:`~normfold.options.PassOptions` or :class:`~normfold.options.VerifyOptions`;
:func:`pass_options` and :func:`verify_options` build those once from the parsed arguments, so
a new option is a field, its flag in its group (or in the one verb that takes it) and the code
that reads it.
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "Groups", "dims", "names", "pass_options", "verify_options"]

import argparse
import dataclasses
from typing import Any, TypeVar

from normfold.errors import InputError
from normfold.options import PassOptions, VerifyOptions

_Options = TypeVar("_Options", PassOptions, VerifyOptions)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Groups:
    """The shared parent parsers a verb picks from (``parents=[groups.common, ...]``)."""

    common: argparse.ArgumentParser
    compare: argparse.ArgumentParser
    targets: argparse.ArgumentParser
    # What the exact passes may do beyond the target: optimize's, and inspect's to preview it.
    rewrites: argparse.ArgumentParser

    @classmethod
    def create(cls) -> Groups:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--debug", action="store_true", help="show tracebacks")
        common.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
        compare = argparse.ArgumentParser(add_help=False)
        compare.add_argument("--inputs", help="inputs as an .npz whose keys are the model's input names")
        compare.add_argument("--save-inputs", metavar="X.npz",
                             help="write the inputs verification used to this .npz (--inputs reads it back)")
        compare.add_argument("--dims", help="bind symbolic dims, e.g. batch=2,seq=16")
        compare.add_argument("--samples", type=int, default=3, help="random input draws (default 3)")
        compare.add_argument("--rtol", type=float, help="relative tolerance (to the output's max |value|)")
        compare.add_argument("--atol", type=float, help="absolute tolerance")
        targets = argparse.ArgumentParser(add_help=False)
        targets.add_argument("--target", choices=["onnx", "onnxruntime"], default="onnx",
                             help="op set of the output: standard ONNX (default) or onnxruntime contrib ops")
        targets.add_argument("--max-opset", type=int, help="never raise the model's opset above N")
        rewrites = argparse.ArgumentParser(add_help=False)
        rewrites.add_argument("--freeze-initializer-inputs", action="store_true",
                              help="treat initializers listed as graph inputs as constants (removes those inputs)")
        rewrites.add_argument("--lower-standalone-bn", action="store_true",
                              help="turn BatchNorms with nothing to fold into into one Mul and one Add")
        rewrites.add_argument("--skip-ops", action="store_true",
                              help="with --target onnxruntime: fuse residual Add + norm into Skip*Normalization "
                                   "even though onnxruntime 1.32's CPU provider measured them slower")
        return cls(common, compare, targets, rewrites)


def pass_options(args: argparse.Namespace) -> PassOptions:
    """The :class:`PassOptions` the parsed flags set (the ``targets`` group and the verb's own)."""
    return _built(PassOptions, args)


def verify_options(args: argparse.Namespace) -> VerifyOptions:
    """The :class:`VerifyOptions` the parsed flags set (the ``compare`` group and the verb's own)."""
    return _built(VerifyOptions, args, dims=dims(args.dims))


def _built(kind: type[_Options], args: argparse.Namespace, **parsed: Any) -> _Options:
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(kind) if hasattr(args, field.name)}
    return kind(**{**values, **parsed})


def names(value: str | None) -> list[str] | None:
    """A comma-separated list of names (``--passes a,b``); None when the flag was not given."""
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


def dims(value: str | None) -> dict[str, int] | None:
    """``--dims batch=2,seq=16`` as ``{"batch": 2, "seq": 16}``."""
    if not value:
        return None
    bound: dict[str, int] = {}
    for item in value.split(","):
        name, _, number = item.partition("=")
        if not name.strip() or not number.strip().isdigit() or int(number) < 1:
            raise InputError(f"--dims: {item!r} is not NAME=POSITIVE_INT (e.g. --dims batch=2,seq=16)")
        bound[name.strip()] = int(number)
    return bound
