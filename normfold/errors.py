"""The errors normfold reports to its users.

Every error a user can cause carries a one-line message that names the file and the problem;
the command line prints that line and exits with the error's ``exit_code``, never a traceback.
"""

from __future__ import annotations

__all__ = ["NormfoldError", "InputError", "VerificationError", "first_line"]


class NormfoldError(Exception):
    """Base of the errors normfold raises on purpose; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 2


class InputError(NormfoldError):
    """Bad input or usage: unreadable or invalid model, bad options, mismatched inputs (exit 2)."""

    exit_code = 2


class VerificationError(NormfoldError):
    """The candidate model does not compute what the reference computes (exit 1)."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
