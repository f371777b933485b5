"""Tests for the test-split metrics, thresholds, confidence intervals and the evaluate stage."""

from __future__ import annotations

import csv
import json
import os
import re
import time
import warnings
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from augmented_fixture import make_augmented
from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.evaluation import (
    bootstrap_samples,
    brier_per_image,
    calibration_table,
    choose_threshold,
    classification_metrics,
    confidence_intervals,
    confusion_counts,
    confusion_metrics,
    evaluate,
    evaluation_metrics,
    expected_calibration_error,
    flat_metrics,
    log_loss_per_image,
    metric_key,
    operating_points,
    pr_points,
    predicted_labels,
    ranking_metrics,
    resample_weights,
    roc_points,
    target_sensitivity_threshold,
    threshold_table,
    weighted_average_precision,
    weighted_roc_auc,
    youden_threshold,
)

# y = [0, 0, 0, 1, 1] with P(class 1) below: predictions [0, 0, 1, 1, 1]
BIN_Y = np.array([0, 0, 0, 1, 1])
BIN_P1 = np.array([0.1, 0.3, 0.7, 0.8, 0.6])
BIN_PROBS = np.column_stack([1 - BIN_P1, BIN_P1])

# y = [0, 0, 1, 1, 2, 2]; argmax predictions [0, 1, 1, 2, 2, 0]
TRI_Y = np.array([0, 0, 1, 1, 2, 2])
TRI_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.4, 0.3],
        [0.2, 0.6, 0.2],
        [0.1, 0.3, 0.6],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)

# val: negatives score 0.1, 0.4, 0.6 and positives 0.35, 0.7, 0.8. Thresholds from the top,
# (sensitivity, specificity): 0.8 (1/3, 1), 0.7 (2/3, 1), 0.6 (2/3, 2/3), 0.4 (2/3, 1/3),
# 0.35 (1, 1/3), 0.1 (1, 0); Youden's J = sens + spec - 1 peaks at 2/3 at 0.7
VAL_Y = np.array([0, 0, 0, 1, 1, 1])
VAL_P1 = np.array([0.1, 0.4, 0.6, 0.35, 0.7, 0.8])


