"""Tests for the bootstrap: resample weights, weighted ranking metrics and percentile intervals."""

from __future__ import annotations

import time

import numpy as np
import pytest
from evaluate_cases import softmax_data
from sklearn.metrics import average_precision_score, roc_auc_score

from tlpipe.evaluate.bootstrap import (
    bootstrap_samples,
    confidence_intervals,
    resample_weights,
    weighted_average_precision,
    weighted_ece,
    weighted_roc_auc,
)
from tlpipe.evaluate.document import classification_metrics
from tlpipe.evaluate.metrics import calibration_table, expected_calibration_error
from tlpipe.evaluate.thresholds import predicted_labels


def test_weighted_ranking_metrics_match_sklearn_on_the_resample() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(150), 1)  # rounded: plenty of ties
    positives = rng.random(150) < 0.4
    weights = rng.integers(0, 3, (4, 150)).astype(float)
    auc = weighted_roc_auc(scores, positives, weights)
    ap = weighted_average_precision(scores, positives, weights)
    for row in range(4):
        drawn = np.repeat(np.arange(150), weights[row].astype(int))
        assert auc[row] == pytest.approx(roc_auc_score(positives[drawn], scores[drawn]))
        assert ap[row] == pytest.approx(average_precision_score(positives[drawn], scores[drawn]))


def test_weighted_ranking_metrics_are_nan_when_undefined() -> None:
    scores, positives = np.array([0.2, 0.8]), np.array([False, True])
    only_negative = np.array([[2.0, 0.0]])
    assert np.isnan(weighted_roc_auc(scores, positives, only_negative)).all()
    assert np.isnan(weighted_average_precision(scores, positives, only_negative)).all()


def test_resample_weights_draw_n_images_each_in_chunks(monkeypatch) -> None:
    from tlpipe.evaluate import bootstrap

    whole = np.vstack(list(resample_weights(50, 30, np.random.default_rng(0))))
    monkeypatch.setattr(bootstrap, "_BOOTSTRAP_CELLS", 50 * 7)  # 7 resamples per chunk
    chunks = list(resample_weights(50, 30, np.random.default_rng(0)))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    assert whole.shape == (30, 50) and (whole.sum(axis=1) == 50).all()
    assert (np.vstack(chunks).sum(axis=1) == 50).all()


@pytest.mark.parametrize("n_classes", [2, 3])
def test_confidence_intervals_contain_the_estimate_and_narrow_with_more_images(n_classes: int) -> None:
    widths = {}
    for n in (100, 2000):
        y, probs = softmax_data(n, n_classes, seed=n)
        pred = probs.argmax(axis=1)
        point = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
        ci = confidence_intervals(y, probs, pred, resamples=500, level=0.95, seed=0)
        expected = {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "roc_auc",
            "pr_auc",
            "log_loss",
            "brier",
            "ece",
        }
        assert set(ci) == expected | ({"sensitivity", "specificity"} if n_classes == 2 else set())
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, name
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
    for name in widths[100]:
        # the width shrinks like 1/sqrt(n): a factor of about 4.5 here
        assert widths[2000][name] < 0.4 * widths[100][name], name


def test_bootstrap_is_seeded() -> None:
    y, probs = softmax_data(80, 3, seed=1)
    pred = probs.argmax(axis=1)
    first = confidence_intervals(y, probs, pred, 200, 0.95, seed=7)
    assert confidence_intervals(y, probs, pred, 200, 0.95, seed=7) == first
    assert confidence_intervals(y, probs, pred, 200, 0.95, seed=8) != first
    assert confidence_intervals(y, probs, pred, 0, 0.95, seed=7) == {}


def test_bootstrap_skips_resamples_where_a_metric_is_undefined() -> None:
    # one positive in ten images: about (9/10)^10 = 35% of resamples hold no positive at all
    y = np.array([0] * 9 + [1])
    p1 = np.linspace(0.1, 0.9, 10)
    probs = np.column_stack([1 - p1, p1])
    pred = predicted_labels(probs, 0.5)
    samples = bootstrap_samples(y, probs, pred, 1000, seed=0)
    undefined = np.isnan(samples["sensitivity"]).mean()
    assert 0.25 < undefined < 0.45
    assert np.isnan(samples["roc_auc"]).mean() == pytest.approx(undefined)
    assert not np.isnan(samples["specificity"]).any() and not np.isnan(samples["accuracy"]).any()
    ci = confidence_intervals(y, probs, pred, 1000, 0.95, seed=0)
    assert ci["sensitivity"] == [1.0, 1.0]  # the one positive is always called positive
    assert 0 <= ci["roc_auc"][0] <= ci["roc_auc"][1] <= 1


def test_bootstrap_of_a_thousand_images_takes_seconds() -> None:
    y, probs = softmax_data(1000, 3, seed=2)
    start = time.perf_counter()
    confidence_intervals(y, probs, probs.argmax(axis=1), 1000, 0.95, seed=0)
    assert time.perf_counter() - start < 5


def test_weighted_ece_with_every_image_once_is_the_point_estimate() -> None:
    y, probs = softmax_data(300, 3, seed=4)
    once = np.ones((1, len(y)))
    table = calibration_table(y, probs, 10)
    assert weighted_ece(once, probs, y, 10)[0] == pytest.approx(expected_calibration_error(table))
    twice_first = once.copy()
    twice_first[0, :150] = 2  # the first half counted twice: the table of the repeated images
    doubled = np.concatenate([y[:150], y])
    doubled_probs = np.concatenate([probs[:150], probs])
    expected = expected_calibration_error(calibration_table(doubled, doubled_probs, 10))
    assert weighted_ece(twice_first, probs, y, 10)[0] == pytest.approx(expected)
