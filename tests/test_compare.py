"""normfold.verification.compare: verify's rule on outputs computed elsewhere (a torch module's).

The same rule as ``normfold verify`` (tests/test_verify.py): scale-relative tolerances by dtype,
NaN and ±Inf at the same positions, shapes and dtypes equal, integers exact; a candidate that
did not run, or has outputs the reference lacks, fails with the reason.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from normfold.errors import InputError
from normfold.verification import compare


def _outputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((2, 5)).astype(np.float32), "ids": np.arange(4, dtype=np.int64)}


def test_equal_outputs_pass_with_verify_s_tolerances() -> None:
    reference = [_outputs(0), _outputs(1)]
    candidate = [{k: v.copy() for k, v in sample.items()} for sample in reference]
    candidate[1]["logits"] += np.float32(1e-6)
    report = compare(reference, candidate, input_shapes={"x": (2, 3)})
    assert report.passed and report.samples == 2 and report.input_shapes == {"x": (2, 3)}
    assert report.outputs["logits"].rtol == 1e-4 and report.outputs["ids"].rtol == 0
    assert 0 < report.outputs["logits"].max_abs_error < 2e-6 and report.outputs["ids"].max_abs_error == 0


def test_beyond_tolerance_nan_and_integer_differences_fail() -> None:
    reference = [_outputs()]
    far = {k: v.copy() for k, v in reference[0].items()}
    far["logits"][0, 0] += 1.0
    report = compare(reference, [far])
    assert not report.passed and "max abs error" in report.outputs["logits"].problem
    nan = {k: v.copy() for k, v in reference[0].items()}
    nan["logits"][1, 1] = np.nan
    assert "NaN at 1 position" in compare(reference, [nan]).outputs["logits"].problem
    ids = {k: v.copy() for k, v in reference[0].items()}
    ids["ids"][0] = 7
    assert "must be equal" in compare(reference, [ids]).outputs["ids"].problem
    # NaN where the reference has NaN too is no error.
    both = [{"y": np.array([np.nan, 1.0], np.float32)}]
    assert compare(both, [{"y": np.array([np.nan, 1.0], np.float32)}]).passed


def test_a_candidate_that_did_not_run_or_adds_outputs_fails_with_the_reason() -> None:
    reference = [_outputs()]
    report = compare(reference, None, problems=["fails to run in onnxruntime: boom"])
    assert not report.passed and report.problems == ["fails to run in onnxruntime: boom"]
    assert report.outputs["logits"].problem == "not compared: the candidate did not run"
    assert math.isnan(report.max_abs_error)
    extra = {**reference[0], "other": np.zeros(1, np.float32)}
    assert compare(reference, [extra]).problems == ["output 'other' of the candidate is not an output of the reference"]
    assert "FAILED" in compare(reference, [extra]).format_table()


def test_no_reference_samples_is_an_input_error() -> None:
    with pytest.raises(InputError, match="at least one sample"):
        compare([], [])
