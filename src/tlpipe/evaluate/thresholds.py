"""Decisions from probabilities, and the two-class decision threshold chosen on the val split.

The threshold on P(class 1) is chosen on val and only then applied to test, so the test
figures are not tuned on the data they report. The operating points repeat that choice
for more rules, to show the trade-off between sensitivity and specificity.
"""

from __future__ import annotations

import numpy as np

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.metrics import confusion_counts, confusion_metrics, number_or_none, threshold_metrics


def predicted_labels(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class indices: the argmax, or for two classes ``P(class 1) >= threshold``."""
    if threshold is None:
        return probs.argmax(axis=1)
    if probs.shape[1] != 2:
        raise ValueError(f"a decision threshold needs two classes, got {probs.shape[1]}")
    return (probs[:, 1] >= threshold).astype(np.int64)


def threshold_table(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every distinct score as a threshold (highest first), with its sensitivity and specificity.

    These are the ROC thresholds; a score at or above the threshold is called positive.
    Sensitivity is NaN without positives, specificity NaN without negatives.
    """
    thresholds = np.unique(scores)[::-1]
    pos, neg = np.sort(scores[positives]), np.sort(scores[~positives])
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
        specificity = np.searchsorted(neg, thresholds, side="left") / len(neg)
    return thresholds, sensitivity, specificity


def youden_threshold(scores: np.ndarray, positives: np.ndarray) -> float:
    """The threshold maximising Youden's J, sensitivity + specificity - 1.

    Ties go to the highest threshold: the one that calls the fewest images positive.
    """
    thresholds, sensitivity, specificity = threshold_table(scores, positives)
    return float(thresholds[np.argmax(sensitivity + specificity - 1.0)])


def target_sensitivity_threshold(scores: np.ndarray, positives: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (the lowest score always does)."""
    thresholds, sensitivity, _ = threshold_table(scores, positives)
    return float(thresholds[np.flatnonzero(sensitivity >= target)[0]])


def two_class_probabilities(p1: np.ndarray) -> np.ndarray:
    """P(class 1) scores as the (n, 2) probability matrix that :func:`predicted_labels` reads."""
    # imported here: tlpipe.model loads Keras, which the metrics themselves never need.
    # A column of P(class 1) is exactly what a sigmoid head outputs, so the model's reading applies
    from tlpipe.model.outputs import class_probabilities

    return class_probabilities(np.reshape(p1, (-1, 1)))


def sensitivity_specificity(
    y: np.ndarray, p1: np.ndarray, threshold: float
) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of ``P(class 1) >= threshold`` (None where undefined)."""
    decided = predicted_labels(two_class_probabilities(p1), threshold)
    figures = confusion_metrics(confusion_counts(np.asarray(y), decided, 2))
    return number_or_none(figures["sensitivity"]), number_or_none(figures["specificity"])


def choose_threshold(
    params: EvaluateParams, y_val: np.ndarray | None, p_val: np.ndarray | None, on: str = "val"
) -> dict:
    """The decision threshold for two classes, by the configured rule, with what it achieved on the data
    it was chosen on: ``on`` names it (val, or oof: the out-of-fold predictions over train+val)."""
    if params.threshold == "fixed":
        return {"rule": "fixed", "value": params.fixed_threshold, "chosen_on": "params"}
    positives = np.asarray(y_val) == 1
    needs_negatives = params.threshold == "youden"
    if not positives.any() or (needs_negatives and positives.all()):
        # a tiny val split can lack a class: say so in metrics.json rather than fail the pipeline
        missing = "positive" if not positives.any() else "negative"
        return {
            "rule": params.threshold,
            "value": 0.5,
            "chosen_on": "fallback",
            "reason": f"the {on} predictions have no {missing} images",
        }
    assert p_val is not None  # a rule other than fixed is only chosen with val scores
    if needs_negatives:
        value = youden_threshold(p_val, positives)
    else:
        value = target_sensitivity_threshold(p_val, positives, params.target_sensitivity)
    sensitivity, specificity = sensitivity_specificity(np.asarray(y_val), p_val, value)
    return {
        "rule": params.threshold,
        "value": value,
        "chosen_on": on,
        f"n_{on}": len(positives),
        f"{on}_sensitivity": sensitivity,
        f"{on}_specificity": specificity,
    }


def operating_points(
    params: EvaluateParams,
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    on: str = "val",
) -> dict[str, dict]:
    """The test decision metrics at cut-offs chosen on val (or ``on`` the out-of-fold predictions, as the
    decision is): Youden's and each of ``operating_sensitivities``.

    Every cut-off is chosen on val, as the one in use is, so the table shows the trade-off without
    tuning on test. Where the val split is unlike the test population, its val and test figures part ways.
    """
    rules: dict[str, dict] = {"youden": {"threshold": "youden"}}
    rules |= {
        f"sensitivity_{target:g}": {"threshold": "target_sensitivity", "target_sensitivity": target}
        for target in params.operating_sensitivities
    }
    decide_on = two_class_probabilities(p_test)
    points = {}
    for name, rule in rules.items():
        chosen = choose_threshold(params.model_copy(update=rule), y_val, p_val, on)
        decided = predicted_labels(decide_on, chosen["value"])
        points[name] = {**chosen, **threshold_metrics(y_test, decided, 2)}
    return points
