"""Tests for the point metrics: confusion counts, probability metrics, calibration and curve points."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from evaluate_cases import BIN_PROBS, BIN_Y, TRI_PROBS, TRI_Y, softmax_data
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    precision_recall_fscore_support,
)

from tlpipe.evaluate.document import classification_metrics
from tlpipe.evaluate.metrics import (
    brier_per_image,
    calibration_table,
    confusion_counts,
    confusion_metrics,
    expected_calibration_error,
    log_loss_per_image,
    pr_points,
    ranking_metrics,
    roc_points,
)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_confusion_metrics_match_sklearn(n_classes: int) -> None:
    y, probs = softmax_data(300, n_classes, seed=n_classes)
    pred = probs.argmax(axis=1)
    m = confusion_metrics(confusion_counts(y, pred, n_classes))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=average, zero_division=0)
        assert [m[f"{average}_precision"], m[f"{average}_recall"], m[f"{average}_f1"]] == pytest.approx(
            [p, r, f]
        )
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(n_classes)), zero_division=0)
    assert m["precision"] == pytest.approx(p) and m["recall"] == pytest.approx(r)
    assert m["f1"] == pytest.approx(f) and m["support"] == pytest.approx(s)
    if n_classes == 2:
        assert m["sensitivity"] == pytest.approx(r[1]) and m["specificity"] == pytest.approx(r[0])


def test_confusion_metrics_with_a_class_absent_match_sklearn() -> None:
    # class 2 never occurs but is predicted once: its recall is 0 in macro figures (sklearn's
    # zero_division=0) and balanced accuracy averages the present classes only
    y, pred = np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0])
    m = confusion_metrics(confusion_counts(y, pred, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the absent class
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        p, r, f, _ = precision_recall_fscore_support(
            y, pred, labels=[0, 1, 2], average="macro", zero_division=0
        )
    assert [m["macro_precision"], m["macro_recall"], m["macro_f1"]] == pytest.approx([p, r, f])


def test_confusion_counts_with_weights_are_the_resampled_matrix() -> None:
    weights = np.array([[2.0, 0.0, 1.0, 1.0, 1.0]])
    counts = confusion_counts(BIN_Y, BIN_PROBS.argmax(axis=1), 2, weights)
    drawn = np.repeat(np.arange(5), [2, 0, 1, 1, 1])
    assert counts[0].tolist() == confusion_counts(BIN_Y[drawn], BIN_PROBS.argmax(axis=1)[drawn], 2).tolist()


def test_log_loss_stays_finite_on_a_confident_mistake() -> None:
    losses = log_loss_per_image(np.array([1, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isfinite(losses).all() and losses[0] > 30 and losses[1] == 0.0


def test_brier_is_on_class_1_for_two_classes_and_summed_over_classes_for_more() -> None:
    # two classes: on P(class 1); three: summed over classes
    assert brier_per_image(np.array([1, 0]), np.array([[0.3, 0.7], [0.6, 0.4]])) == pytest.approx(
        [0.09, 0.16]
    )
    three = brier_per_image(np.array([2]), np.array([[0.2, 0.3, 0.5]]))
    assert three == pytest.approx([0.04 + 0.09 + 0.25])


def test_calibration_table_and_ece_by_hand() -> None:
    # top-class confidence 0.9 (right), 0.85 (wrong), 0.7 (right), 0.55 (wrong); five bins of 0.2
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55]])
    table = calibration_table(y, probs, bins=5)
    assert [r["bin"] for r in table] == ["0.4-0.6", "0.6-0.8", "0.8-1"]  # empty bins left out
    assert [r["count"] for r in table] == [1, 1, 2]
    assert [r["confidence"] for r in table] == pytest.approx([0.55, 0.7, 0.875])
    assert [r["accuracy"] for r in table] == pytest.approx([0.0, 1.0, 0.5])
    # sum of count/n * |accuracy - confidence| = (0.55 + 0.3 + 2 * 0.375) / 4
    assert expected_calibration_error(table) == pytest.approx(0.4)
    assert classification_metrics(y, probs, ["a", "b"], calibration_bins=5)["ece"] == pytest.approx(0.4)


def test_calibration_bins_are_right_closed_and_hold_certainty() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    table = calibration_table(np.array([0, 0]), probs, bins=2)
    assert [(r["bin"], r["count"]) for r in table] == [("0-0.5", 1), ("0.5-1", 1)]


def test_ranking_metrics_for_three_classes_match_sklearn_per_class_mean() -> None:
    m = ranking_metrics(TRI_Y, TRI_PROBS)
    per_class = [average_precision_score(i == TRI_Y, TRI_PROBS[:, i]) for i in range(3)]
    assert m["pr_auc"] == pytest.approx(np.mean(per_class))


def test_roc_points_binary_has_only_the_positive_class() -> None:
    curves = roc_points(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert list(curves) == ["pos"]
    points = curves["pos"]
    assert points[0] == {"fpr": 0.0, "tpr": 0.0}
    assert points[-1] == {"fpr": 1.0, "tpr": 1.0}
    assert {"fpr": 0.0, "tpr": 0.5} in points  # 0.8 alone above every negative
    fprs = [p["fpr"] for p in points]
    assert fprs == sorted(fprs)


def test_roc_points_one_curve_per_present_class() -> None:
    assert list(roc_points(TRI_Y, TRI_PROBS, ["a", "b", "c"])) == ["a", "b", "c"]
    assert list(roc_points(np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"])) == ["a", "b"]
    assert roc_points(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]]), ["n", "p"]) == {}


def test_pr_points_cover_the_positive_class_with_recall_rising() -> None:
    curves = pr_points(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert list(curves) == ["pos"]
    # thresholds 0.8, 0.7, 0.6, ...: (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3), ...
    points = [(p["recall"], p["precision"]) for p in curves["pos"]]
    assert (0.5, 1.0) in points and (1.0, pytest.approx(2 / 3)) in points
    assert points[0] == (0.0, 1.0)
    recalls = [r for r, _ in points]
    assert recalls == sorted(recalls)
    assert list(pr_points(np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"])) == ["a", "b"]
