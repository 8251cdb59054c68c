"""normfold.math.paired_accuracy: the standard error of a paired accuracy difference."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normfold.math.paired_accuracy import paired_standard_error


def test_only_disagreements_count():
    # d = (0, 1, -1, 0): sample variance 2/3, over 4 samples
    assert paired_standard_error(np.array([1, 1, 0, 1]), np.array([1, 0, 1, 1])) == pytest.approx(
        math.sqrt(2 / 3) / 2, rel=1e-15)
    assert paired_standard_error(np.ones(50), np.ones(50)) == 0.0
    assert paired_standard_error(np.array([0.0]), np.array([1.0])) == 0.0  # one sample: no spread to estimate


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=200))
def test_matches_the_sample_standard_deviation_of_the_differences(pairs):
    scores, reference = (np.array(column, dtype=np.float64) for column in zip(*pairs))
    expected = statistics.stdev([float(a) - float(b) for a, b in pairs]) / math.sqrt(len(pairs))
    assert paired_standard_error(scores, reference) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_unpaired_scores_are_a_bug():
    with pytest.raises(ValueError, match="one value per sample"):
        paired_standard_error(np.ones(3), np.ones(4))
