"""The errors normfold reports to its users.

Every error a user can cause carries a one-line message that names the file and the problem;
the command line prints that line and exits with the error's ``exit_code``, never a traceback.

:class:`Refusal` is not a user error but the one way a rewrite says "this site cannot be
rewritten exactly": it never reaches the user as an exception, only as a line of the report.
"""

from __future__ import annotations

__all__ = ["InputError", "NormfoldError", "Refusal", "VerificationError", "first_line"]

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir


class NormfoldError(Exception):
    """Base of the errors normfold raises on purpose; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 2


class InputError(NormfoldError):
    """Bad input or usage: unreadable or invalid model, bad options, mismatched inputs (exit 2)."""

    exit_code = 2


class VerificationError(NormfoldError):
    """The candidate model does not compute what the reference computes (exit 1)."""

    exit_code = 1


class Refusal(Exception):
    """A site that cannot be rewritten exactly, and why.

    Raised anywhere in a rule's check (the graph plumbing, the pure math of
    :mod:`normfold.math`, the rule itself); turned into the report line
    ``{"node": ..., "reason": ..., **details}`` in one place,
    :meth:`normfold.passes.base.PassRecord.refuse`. ``node`` is the node the refusal is reported
    against (None: the site's own node, e.g. the rule's match root). A match that is no site at
    all (a pattern that matched something else by accident) is not a refusal: the check returns
    a failed ``MatchResult`` instead, and nothing is reported.
    """

    def __init__(self, reason: str, node: ir.Node | str | None = None, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node = node
        self.details = details


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
