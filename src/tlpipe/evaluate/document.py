"""The metrics document (metrics.json): test metrics at the decision rule, with their intervals.

Every metric that cannot be computed (an AUC with a class absent, say) is ``None``,
JSON null, never NaN: strict JSON readers reject NaN.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import top_k_accuracy_score

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.bootstrap import confidence_intervals
from tlpipe.evaluate.metrics import (
    brier_per_image,
    calibration_table,
    confusion_counts,
    confusion_metrics,
    expected_calibration_error,
    headline,
    log_loss_per_image,
    ranking_metrics,
    threshold_metrics,
)
from tlpipe.evaluate.thresholds import predicted_labels


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    threshold: float | None = None,
    top_k: int = 2,
    calibration_bins: int = 10,
) -> dict:
    """Headline, per-class and probability metrics; decisions by argmax or, for two classes, threshold."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = predicted_labels(probs, threshold)
    n_classes = len(classes)
    cm = confusion_counts(y_true, y_pred, n_classes)
    counts = confusion_metrics(cm)
    metrics: dict = headline(counts)
    if 1 < top_k < n_classes:
        labels = list(range(n_classes))
        metrics[f"top_{top_k}_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=top_k, labels=labels))
    metrics.update(ranking_metrics(y_true, probs))
    metrics["log_loss"] = float(log_loss_per_image(y_true, probs).mean())
    metrics["brier"] = float(brier_per_image(y_true, probs).mean())
    metrics["ece"] = expected_calibration_error(calibration_table(y_true, probs, calibration_bins))
    metrics["n_test"] = len(y_true)
    metrics["per_class"] = {
        c: {
            "precision": float(counts["precision"][i]),
            "recall": float(counts["recall"][i]),
            "f1": float(counts["f1"][i]),
            "support": int(counts["support"][i]),
        }
        for i, c in enumerate(classes)
    }
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def evaluation_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    params: EvaluateParams,
    threshold: dict | None,
    operating: dict[str, dict] | None = None,
) -> dict:
    """metrics.json: the test metrics at the chosen decision rule, at 0.5 and at the operating points
    (two classes), and their CIs."""
    value = None if threshold is None else threshold["value"]
    metrics = classification_metrics(y_true, probs, classes, value, params.top_k, params.calibration_bins)
    if threshold is not None:
        metrics["threshold"] = threshold
        metrics["at_0.5"] = threshold_metrics(y_true, predicted_labels(probs, 0.5), len(classes))
    if operating:
        metrics["operating_points"] = operating
    y_pred = predicted_labels(probs, value)
    intervals = confidence_intervals(
        np.asarray(y_true, dtype=np.int64),
        probs,
        y_pred,
        params.bootstrap_resamples,
        params.ci_level,
        params.seed,
        params.calibration_bins,
    )
    # {low, high} rather than a list: `dvc metrics show/diff` leaves lists out
    metrics["ci"] = {k: None if v is None else {"low": v[0], "high": v[1]} for k, v in intervals.items()}
    metrics["ci_level"] = params.ci_level
    metrics["bootstrap_resamples"] = params.bootstrap_resamples
    return metrics
