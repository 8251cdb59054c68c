"""The segment DP of latency-driven collapse against brute force on small random instances."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.math.collapse_select import Option, choose, quantize


def _brute(options, sites, need):
    """(least loss, chosen) over all subsets of non-touching runs saving >= need, or None."""
    usable = [o for o in options if o.saving > 0]
    best = None
    for count in range(len(usable) + 1):
        for subset in itertools.combinations(usable, count):
            ordered = sorted(subset, key=lambda o: o.start)
            if any(b.start <= a.stop for a, b in zip(ordered, ordered[1:])):
                continue  # overlapping or touching: the site between two runs must stay
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
    return sites, options, draw(st.integers(0, 25))


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_the_dp_finds_the_least_loss_choice_that_meets_the_need(instance):
    sites, options, need = instance
    selection = choose(options, sites, need)
    expected = _brute(options, sites, need)
    chosen = sorted(selection.options, key=lambda o: o.start)
    assert all(b.start > a.stop for a, b in zip(chosen, chosen[1:]))
    assert selection.saving == sum(o.saving for o in chosen)
    assert selection.loss == pytest.approx(sum(o.loss for o in chosen))
    if expected is None:
        assert not selection.feasible
        most = max(
            (sum(o.saving for o in s) for n in range(len(options) + 1) for s in itertools.combinations(
                [o for o in options if o.saving > 0], n)
             if all(b.start > a.stop for a, b in zip(sorted(s, key=lambda o: o.start),
                                                     sorted(s, key=lambda o: o.start)[1:]))),
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


def test_quantize_never_overstates_a_saving():
    assert quantize([0.99, 1.0, 2.5, -0.5], 0.5) == [1, 2, 5, -1]
    with pytest.raises(ValueError):
        quantize([1.0], 0.0)
