"""Whether test looks like val, from the model's scores alone: the KS test and the EM class prior."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.evaluate.shift import estimated_prior, shift_document


def _posteriors(n: int, prior1: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated two-class posteriors under a training prior of 0.5, for images drawn with ``prior1``."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < prior1).astype(np.int64)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)  # class-conditional scores
    p1 = 1 / (1 + np.exp(-2 * x))  # the exact posterior at a 0.5 prior
    return y, np.stack([1 - p1, p1], axis=1)


def test_em_recovers_the_class_prior_of_unlabelled_images():
    _, probs = _posteriors(20000, 0.8, 0)
    prior = estimated_prior(probs, np.array([0.5, 0.5]))
    assert prior[1] == pytest.approx(0.8, abs=0.02)
    assert probs[:, 1].mean() < 0.75  # the plain mean of the posteriors would underestimate it


def test_a_test_split_like_val_is_said_to_be_alike_and_a_shifted_one_is_not():
    y_val, val = _posteriors(3000, 0.5, 1)
    _, alike = _posteriors(3000, 0.5, 2)
    same = shift_document(val, y_val, alike, ["normal", "pneumonia"])
    assert not same["test_unlike_val"] and same["statement"].startswith("The test split looks like val")
    _, shifted = _posteriors(3000, 0.8, 3)
    moved = shift_document(val, y_val, shifted, ["normal", "pneumonia"])
    assert moved["test_unlike_val"] and moved["statement"].startswith(
        "Caution: the test split looks unlike val"
    )
    assert moved["test_prior_estimated"]["pneumonia"] == pytest.approx(0.8, abs=0.03)
    assert moved["val_prior"]["pneumonia"] == pytest.approx(y_val.mean())
