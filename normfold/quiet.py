"""Silencing other libraries' log lines for a block of code.

normfold reports problems itself, in one line; the libraries it calls (torch's exporter,
onnxscript, onnx_ir) log their own view of the same event, which would repeat or bury it.
"""

from __future__ import annotations

__all__ = ["quiet_loggers", "silenced"]

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loggers(*prefixes: str) -> Iterator[None]:
    """Within the block, the loggers named ``prefix`` or ``prefix.*`` log errors only."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in prefixes]
    loggers = [logging.getLogger(n) for n in {*names, *prefixes}]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def silenced(*prefixes: str) -> Iterator[None]:
    """Within the block nothing reaches the user: Python warnings are ignored, what is printed
    to ``sys.stdout`` and ``sys.stderr`` is dropped, and the loggers named ``prefix`` or
    ``prefix.*`` log errors only (:func:`quiet_loggers`). For torch's ONNX exporters, which
    warn, log and print their progress and graph dumps."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        quiet_loggers(*prefixes),
    ):
        warnings.simplefilter("ignore")
        yield
