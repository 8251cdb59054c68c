"""The sampling error of an accuracy difference measured on one evaluation set.

A collapse step is kept while its validation accuracy stays within ``max_accuracy_drop`` of the
dense model's. Both accuracies are means over the same samples, so their difference is a mean of
paired per-sample differences ``d_i = s_i − r_i`` (per-sample scores, 1/0 for correct/wrong), and
its standard error is ``std(d, ddof=1) / sqrt(n)``: only the samples on which the two models
disagree contribute. On a small set that error is of the order of the drop allowed (360 digits
validation samples: 20 disagreements give 1.2 points), so a step that merely lands above the
floor may lie a point or more below it on other data (measured: torchvision's MobileNetV2 on
digits, a step at −0.83 validation points was −3.6 on the test set).
"""

from __future__ import annotations

__all__ = ["paired_standard_error"]

import numpy as np


def paired_standard_error(scores: np.ndarray, reference: np.ndarray) -> float:
    """Standard error of ``mean(scores) − mean(reference)``, per-sample scores paired by index."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if scores.shape != reference.shape:
        raise ValueError(f"paired scores need one value per sample each, not {scores.shape} and {reference.shape}")
    if scores.size < 2:
        return 0.0
    return float(np.std(scores - reference, ddof=1) / np.sqrt(scores.size))
