"""Fitting the decision: the calibration first, then the two-class threshold on the calibrated
probabilities; and how much the calibration changed the test probabilities' quality.

``evaluate.decision_data`` says on what (docs/decision.md): the val split, or the out-of-fold predictions
over train+val with the fine-tuned model mapped onto their scale through the val images. The test split is
never used here: the decision is fixed before the test split is scored.
"""

from __future__ import annotations

from dataclasses import replace

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
from tlpipe.evaluate.thresholds import choose_threshold, predicted_labels, sensitivity_specificity
from tlpipe.model.decision import Decision, fit_isotonic, fit_platt, fit_temperature
from tlpipe.model.oof_file import OutOfFold

CALIBRATION_METRICS = ("ece", "brier", "log_loss")


def _fitted_calibration(method: str, raw: np.ndarray, targets: np.ndarray) -> dict:
    """The calibration's parameter, fitted to labels or to soft targets (rows of probabilities)."""
    if method == "temperature":
        return {"temperature": fit_temperature(raw, targets)}
    if method == "platt":
        return {"platt": fit_platt(raw, targets)}
    if method == "isotonic":
        return {"isotonic": fit_isotonic(raw, targets)}
    return {}


def fit_decision(
    params: EvaluateParams,
    classes: list[str],
    y_val: np.ndarray | None,
    raw_val: np.ndarray | None,
    oof: OutOfFold | None = None,
    val_paths: list[str] | None = None,
) -> tuple[Decision, dict | None]:
    """The decision by ``params.decision_data``, and for two classes the threshold document metrics.json
    keeps: fitted on the val split, or on the out-of-fold predictions ``oof`` with the fine-tuned model
    mapped onto them through the val images (``val_paths``, docs/decision.md)."""
    if params.calibration in ("platt", "isotonic") and len(classes) != 2:
        raise PipelineError(
            f"evaluate.calibration: {params.calibration} is for two classes, this data has {len(classes)}; "
            "use temperature or none"
        )
    if params.decision_data == "oof" and not (len(classes) == 2 and params.threshold == "fixed"):
        if oof is None or raw_val is None or y_val is None or val_paths is None:
            raise PipelineError(
                "evaluate.decision_data: oof needs the out-of-fold predictions (train-frozen's oof.csv) and "
                "the val split; or set evaluate.decision_data: val"
            )
        return _fit_on_oof(params, classes, oof, val_paths, y_val, raw_val)
    return _fit_on_val(params, classes, y_val, raw_val)


def _fit_on_val(
    params: EvaluateParams, classes: list[str], y_val: np.ndarray | None, raw_val: np.ndarray | None
) -> tuple[Decision, dict | None]:
    usable = y_val is not None and raw_val is not None and len(np.unique(y_val)) > 1
    method = params.calibration if usable else "none"
    fitted = {} if raw_val is None or y_val is None else _fitted_calibration(method, raw_val, y_val)
    calibrated = Decision(classes=list(classes), calibration=method, **fitted)
    if len(classes) != 2:
        return calibrated, None
    p_val = None if raw_val is None else calibrated.calibrate(raw_val)[:, 1]
    threshold = choose_threshold(params, y_val, p_val)
    return _with_threshold(
        calibrated, threshold, threshold.get("val_sensitivity"), threshold.get("val_specificity")
    ), threshold


def _fit_on_oof(
    params: EvaluateParams,
    classes: list[str],
    oof: OutOfFold,
    val_paths: list[str],
    y_val: np.ndarray,
    raw_val: np.ndarray,
) -> tuple[Decision, dict | None]:
    method, calibrated_oof = calibrate_oof(params, classes, oof)
    by_path = dict(zip(oof.paths, calibrated_oof, strict=True))
    missing = [p for p in val_paths if p not in by_path]
    if missing:
        raise PipelineError(
            f"{len(missing)} val images have no out-of-fold prediction (e.g. {missing[0]}): train-frozen's "
            "oof.csv is from other data; rerun train-frozen"
        )
    # the fine-tuned model mapped onto that scale on the val images, which it did not train on: no labels
    soft_targets = np.stack([by_path[p] for p in val_paths])
    mapped = Decision(
        classes=list(classes), calibration=method, **_fitted_calibration(method, raw_val, soft_targets)
    )
    if len(classes) != 2:
        return mapped, None
    threshold = choose_threshold(params, oof.labels, calibrated_oof[:, 1], on="oof")
    if threshold["chosen_on"] == "fallback":
        return _with_threshold(mapped, threshold, None, None), threshold
    # what the served decision does on val: its figures on images no part of the model trained on
    threshold["n_val"] = len(y_val)
    threshold["val_sensitivity"], threshold["val_specificity"] = sensitivity_specificity(
        y_val, mapped.calibrate(raw_val)[:, 1], threshold["value"]
    )
    return _with_threshold(
        mapped, threshold, threshold["val_sensitivity"], threshold["val_specificity"]
    ), threshold


def calibrate_oof(params: EvaluateParams, classes: list[str], oof: OutOfFold) -> tuple[str, np.ndarray]:
    """The calibration method used, and the out-of-fold probabilities calibrated on their own labels: the
    scale the ``oof`` decision and its operating points are chosen on."""
    method = params.calibration if len(np.unique(oof.labels)) > 1 else "none"
    fitted = _fitted_calibration(method, oof.probabilities, oof.labels)
    return method, Decision(classes=list(classes), calibration=method, **fitted).calibrate(oof.probabilities)


def _with_threshold(
    calibrated: Decision, threshold: dict, val_sensitivity: float | None, val_specificity: float | None
) -> Decision:
    return replace(
        calibrated,
        rule=threshold["rule"],
        threshold=threshold["value"],
        chosen_on=threshold["chosen_on"],
        val_sensitivity=val_sensitivity,
        val_specificity=val_specificity,
    )


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
    decision_data: str = "val",
    n_oof: int | None = None,
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
        "fitted_on": None if decision.calibration == "none" else decision_data,
        "n_val": n_val,
        "n_oof": n_oof,
        "before": probability_quality(y_test, raw, params),
        "after": after,
    }
