"""Fitting the decision on the val split: the calibration first, then the two-class threshold on the
calibrated probabilities; and how much the calibration changed the test probabilities' quality.

The test split is never used here: the decision is fixed before the test split is scored.
"""

from __future__ import annotations

import numpy as np

from tlpipe.core.config import EvaluateParams
from tlpipe.core.errors import PipelineError
from tlpipe.evaluate.bootstrap import confidence_intervals
from tlpipe.evaluate.metrics import (
    brier_per_image,
    calibration_table,
    expected_calibration_error,
    log_loss_per_image,
)
from tlpipe.evaluate.thresholds import choose_threshold, predicted_labels
from tlpipe.model.decision import Decision, fit_isotonic, fit_platt, fit_temperature

CALIBRATION_METRICS = ("ece", "brier", "log_loss")


def fit_decision(
    params: EvaluateParams, classes: list[str], y_val: np.ndarray | None, raw_val: np.ndarray | None
) -> tuple[Decision, dict | None]:
    """The decision, and for two classes the threshold document metrics.json keeps."""
    if params.calibration in ("platt", "isotonic") and len(classes) != 2:
        raise PipelineError(
            f"evaluate.calibration: {params.calibration} is for two classes, this data has {len(classes)}; "
            "use temperature or none"
        )
    usable = y_val is not None and raw_val is not None and len(np.unique(y_val)) > 1
    method = params.calibration if usable else "none"
    fitted: dict = {}
    if raw_val is not None and y_val is not None:
        if method == "temperature":
            fitted["temperature"] = fit_temperature(raw_val, y_val)
        elif method == "platt":
            fitted["platt"] = fit_platt(raw_val, y_val)
        elif method == "isotonic":
            fitted["isotonic"] = fit_isotonic(raw_val, y_val)
    calibrated = Decision(classes=list(classes), calibration=method, **fitted)
    if len(classes) != 2:
        return calibrated, None
    p_val = None if raw_val is None else calibrated.calibrate(raw_val)[:, 1]
    threshold = choose_threshold(params, y_val, p_val)
    decision = Decision(
        classes=list(classes),
        calibration=method,
        **fitted,
        rule=threshold["rule"],
        threshold=threshold["value"],
        chosen_on=threshold["chosen_on"],
        val_sensitivity=threshold.get("val_sensitivity"),
        val_specificity=threshold.get("val_specificity"),
    )
    return decision, threshold


def probability_quality(y: np.ndarray, probs: np.ndarray, params: EvaluateParams) -> dict:
    """ECE, Brier and log loss of ``probs``, each with its bootstrap interval."""
    y = np.asarray(y, dtype=np.int64)
    figures: dict = {
        "ece": expected_calibration_error(calibration_table(y, probs, params.calibration_bins)),
        "brier": float(brier_per_image(y, probs).mean()),
        "log_loss": float(log_loss_per_image(y, probs).mean()),
    }
    intervals = confidence_intervals(
        y,
        probs,
        predicted_labels(probs),
        params.bootstrap_resamples,
        params.ci_level,
        params.seed,
        params.calibration_bins,
    )
    figures["ci"] = {}
    for name in CALIBRATION_METRICS:
        interval = intervals.get(name)
        if name in intervals:
            figures["ci"][name] = None if interval is None else {"low": interval[0], "high": interval[1]}
    return figures


def calibration_document(
    decision: Decision,
    n_val: int,
    y_test: np.ndarray,
    raw: np.ndarray,
    test_metrics: dict,
    params: EvaluateParams,
) -> dict:
    """metrics.json's ``calibration``: the method, its parameter, and the test figures before and after.

    "after" is read from ``test_metrics`` (the metrics of the calibrated probabilities, with their
    intervals), which already hold ECE, Brier and log loss: only "before" is computed here.
    """
    after = {name: test_metrics[name] for name in CALIBRATION_METRICS}
    intervals = test_metrics.get("ci") or {}
    after["ci"] = {name: intervals[name] for name in CALIBRATION_METRICS if name in intervals}
    return {
        "method": decision.calibration,
        "temperature": decision.temperature,
        "platt": decision.platt,
        "isotonic_knots": None if decision.isotonic is None else len(decision.isotonic[0]),
        "fitted_on": "val" if decision.calibration != "none" else None,
        "n_val": n_val,
        "before": probability_quality(y_test, raw, params),
        "after": after,
    }
