"""Batch-1 onnxruntime CPU latency with its spread: the measurement collapse selects by.

:func:`measure` builds one session the way a user deploys it (``ORT_ENABLE_ALL``, weights
pre-packed, ``threads`` intra-op threads), runs it ``warmup`` times, then ``repeats`` rounds of
``runs`` timed runs each. A round's time is its median run; the :class:`Timing` holds every
round, and reports their median and inter-quartile range: a single number from a shared machine
is noise (one eager-torch reading was 0.32 ms merged against 81 ms unmerged), a median with its
spread over at least three rounds says how far to trust it.

:class:`LatencyTable` caches timings by a caller's key (a segment's structure and input shapes),
so identical segments, such as repeated blocks, are measured once per run.
"""

from __future__ import annotations

__all__ = ["LatencyTable", "Timing", "measure", "measure_interleaved"]

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import onnx

from normfold import runtime


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per run: the median of each round (at least three rounds for a spread)."""

    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The first and third quartile of the rounds (both the median when there is one round)."""
        if len(self.rounds) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.rounds, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles
        return q3 - q1

    def to_dict(self) -> dict[str, float | int]:
        q1, q3 = self.quartiles
        return {"median_ms": self.median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "rounds": len(self.rounds)}


def measure(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    runs: int = 50,
    repeats: int = 5,
    warmup: int = 10,
    threads: int = 1,
) -> Timing:
    """The latency of ``model`` on ``feeds`` in onnxruntime with its default optimizations."""
    (timing,) = measure_interleaved([(model, feeds)], runs=runs, repeats=repeats, warmup=warmup, threads=threads)
    return timing


def measure_interleaved(
    models: Sequence[tuple[onnx.ModelProto, dict[str, np.ndarray]]],
    *,
    runs: int = 50,
    repeats: int = 5,
    warmup: int = 10,
    threads: int = 1,
) -> list[Timing]:
    """The latency of each ``(model, feeds)``, their rounds taken in turn.

    On a shared machine the load drifts between two measurements made one after the other (two
    sessions of one model differed by 6%, more than either's spread); rounds taken in turn see
    the same load, so the ratio of two models' medians is what to compare.
    """
    if repeats < 1 or runs < 1:
        raise ValueError("measure needs at least one round of one run")
    sessions = [(runtime.session(model, optimize=True, threads=threads), feeds) for model, feeds in models]
    for session, feeds in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    rounds: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for index, (session, feeds) in enumerate(sessions):
            timings = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                timings.append(time.perf_counter() - start)
            rounds[index].append(statistics.median(timings) * 1e3)
    return [Timing(tuple(r)) for r in rounds]


class LatencyTable:
    """Timings by key: ``get(key, build)`` measures ``build()``'s ``(model, feeds)`` once per key."""

    def __init__(self, *, runs: int = 50, repeats: int = 5, warmup: int = 10, threads: int = 1) -> None:
        self.settings = {"runs": runs, "repeats": repeats, "warmup": warmup, "threads": threads}
        self.timings: dict[Hashable, Timing] = {}

    def get(self, key: Hashable, build: Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]) -> Timing:
        if key not in self.timings:
            model, feeds = build()
            self.timings[key] = measure(model, feeds, **self.settings)
        return self.timings[key]

    def __len__(self) -> int:
        return len(self.timings)
