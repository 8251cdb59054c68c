"""Silencing other libraries' log lines for a block of code.

normfold reports problems itself, in one line; the libraries it calls (torch's exporter,
onnxscript, onnx_ir) log their own view of the same event, which would repeat or bury it.
"""

from __future__ import annotations

__all__ = ["quiet_command", "quiet_loggers", "silenced"]

import contextlib
import io
import logging
import os
import sys
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
    to ``sys.stdout`` and ``sys.stderr`` is dropped, and so is what native code writes to file
    descriptors 1 and 2; the loggers named ``prefix`` or ``prefix.*`` log errors only
    (:func:`quiet_loggers`). For torch's ONNX exporters, which warn, log and print their
    progress and graph dumps (the TorchScript exporter's C++ log, for one, is always on in torch
    2.13: ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``, not its value,
    and writes the whole graph to stderr when an op fails to export)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        _native_output_dropped(),
        quiet_loggers(*prefixes),
    ):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _native_output_dropped() -> Iterator[None]:
    """File descriptors 1 and 2 point at the null device within the block."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def quiet_command(debug: bool) -> Iterator[None]:
    """The command line's rule: normfold's one line is all stderr shows, unless ``debug``.

    Within the block, Python warnings are ignored and no logger (normfold's, onnx_ir's,
    onnxscript's, torch's) prints below CRITICAL; onnxruntime's C++ logger is set in
    :mod:`normfold.runtime`. With ``debug``, everything prints, onnxruntime's warnings too.
    """
    if debug:
        from normfold import runtime

        previous_severity, runtime.LOG_SEVERITY = runtime.LOG_SEVERITY, 2
        try:
            yield
        finally:
            runtime.LOG_SEVERITY = previous_severity
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.ERROR)
        try:
            yield
        finally:
            logging.disable(previous)
