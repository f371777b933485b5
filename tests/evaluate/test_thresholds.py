"""Tests for decisions by threshold and for the val-chosen thresholds and operating points."""

from __future__ import annotations

import numpy as np
import pytest
from evaluate_cases import BIN_P1, BIN_PROBS, BIN_Y, TRI_PROBS, VAL_P1, VAL_Y
from sklearn.metrics import roc_curve

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.thresholds import (
    choose_threshold,
    operating_points,
    predicted_labels,
    target_sensitivity_threshold,
    threshold_table,
    youden_threshold,
)


def test_predicted_labels_by_threshold() -> None:
    assert predicted_labels(BIN_PROBS, 0.7).tolist() == [0, 0, 1, 1, 0]  # at or above: positive
    assert predicted_labels(BIN_PROBS).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="two classes"):
        predicted_labels(TRI_PROBS, 0.5)


def test_threshold_table_lists_every_score_with_its_sensitivity_and_specificity() -> None:
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
