"""Progress on stderr for the steps of a long job, and how long each one took.

A bar over the job's known steps (load, each pass, check, verify, save): users of billion-
parameter models see where the time goes. ``tqdm`` switches itself off when stderr is not a
terminal (CI logs stay clean); ``enabled=False`` (the CLI's ``--quiet``) silences it always.
"""

from __future__ import annotations

__all__ = ["Steps"]

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm


class Steps:
    """A progress bar over named steps that also times them (``seconds``)."""

    def __init__(self, names: Sequence[str], *, enabled: bool) -> None:
        self.seconds: dict[str, float] = {}
        self._bar = tqdm(
            total=len(names),
            file=sys.stderr,
            disable=None if enabled else True,
            leave=False,
            bar_format="{desc:<24} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]",
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._bar.set_description_str(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