def _softmax_data(n: int, n_classes: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class probabilities a moderately good classifier would give."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


# ------------------------------------------------------------------ point metrics


def test_binary_metrics_by_hand() -> None:
    m = classification_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["n_test"] == 5
    assert m["per_class"]["neg"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_class"]["pos"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["macro_f1"] == pytest.approx(0.8)
    assert m["weighted_f1"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(1.0) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    # positives score 0.8 and 0.6 against negatives 0.1, 0.3, 0.7: 5 of 6 pairs ranked right
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # ranked 0.8+ 0.7- 0.6+ ...: precision 1 at recall 1/2, then 2/3 at recall 1
    assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m["brier"] == pytest.approx((0.01 + 0.09 + 0.49 + 0.04 + 0.16) / 5)
    assert m["log_loss"] == pytest.approx(-np.log([0.9, 0.7, 0.3, 0.8, 0.6]).mean())
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    assert not any(k.startswith("top_") for k in m)  # top-2 of two classes is always right
    json.dumps(m, allow_nan=False)  # plain Python types only: it is written as metrics.json


def test_three_class_metrics_by_hand() -> None:
    m = classification_metrics(TRI_Y, TRI_PROBS, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    for cls in "abc":
        assert m["per_class"][cls] == pytest.approx(
            {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
        )
    assert m["macro_f1"] == pytest.approx(0.5)
    # one-vs-rest pairs ranked right out of 2x4: a 7, b 7, c 6.5 (a tie counts half); macro average
    assert m["roc_auc"] == pytest.approx((7 / 8 + 7 / 8 + 6.5 / 8) / 3)
    assert "top_2_accuracy" in m  # checked by hand below, on rows without ties
    assert "sensitivity" not in m and "specificity" not in m
    # Brier: sum over classes of squared error to one-hot, averaged over images
    onehot = np.eye(3)[TRI_Y]
    assert m["brier"] == pytest.approx(((TRI_PROBS - onehot) ** 2).sum(axis=1).mean())


def test_uneven_per_class_metrics() -> None:
    # true [0, 1, 2, 2], predicted [0, 0, 2, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    m = classification_metrics(np.array([0, 1, 2, 2]), probs, ["a", "b", "c"])
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0 * 1 + 2 / 3 * 2) / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_confusion_metrics_match_sklearn(n_classes: int) -> None:
    y, probs = _softmax_data(300, n_classes, seed=n_classes)
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


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probability_metrics_match_sklearn(n_classes: int) -> None:
    y, probs = _softmax_data(200, n_classes, seed=10 + n_classes)
    m = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
    assert m["log_loss"] == pytest.approx(log_loss(y, probs))
    if n_classes == 2:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, probs[:, 1]))
        assert m["brier"] == pytest.approx(brier_score_loss(y, probs[:, 1]))
    else:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        assert m["pr_auc"] == pytest.approx(average_precision_score(np.eye(3)[y], probs, average="macro"))


def test_log_loss_stays_finite_on_a_confident_mistake() -> None:
    losses = log_loss_per_image(np.array([1, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isfinite(losses).all() and losses[0] > 30 and losses[1] == 0.0


def test_brier_by_hand() -> None:
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


def test_top_k_accuracy_by_hand_and_when_it_is_left_out() -> None:
    # true classes 0, 1, 2, 2: in the top two for rows 1, 2 and 4 (row 3 ranks class 2 last)
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.5, 0.4]])
    y = np.array([0, 1, 2, 2])
    names = ["a", "b", "c"]
    assert classification_metrics(y, probs, names)["top_2_accuracy"] == pytest.approx(3 / 4)
    assert not any(k.startswith("top_") for k in classification_metrics(y, probs, names, top_k=3))
    assert not any(k.startswith("top_") for k in classification_metrics(y, probs, names, top_k=1))


@pytest.mark.parametrize(
    ("y_true", "probs", "classes", "absent"),
    [
        (np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]), ["neg", "pos"], "neg"),
        (np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"], "c"),
    ],
)
def test_auc_is_null_when_a_class_is_missing(y_true, probs, classes, absent: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn UndefinedMetricWarning, no NaN warnings either
        m = classification_metrics(y_true, probs, classes)
        full = evaluation_metrics(y_true, probs, classes, EvaluateParams(bootstrap_resamples=50), None)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert full["ci"]["roc_auc"] is None and full["ci"]["pr_auc"] is None
    assert m["per_class"][absent]["support"] == 0
    if len(classes) == 2:
        assert m["specificity"] is None and m["sensitivity"] == pytest.approx(2 / 3)
    flat = flat_metrics(m)
    assert "roc_auc" not in flat and "specificity" not in flat
    assert flat["accuracy"] == m["accuracy"]
    json.dumps(full, allow_nan=False)


# ------------------------------------------------------------------ thresholds


def test_threshold_table_by_hand() -> None:
    thresholds, sensitivity, specificity = threshold_table(VAL_P1, VAL_Y == 1)
    assert thresholds == pytest.approx([0.8, 0.7, 0.6, 0.4, 0.35, 0.1])
    assert sensitivity == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    assert specificity == pytest.approx([1, 1, 2 / 3, 1 / 3, 1 / 3, 0])


def test_youden_threshold_by_hand_and_on_sklearn_roc() -> None:
    assert youden_threshold(VAL_P1, VAL_Y == 1) == 0.7
    fpr, tpr, thresholds = roc_curve(VAL_Y, VAL_P1, drop_intermediate=False)
    assert youden_threshold(VAL_P1, VAL_Y == 1) == thresholds[np.argmax(tpr - fpr)]


def test_youden_ties_go_to_the_highest_threshold() -> None:
    # J = 1/2 at 0.9 (sens 1/2, spec 1) and at 0.3 (sens 1, spec 1/2)
    scores, positives = np.array([0.2, 0.5, 0.3, 0.9]), np.array([False, False, True, True])
    assert youden_threshold(scores, positives) == 0.9


@pytest.mark.parametrize(
    ("target", "expected"), [(0.95, 0.35), (2 / 3, 0.7), (0.5, 0.7), (0.3, 0.8), (1.0, 0.35)]
)
def test_target_sensitivity_threshold_by_hand(target: float, expected: float) -> None:
    assert target_sensitivity_threshold(VAL_P1, VAL_Y == 1, target) == expected


def test_choose_threshold_by_rule() -> None:
    youden = choose_threshold(EvaluateParams(threshold="youden"), VAL_Y, VAL_P1)
    assert youden == {
        "rule": "youden",
        "value": 0.7,
        "chosen_on": "val",
        "n_val": 6,
        "val_sensitivity": pytest.approx(2 / 3),
        "val_specificity": 1.0,
    }
    target = choose_threshold(
        EvaluateParams(threshold="target_sensitivity", target_sensitivity=0.9), VAL_Y, VAL_P1
    )
    assert (target["value"], target["val_sensitivity"], target["val_specificity"]) == pytest.approx(
        (0.35, 1, 1 / 3)
    )
    fixed = choose_threshold(EvaluateParams(threshold="fixed", fixed_threshold=0.25), None, None)
    assert fixed == {"rule": "fixed", "value": 0.25, "chosen_on": "params"}


def test_choose_threshold_falls_back_when_val_lacks_a_class() -> None:
    no_neg = choose_threshold(EvaluateParams(), np.array([1, 1]), np.array([0.3, 0.9]))
    assert no_neg["value"] == 0.5 and no_neg["chosen_on"] == "fallback" and "negative" in no_neg["reason"]
    no_pos = choose_threshold(
        EvaluateParams(threshold="target_sensitivity"), np.array([0, 0]), np.array([0.3, 0.9])
    )
    assert no_pos["chosen_on"] == "fallback" and "positive" in no_pos["reason"]
    # target_sensitivity needs positives only
    ok = choose_threshold(
        EvaluateParams(threshold="target_sensitivity"), np.array([1, 1]), np.array([0.3, 0.9])
    )
    assert ok["value"] == 0.3 and ok["chosen_on"] == "val" and ok["val_specificity"] is None


def test_operating_points_choose_on_val_and_measure_on_test() -> None:
    params = EvaluateParams(operating_sensitivities=[0.5, 0.9])
    points = operating_points(params, VAL_Y, VAL_P1, BIN_Y, BIN_P1)
    assert list(points) == ["youden", "sensitivity_0.5", "sensitivity_0.9"]
    # val cut-offs: Youden 0.7, sensitivity 0.5 -> 0.7, 0.9 -> 0.35 (all three val positives)
    assert [p["value"] for p in points.values()] == [0.7, 0.7, 0.35]
    assert [p["rule"] for p in points.values()] == ["youden", "target_sensitivity", "target_sensitivity"]
    assert points["sensitivity_0.9"]["val_sensitivity"] == 1.0
    assert points["sensitivity_0.9"]["val_specificity"] == pytest.approx(1 / 3)
    # test BIN_P1 at 0.7 calls [0, 0, 1, 1, 0]; at 0.35 [0, 0, 1, 1, 1]
    assert points["youden"]["confusion_matrix"] == [[2, 1], [1, 1]]
    assert (points["youden"]["accuracy"], points["youden"]["sensitivity"]) == pytest.approx((0.6, 0.5))
    assert points["sensitivity_0.9"]["confusion_matrix"] == [[2, 1], [0, 2]]
    assert points["sensitivity_0.9"]["accuracy"] == pytest.approx(0.8)
    assert points["sensitivity_0.9"]["specificity"] == pytest.approx(2 / 3)


def test_operating_points_say_when_val_lacks_a_class() -> None:
    points = operating_points(EvaluateParams(), np.array([0, 0]), np.array([0.2, 0.6]), BIN_Y, BIN_P1)
    assert list(points) == ["youden", "sensitivity_0.9", "sensitivity_0.95", "sensitivity_0.99"]
    assert all(p["chosen_on"] == "fallback" and p["value"] == 0.5 for p in points.values())
    assert "positive" in points["youden"]["reason"]


def test_predicted_labels_by_threshold() -> None:
    assert predicted_labels(BIN_PROBS, 0.7).tolist() == [0, 0, 1, 1, 0]  # at or above: positive
    assert predicted_labels(BIN_PROBS).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="two classes"):
        predicted_labels(TRI_PROBS, 0.5)


def test_metrics_at_the_threshold_and_at_one_half() -> None:
    threshold = {"rule": "fixed", "value": 0.75, "chosen_on": "params"}
    params = EvaluateParams(threshold="fixed", fixed_threshold=0.75, bootstrap_resamples=100)
    m = evaluation_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"], params, threshold)
    # at 0.75 only 0.8 is called positive: [0, 0, 0, 1, 0]
    assert m["confusion_matrix"] == [[3, 0], [1, 1]]
    assert (m["sensitivity"], m["specificity"], m["accuracy"]) == pytest.approx((0.5, 1.0, 0.8))
    assert m["threshold"] == threshold
    at_half = m["at_0.5"]
    assert at_half["confusion_matrix"] == [[2, 1], [0, 2]]
    assert (at_half["sensitivity"], at_half["specificity"]) == pytest.approx((1.0, 2 / 3))
    # the ranking metrics do not depend on the threshold
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert set(m["ci"]) == {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "sensitivity",
        "specificity",
        "roc_auc",
        "pr_auc",
        "log_loss",
        "brier",
    }
    assert m["ci_level"] == 0.95 and m["bootstrap_resamples"] == 100
    json.dumps(m, allow_nan=False)


# ------------------------------------------------------------------ bootstrap


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
    from tlpipe.evaluate import evaluation

    whole = np.vstack(list(resample_weights(50, 30, np.random.default_rng(0))))
    monkeypatch.setattr(evaluation, "_BOOTSTRAP_CELLS", 50 * 7)  # 7 resamples per chunk
    chunks = list(resample_weights(50, 30, np.random.default_rng(0)))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    assert whole.shape == (30, 50) and (whole.sum(axis=1) == 50).all()
    assert (np.vstack(chunks).sum(axis=1) == 50).all()


def test_confusion_counts_with_weights_are_the_resampled_matrix() -> None:
    weights = np.array([[2.0, 0.0, 1.0, 1.0, 1.0]])
    counts = confusion_counts(BIN_Y, BIN_PROBS.argmax(axis=1), 2, weights)
    drawn = np.repeat(np.arange(5), [2, 0, 1, 1, 1])
    assert counts[0].tolist() == confusion_counts(BIN_Y[drawn], BIN_PROBS.argmax(axis=1)[drawn], 2).tolist()


@pytest.mark.parametrize("n_classes", [2, 3])
def test_confidence_intervals_contain_the_estimate_and_narrow_with_more_images(n_classes: int) -> None:
    widths = {}
    for n in (100, 2000):
        y, probs = _softmax_data(n, n_classes, seed=n)
        pred = probs.argmax(axis=1)
        point = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
        ci = confidence_intervals(y, probs, pred, resamples=500, level=0.95, seed=0)
        expected = {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc", "log_loss", "brier"}
        assert set(ci) == expected | ({"sensitivity", "specificity"} if n_classes == 2 else set())
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, name
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
    for name in widths[100]:
        # the width shrinks like 1/sqrt(n): a factor of about 4.5 here
        assert widths[2000][name] < 0.4 * widths[100][name], name


def test_bootstrap_is_seeded() -> None:
    y, probs = _softmax_data(80, 3, seed=1)
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
    y, probs = _softmax_data(1000, 3, seed=2)
    start = time.perf_counter()
    confidence_intervals(y, probs, probs.argmax(axis=1), 1000, 0.95, seed=0)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------ curves and MLflow names


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


def test_pr_points_by_hand() -> None:
    curves = pr_points(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert list(curves) == ["pos"]
    # thresholds 0.8, 0.7, 0.6, ...: (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3), ...
    points = [(p["recall"], p["precision"]) for p in curves["pos"]]
    assert (0.5, 1.0) in points and (1.0, pytest.approx(2 / 3)) in points
    assert points[0] == (0.0, 1.0)
    recalls = [r for r, _ in points]
    assert recalls == sorted(recalls)
    assert list(pr_points(np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"])) == ["a", "b"]


def test_flat_metrics_are_scalar_and_dotted() -> None:
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["a", "b", "c"]))
    assert flat["a.precision"] == pytest.approx(0.5)
    assert flat["c.support"] == 2
    assert {"accuracy", "macro_f1", "roc_auc", "n_test", "top_2_accuracy", "ece"} <= set(flat)
    assert "per_class" not in flat and "confusion_matrix" not in flat
    assert all(isinstance(v, (int, float)) for v in flat.values())


def test_flat_metrics_of_the_binary_document() -> None:
    params = EvaluateParams(threshold="fixed", fixed_threshold=0.75, bootstrap_resamples=50)
    threshold = choose_threshold(params, None, None)
    flat = flat_metrics(evaluation_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"], params, threshold))
    assert flat["threshold.value"] == 0.75 and "threshold.rule" not in flat
    assert flat["at_0.5.sensitivity"] == 1.0
    assert flat["ci.accuracy.low"] <= flat["accuracy"] <= flat["ci.accuracy.high"]
    assert not {"ci_level", "bootstrap_resamples", "at_0.5.confusion_matrix"} & set(flat)
    assert all(re.fullmatch(r"[\w\-. /]+", k) for k in flat)
    assert not [k for k in flat if k.startswith("operating_points")]


def test_flat_metrics_log_the_operating_points_briefly() -> None:
    params = EvaluateParams(operating_sensitivities=[0.9])
    points = operating_points(params, VAL_Y, VAL_P1, BIN_Y, BIN_P1)
    threshold = choose_threshold(params, VAL_Y, VAL_P1)
    metrics = evaluation_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"], params, threshold, points)
    assert metrics["operating_points"] == points
    flat = flat_metrics(metrics)
    logged = {k for k in flat if k.startswith("operating_points.")}
    assert logged == {
        f"operating_points.{name}.{k}"
        for name in ("youden", "sensitivity_0.9")
        for k in ("value", "val_sensitivity", "val_specificity", "accuracy", "balanced_accuracy")
        + ("sensitivity", "specificity")
    }
    assert flat["operating_points.sensitivity_0.9.value"] == 0.35
    assert flat["operating_points.sensitivity_0.9.accuracy"] == pytest.approx(0.8)


def test_metric_key_keeps_only_what_mlflow_accepts() -> None:
    assert metric_key("c++") == "c__"
    assert metric_key("pepper (red)") == "pepper _red_"
    assert metric_key("café.au-lait_2") == "café.au-lait_2"
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["c++", "a&b", "ok"]))
    assert {"c__.f1", "a_b.f1", "ok.f1"} <= set(flat)


def test_ranking_metrics_for_three_classes_match_sklearn_per_class_mean() -> None:
    m = ranking_metrics(TRI_Y, TRI_PROBS)
    per_class = [average_precision_score(TRI_Y == i, TRI_PROBS[:, i]) for i in range(3)]
    assert m["pr_auc"] == pytest.approx(np.mean(per_class))


# ------------------------------------------------------------------ the stage


def _colour_model(n_classes: int, path: Path) -> Path:
    """Mean colour -> class: the fixture's classes are red, green, blue images, so this is always right."""
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    if n_classes == 2:  # red vs green through one sigmoid unit
        dense = keras.layers.Dense(1, activation="sigmoid")
        outputs = dense(pooled)
        # weak weights keep P(green) away from 0 and 1, so val and test scores spread
        dense.set_weights([np.array([[-0.01], [0.01], [0.0]]), np.zeros(1)])
    else:
        dense = keras.layers.Dense(3, activation="softmax")
        outputs = dense(pooled)
        dense.set_weights([np.eye(3) * 0.05, np.zeros(3)])
    keras.Model(inputs, outputs).save(path)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _columns(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_evaluate_writes_metrics_plots_and_predictions(tmp_path: Path) -> None:
    classes = ["red", "green", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"train": 1, "test": 3})
    model = _colour_model(3, tmp_path / "model.keras")
    out = tmp_path / "results"
    (out / "roc").mkdir(parents=True)
    (out / "roc" / "stale.csv").write_text("fpr,tpr\n")  # a previous run's output is replaced, not merged

    metrics = evaluate(data, model, EvaluateParams(batch_size=4, bootstrap_resamples=200), out)

    assert metrics["accuracy"] == 1.0 and metrics["n_test"] == 9
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics) == [
        "accuracy",
        "balanced_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "weighted_precision",
        "weighted_recall",
        "weighted_f1",
        "top_2_accuracy",
        "roc_auc",
        "pr_auc",
        "log_loss",
        "brier",
        "ece",
        "n_test",
        "per_class",
        "confusion_matrix",
        "ci",
        "ci_level",
        "bootstrap_resamples",
    ]
    assert metrics["ci"]["accuracy"] == {"low": 1.0, "high": 1.0}
    assert metrics["confusion_matrix"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    confusion = _read(out / "confusion.csv")
    assert len(confusion) == 9
    assert all(
        list(row) == ["actual", "predicted"] and row["actual"] == row["predicted"] for row in confusion
    )
    for folder, fields in (("roc", ["fpr", "tpr"]), ("pr", ["recall", "precision"])):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["blue.csv", "green.csv", "red.csv"]
        assert all(_columns(p) == fields for p in (out / folder).iterdir())
    roc = _read(out / "roc" / "red.csv")
    assert roc[-1] == {"fpr": "1.0", "tpr": "1.0"}
    calibration = _read(out / "calibration.csv")
    assert _columns(out / "calibration.csv") == ["bin", "confidence", "accuracy", "count"]
    assert sum(int(r["count"]) for r in calibration) == 9

    predictions = _read(out / "predictions.csv")
    assert _columns(out / "predictions.csv") == ["path", "label", "predicted", "p_red", "p_green", "p_blue"]
    manifest = [r for r in _read(data / "manifest.csv") if r["split"] == "test"]
    assert [r["path"] for r in predictions] == [r["path"] for r in manifest]
    assert [r["label"] for r in predictions] == [r["label"] for r in manifest]
    for row in predictions:
        probs = np.array([float(row[f"p_{c}"]) for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert row["predicted"] == classes[probs.argmax()] == row["label"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]  # no scratch left


def test_evaluate_binary_chooses_the_threshold_on_val(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 4, "test": 5})
    out = tmp_path / "out"
    params = EvaluateParams(batch_size=3, threshold="target_sensitivity", target_sensitivity=1.0)
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, out)

    val_rows = [r for r in _read(data / "manifest.csv") if r["split"] == "val"]
    threshold = metrics["threshold"]
    assert threshold["rule"] == "target_sensitivity" and threshold["chosen_on"] == "val"
    assert threshold["n_val"] == len(val_rows) == 8
    assert threshold["val_sensitivity"] == 1.0
    assert 0.5 < threshold["value"] < 1.0  # the lowest P(green) of a green val image
    assert {"sensitivity", "specificity", "at_0.5", "ci"} <= set(metrics)
    assert metrics["at_0.5"]["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert {"sensitivity", "specificity"} <= set(metrics["ci"])
    assert json.loads((out / "metrics.json").read_text()) == metrics

    points = metrics["operating_points"]
    assert list(points) == ["youden", "sensitivity_0.9", "sensitivity_0.95", "sensitivity_0.99"]
    assert all(p["chosen_on"] == "val" and p["n_val"] == 8 for p in points.values())
    # the target 1.0 rule in use and the 0.99 point both need every green val image: one cut-off
    assert points["sensitivity_0.99"]["value"] == threshold["value"]
    assert points["sensitivity_0.99"]["accuracy"] == metrics["accuracy"]

    assert [p.name for p in (out / "roc").iterdir()] == ["green.csv"]
    assert [p.name for p in (out / "pr").iterdir()] == ["green.csv"]
    predictions = _read(out / "predictions.csv")
    for row in predictions:
        p_red, p_green = float(row["p_red"]), float(row["p_green"])
        assert p_red + p_green == pytest.approx(1.0, abs=1e-9)
        # the test decisions use the val threshold, not 0.5
        assert (row["predicted"] == "green") == (p_green >= threshold["value"])
    called_green = sum(r["predicted"] == "green" for r in predictions)
    assert metrics["confusion_matrix"][0][1] + metrics["confusion_matrix"][1][1] == called_green


def test_evaluate_binary_youden_on_a_real_run(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 3, "test": 3})
    metrics = evaluate(
        data, _colour_model(2, tmp_path / "m.keras"), EvaluateParams(batch_size=8), tmp_path / "out"
    )
    assert metrics["threshold"]["rule"] == "youden" and metrics["threshold"]["chosen_on"] == "val"
    # red and green separate perfectly on val: J = 1 at the lowest green score
    assert metrics["threshold"]["val_sensitivity"] == metrics["threshold"]["val_specificity"] == 1.0
    assert metrics["operating_points"]["youden"]["value"] == metrics["threshold"]["value"]


def test_evaluate_fixed_threshold_needs_no_val_split(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"test": 4})
    params = EvaluateParams(threshold="fixed", fixed_threshold=0.5, bootstrap_resamples=0)
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, tmp_path / "out")
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert metrics["threshold"] == {"rule": "fixed", "value": 0.5, "chosen_on": "params"}
    assert metrics["at_0.5"]["accuracy"] == metrics["accuracy"]
    assert metrics["ci"] == {} and metrics["bootstrap_resamples"] == 0
    assert "operating_points" not in metrics  # they need a val split


