"""The segment DP of latency-driven collapse against brute force on small random instances, and the
rule that withdraws a pruning where an exact merge of the same sites saves as much within noise."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.math.collapse_select import Option, choose, prefer_exact, quantize


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


@st.composite
def _mixed_options(draw):
    options = []
    for index in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, 5))
        options.append(Option(start, draw(st.integers(start + 1, start + 3)), draw(st.integers(-2, 12)),
                              float(draw(st.integers(0, 20))), f"o{index}", exact=draw(st.booleans()),
                              spread=draw(st.integers(0, 4))))
    return options


@settings(max_examples=300, deadline=None)
@given(_mixed_options())
def test_an_inexact_option_stays_only_where_it_saves_measurably_more_than_every_exact_one_over_its_sites(options):
    kept, withdrawn = prefer_exact(options)
    assert kept == [o for o in options if o.label not in withdrawn]  # order kept, exact options never withdrawn
    for option in options:
        overlapping = [e for e in options if e.exact and e.saving > 0 and e.start < option.stop and option.start < e.stop]
        outweighing = [e for e in overlapping if option.saving - e.saving <= max(option.spread, e.spread)]
        if option.exact or not outweighing:
            assert option in kept
        else:
            rival = withdrawn[option.label]
            assert rival in outweighing and rival.saving == max(e.saving for e in outweighing)


def test_a_pruned_block_gives_way_to_its_merge_unless_it_saves_more_than_the_noise():
    # Sites 0..3; site 1 is one block's inner activation: merged (exact) it saves 10, pruned 12;
    # the pruning's probe loss is lower, so without the rule the DP would prune.
    merge = Option(1, 2, 10, 0.5, "merge", spread=3)
    prune = Option(1, 2, 12, 0.1, "prune", exact=False, spread=1)
    other = Option(3, 4, 5, 0.2, "other", exact=False, spread=1)  # no merge of its sites: stays
    assert choose([merge, prune, other], 4, 10).options == (prune,)
    kept, withdrawn = prefer_exact([merge, prune, other])
    assert kept == [merge, other] and withdrawn == {"prune": merge}
    assert choose(kept, 4, 10).options == (merge,)
    # Saving 4 more than the merge, beyond the larger spread (3): the pruning is offered.
    louder = dataclasses.replace(prune, saving=14)
    assert prefer_exact([merge, louder])[0] == [merge, louder]
    # A merge that saves nothing is no rival.
    assert prefer_exact([dataclasses.replace(merge, saving=0), prune])[0] == [dataclasses.replace(merge, saving=0), prune]
