"""The segment DP of latency-driven collapse against brute force on small random instances."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.math.collapse_select import Option, choose, quantize


def _allowed(subset, separate):
    ordered = sorted(subset, key=lambda o: o.start)
    # Runs may not overlap; they may touch only at a separate boundary.
    return all(b.start > a.stop or (b.start == a.stop and b.start in separate) for a, b in zip(ordered, ordered[1:]))


def _brute(options, sites, need, separate):
    """(least loss, chosen) over all allowed subsets of runs saving >= need, or None."""
    usable = [o for o in options if o.saving > 0]
    best = None
    for count in range(len(usable) + 1):
        for subset in itertools.combinations(usable, count):
            ordered = sorted(subset, key=lambda o: o.start)
            if not _allowed(subset, separate):
                continue
            if sum(o.saving for o in subset) < need:
                continue
            loss = sum(o.loss for o in subset)
            if best is None or loss < best[0]:
                best = (loss, ordered)
    return best


@st.composite
def _instances(draw):
    sites = draw(st.integers(1, 7))
    options = []
    for _ in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, sites - 1))
        stop = draw(st.integers(start + 1, min(sites, start + 3)))
        options.append(Option(start, stop, draw(st.integers(-2, 9)), float(draw(st.integers(0, 20)))))
    separate = draw(st.sets(st.integers(1, sites - 1))) if sites > 1 else set()
    return sites, options, draw(st.integers(0, 25)), separate


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_the_dp_finds_the_least_loss_choice_that_meets_the_need(instance):
    sites, options, need, separate = instance
    selection = choose(options, sites, need, separate)
    expected = _brute(options, sites, need, separate)
    chosen = sorted(selection.options, key=lambda o: o.start)
    assert _allowed(chosen, separate)
    assert selection.saving == sum(o.saving for o in chosen)
    assert selection.loss == pytest.approx(sum(o.loss for o in chosen))
    if expected is None:
        assert not selection.feasible
        usable = [o for o in options if o.saving > 0]
        most = max(
            (sum(o.saving for o in s) for n in range(len(usable) + 1) for s in itertools.combinations(usable, n)
             if _allowed(s, separate)),
            default=0,
        )
        assert selection.saving == most
    else:
        assert selection.feasible and selection.saving >= need
        assert selection.loss == pytest.approx(expected[0])


def test_a_block_pair_beats_two_cheaper_singles_when_only_it_saves_enough():
    # Sites 0,1 are one inverted residual: alone neither saves; together they save 5.
    options = [Option(0, 1, 0, 0.1), Option(1, 2, 0, 0.1), Option(0, 2, 5, 1.0), Option(3, 4, 2, 0.2)]
    selection = choose(options, 4, 6)
    assert [(o.start, o.stop) for o in selection.options] == [(0, 2), (3, 4)]
    assert selection.feasible and selection.saving == 7


def test_neighbouring_blocks_touch_only_at_a_separate_boundary():
    options = [Option(0, 2, 3, 1.0), Option(2, 4, 3, 1.0)]
    assert not choose(options, 4, 6).feasible  # site 2 would have to stay
    selection = choose(options, 4, 6, separate={2})
    assert selection.feasible and len(selection.options) == 2


def test_quantize_never_overstates_a_saving():
    assert quantize([0.99, 1.0, 2.5, -0.5], 0.5) == [1, 2, 5, -1]
    with pytest.raises(ValueError):
        quantize([1.0], 0.0)
