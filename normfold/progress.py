"""Progress on stderr for the steps of a long job, and how long and how much memory each took.

Users of billion-parameter models see where the time goes: each step (load, each pass, check,
verification runs, save) gets a line on stderr once it has run for a second (``DELAY``), a bar
when its size is known (bytes written, inference runs) and a ticking clock otherwise. Steps
that end sooner print nothing. ``tqdm`` switches itself off when stderr is not a terminal (CI
logs stay clean); ``enabled=False`` (the CLI's ``--quiet``) silences it always.

Memory is measured without disturbing the process's own high-water mark (which a parent's
``wait4`` reports, so resetting it would make normfold look smaller than it is to a
benchmark): a step's ``peak_rss_mb`` is the kernel's exact high-water mark when the step raised
it, and otherwise the largest resident size sampled every ``SAMPLE_SECONDS`` during the step
(a lower bound of a peak that was no new high for the process).
"""

from __future__ import annotations

__all__ = ["DELAY", "SAMPLE_SECONDS", "Steps", "process_peak_rss_mb"]

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from tqdm import tqdm

try:
    import resource
except ImportError:  # Windows: no high-water mark; the sampled sizes still count
    resource = None  # type: ignore[assignment]



class _Bar(tqdm):
    """tqdm without what its first bar starts: its monitor thread (``_Monitor`` below redraws
    our lines) and a multiprocessing lock (one process writes these lines). Both cost a job
    ~10-30 ms of start-up, quiet or not: a disabled bar creates them too."""

    monitor_interval = 0


_Bar.set_lock(threading.RLock())

# A step shorter than this prints nothing.
DELAY = 1.0
SAMPLE_SECONDS = 0.05
_MB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_peak_rss_mb() -> float:
    """The process's peak resident set size so far (the kernel's high-water mark), in MB."""
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE / _MB
    except (OSError, IndexError, ValueError):
        return None


class Steps:
    """Named steps of one job: a progress line per slow step, ``seconds`` and ``peak_rss_mb``.

    ``names`` (optional) are the steps the job expects, so each line says ``[k/n]``. A step
    may be entered again (a later save): its seconds add up and its peak is the larger one.
    """

    def __init__(self, names: Sequence[str] = (), *, enabled: bool, file: TextIO | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._names = list(names)
        self._enabled = enabled
        self._file = file

    @contextlib.contextmanager
    def step(
        self,
        name: str,
        *,
        label: str | None = None,
        total: float | None = None,
        unit: str = "it",
        show: bool = True,
    ) -> Iterator[tqdm]:
        """Time and measure the block; yields its bar (``bar.update(n)`` for work of known
        ``total``). ``label`` is shown instead of ``name``; ``show=False`` keeps the step off
        stderr (for a step that shows its own progress)."""
        label = label or name
        if name in self._names:
            label = f"[{self._names.index(name) + 1}/{len(self._names)}] {label}"
        bar = _Bar(
            total=total,
            desc=label,
            unit=unit,
            unit_scale=unit == "B",
            unit_divisor=1024 if unit == "B" else 1000,
            file=self._file or sys.stderr,
            disable=None if self._enabled and show else True,
            delay=DELAY,
            leave=True,
            dynamic_ncols=True,
            bar_format=None if total is not None else "{desc} [{elapsed}]",
        )
        start_peak = process_peak_rss_mb()
        monitor = _Monitor(bar)
        start = time.perf_counter()
        try:
            yield bar
        finally:
            elapsed = time.perf_counter() - start
            sampled = monitor.stop()
            end_peak = process_peak_rss_mb()
            peak = end_peak if end_peak > start_peak else sampled
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self.peak_rss_mb[name] = round(max(self.peak_rss_mb.get(name, 0.0), peak), 1)
            bar.close()

    def close(self) -> None:
        """End the job's progress (each step already cleaned up after itself)."""


class _Monitor:
    """For one step, on a daemon thread: samples the resident size every ``SAMPLE_SECONDS`` and
    redraws the step's line so its clock ticks even while a pass reports no progress (tqdm
    only redraws on update)."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar
        self._peak = _current_rss_mb() or 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="normfold-progress", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        """Stop watching; the largest resident size seen, in MB."""
        self._stopped.set()
        self._thread.join()
        return max(self._peak, _current_rss_mb() or 0.0)

    def _watch(self) -> None:
        bar = self._bar
        while not self._stopped.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, _current_rss_mb() or 0.0)
            now = time.time()
            if not bar.disable and now >= bar.start_t + DELAY:
                # refresh, not update(0): update's counter arithmetic is not thread-safe.
                bar.refresh()
                bar.last_print_t = now
