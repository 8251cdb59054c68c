"""Which activations to remove under a latency budget: a dynamic program over segments.

The activation sites of a network, in graph order, are ``0 … n−1``. An :class:`Option` removes
the run of consecutive sites ``[start, stop)`` at once, which lets the layers between the sites
that stay (``start − 1`` and ``stop``) merge into one op; it *saves* ``saving`` units of cost
(measured latency of the merged segment against the unmerged one, or MACs) and is predicted to
cost ``loss`` (the calibration loss the removal adds). As in Kim et al., "Efficient Latency-Aware
CNN Depth Compression via Two-Stage Dynamic Programming" (ICML 2023), options are chosen so that:

1. no two chosen runs overlap, and two runs touch (one ends at site ``b``, the next starts there)
   only at a boundary ``b`` in ``separate``: elsewhere a site between them stays, so each run's
   segment is bounded by kept activations and the savings add up. A caller marks a boundary
   separate when the layers between sites ``b − 1`` and ``b`` cannot merge through it anyway
   (a residual stream that fans out, as between two inverted residuals), so removing both sides
   merges each side as it would alone;
2. the total saving is at least ``need``;
3. among those choices, the total loss is the least (ties: the larger saving, then fewer runs).

An option whose saving is not positive is never chosen.

Exact against inexact removals (:func:`prefer_exact`): an option is *exact* when its removal
keeps every weight in a merged layer (a merge), *inexact* when it drops weights (a pruned
residual branch, LayerMerge). The loss of either is predicted before fine-tuning, when a merged
block still has all its weights to recover with and a pruned one has none; and savings are
timings, which carry noise (``spread``: the larger inter-quartile range of the two timings a
saving is the difference of). So an inexact option is offered only where it measurably saves
more than every exact option over the same sites: it is withdrawn when an exact option whose
run overlaps its run saves at least its saving less the larger spread of the two.

:func:`choose` solves it exactly for integer savings (callers quantize latencies, see
:func:`quantize`) in ``O(n · options · need)``: ``best[i][s]`` is the least loss of a choice among
the first ``i`` sites whose saving, capped at ``need``, is ``s``; a run ``[a, b)`` extends the
choices over the first ``a − 1`` sites (site ``a − 1`` kept), or over the first ``a`` when ``a``
is a separate boundary. When no choice saves ``need``, the choice
saving the most is returned with ``feasible`` False.
"""

from __future__ import annotations

__all__ = ["Option", "Selection", "choose", "prefer_exact", "quantize"]

import dataclasses
import math
from collections.abc import Collection, Sequence


@dataclasses.dataclass(frozen=True)
class Option:
    """Remove sites ``start … stop−1`` together: saves ``saving`` (integer units), adds ``loss``.

    ``exact``: whether the removal keeps every weight (a merge) rather than dropping some (a
    pruning); ``spread``: the noise of ``saving`` in the same units (0 for counted MACs).
    """

    start: int
    stop: int
    saving: int
    loss: float
    label: str = ""
    exact: bool = True
    spread: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"an option removes a non-empty run of sites, not [{self.start}, {self.stop})")
        if self.spread < 0:
            raise ValueError(f"a saving's spread is not negative, not {self.spread}")


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen options (in site order), their total saving and loss, whether ``need`` is met."""

    options: tuple[Option, ...]
    saving: int
    loss: float
    feasible: bool


def quantize(values: Sequence[float], unit: float) -> list[int]:
    """``values`` in whole ``unit``s, rounded down (a saving is never overstated)."""
    if unit <= 0:
        raise ValueError(f"the unit must be positive, not {unit}")
    return [math.floor(v / unit) for v in values]


def prefer_exact(options: Sequence[Option]) -> tuple[list[Option], dict[str, Option]]:
    """``options`` less the inexact ones an overlapping exact option saves as much as (rule above).

    Returns the options kept (in their order) and, for each withdrawn option's label, the exact
    option that outweighs it (the one saving the most among those that do).
    """
    exact = [o for o in options if o.exact and o.saving > 0]
    kept: list[Option] = []
    withdrawn: dict[str, Option] = {}
    for option in options:
        rivals = [] if option.exact else [
            e for e in exact
            if e.start < option.stop and option.start < e.stop
            and option.saving - e.saving <= max(option.spread, e.spread)
        ]
        if rivals:
            withdrawn[option.label] = max(rivals, key=lambda e: (e.saving, -e.loss))
        else:
            kept.append(option)
    return kept, withdrawn


def choose(options: Sequence[Option], sites: int, need: int, separate: Collection[int] = ()) -> Selection:
    """The least-loss choice of runs over ``sites`` sites saving at least ``need`` (rules above)."""
    usable = [o for o in options if o.saving > 0 and o.stop <= sites]
    need = max(int(need), 0)
    # Without a need, nothing has to be removed: the empty choice is optimal.
    if need == 0:
        return Selection((), 0, 0.0, True)
    separate = frozenset(separate)
    cap = need
    # Keys: (loss, -saving, runs) compared lexicographically; entries: (key, options).
    worst = (math.inf, 0, 0)
    best: list[list[tuple[tuple[float, int, int], tuple[Option, ...]]]] = [
        [(worst, ())] * (cap + 1) for _ in range(sites + 1)
    ]
    best[0][0] = ((0.0, 0, 0), ())
    by_stop: dict[int, list[Option]] = {}
    for option in usable:
        by_stop.setdefault(option.stop, []).append(option)
    for i in range(1, sites + 1):
        row = best[i]
        # Site i-1 is kept (or ends no run): every choice over the first i-1 sites carries over.
        for s, entry in enumerate(best[i - 1]):
            if entry[0] < row[s][0]:
                row[s] = entry
        for option in by_stop.get(i, ()):
            # The site before the run stays (extend choices over the first start-1 sites), or
            # the run may touch the one before it at a separate boundary.
            before = best[option.start if option.start in separate else max(option.start - 1, 0)]
            for s, (key, chosen) in enumerate(before):
                if key[0] == math.inf:
                    continue
                total = min(cap, s + option.saving)
                new_key = (key[0] + option.loss, key[1] - option.saving, key[2] + 1)
                if new_key < row[total][0]:
                    row[total] = (new_key, chosen + (option,))
    key, chosen = best[sites][cap]
    if key[0] < math.inf:
        return Selection(chosen, -key[1], key[0], True)
    return _most_saving(usable, sites, separate)


def _most_saving(options: Sequence[Option], sites: int, separate: frozenset[int]) -> Selection:
    """The allowed choice of runs with the largest total saving (ties: least loss)."""
    # best[i] = (saving, -loss, options) over the first i sites.
    best: list[tuple[int, float, tuple[Option, ...]]] = [(0, 0.0, ())] * (sites + 1)
    by_stop: dict[int, list[Option]] = {}
    for option in options:
        by_stop.setdefault(option.stop, []).append(option)
    for i in range(1, sites + 1):
        candidates = [best[i - 1]]
        for option in by_stop.get(i, ()):
            saving, negative_loss, chosen = best[option.start if option.start in separate else max(option.start - 1, 0)]
            candidates.append((saving + option.saving, negative_loss - option.loss, chosen + (option,)))
        best[i] = max(candidates, key=lambda c: (c[0], c[1]))
    saving, negative_loss, chosen = best[sites]
    return Selection(chosen, saving, -negative_loss, False)