def test_evaluate_fixed_threshold_still_shows_val_operating_points(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 3, "test": 4})
    params = EvaluateParams(threshold="fixed", fixed_threshold=0.5, bootstrap_resamples=0)
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, tmp_path / "out")
    assert metrics["threshold"] == {"rule": "fixed", "value": 0.5, "chosen_on": "params"}
    assert metrics["operating_points"]["youden"]["chosen_on"] == "val"
    assert metrics["operating_points"]["youden"]["n_val"] == 6


def test_evaluate_logs_an_mlflow_run(tmp_path: Path) -> None:
    # folder names MLflow would refuse as metric names: the stage must still log its run
    classes = ["red (dark)", "green+", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"test": 2})
    params = EvaluateParams(batch_size=8, bootstrap_resamples=100)
    evaluate(data, _colour_model(3, tmp_path / "m.keras"), params, tmp_path / "out", "none")
    assert sorted(p.name for p in (tmp_path / "out" / "roc").iterdir()) == [
        "blue.csv",
        "green+.csv",
        "red (dark).csv",
    ]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(mlflow.last_active_run().info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlpipe.stage"] == "evaluate"
    assert run.data.tags["tlpipe.weights"] == "none"  # a from-scratch baseline, for the report
    assert run.data.params == {
        **{f"evaluate.{k}": str(v) for k, v in params.model_dump().items()},
        "train_frozen.weights": "none",
    }
    assert run.data.metrics["accuracy"] == 1.0
    assert run.data.metrics["red _dark_.recall"] == run.data.metrics["green_.precision"] == 1.0
    assert run.data.metrics["blue.support"] == 2
    assert run.data.metrics["ci.accuracy.low"] == 1.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]


def test_evaluate_without_a_model_is_file_not_found(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["a", "b"], {"val": 1, "test": 1})
    with pytest.raises(FileNotFoundError, match="run the train-frozen stage first"):
        evaluate(data, tmp_path / "missing.keras", EvaluateParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_binary_without_val_names_the_missing_split(tmp_path: Path) -> None:
    from tlpipe.core.errors import PipelineError

    data = make_augmented(tmp_path / "aug", ["a", "b"], {"test": 1})
    with pytest.raises(PipelineError, match="no 'val' images"):
        evaluate(data, tmp_path / "missing.keras", EvaluateParams(), tmp_path / "out")
