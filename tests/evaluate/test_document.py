"""Tests for the metrics document: headline, per-class and probability metrics, threshold and CIs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from evaluate_cases import BIN_PROBS, BIN_Y, TRI_PROBS, TRI_Y, softmax_data
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.document import classification_metrics, evaluation_metrics
from tlpipe.evaluate.stage import flat_metrics


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


def test_per_class_metrics_with_uneven_support_and_a_class_never_predicted() -> None:
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


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probability_metrics_match_sklearn(n_classes: int) -> None:
    y, probs = softmax_data(200, n_classes, seed=10 + n_classes)
    m = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
    assert m["log_loss"] == pytest.approx(log_loss(y, probs))
    if n_classes == 2:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, probs[:, 1]))
        assert m["brier"] == pytest.approx(brier_score_loss(y, probs[:, 1]))
    else:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        assert m["pr_auc"] == pytest.approx(average_precision_score(np.eye(3)[y], probs, average="macro"))


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
        "ece",
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
