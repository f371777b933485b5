"""Point metrics of the test split: from confusion counts, from probabilities, and ROC/PR curve points.

Counts may carry bootstrap weights (one confusion matrix per resample), so the point
estimate and every resample share one implementation. A metric that cannot be computed
is NaN here and ``None`` in the metrics document: strict JSON readers reject NaN.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

# below this a probability counts as this, so one confident mistake gives a large, finite log loss
_LOG_EPS = 1e-15
# per-class arrays of confusion_metrics: metrics.json has them in their own block
PER_CLASS = ("precision", "recall", "f1", "support")


# ------------------------------------------------------------------ metrics from (weighted) counts


def confusion_counts(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Confusion matrices (rows actual, columns predicted), one per row of ``weights``.

    ``weights`` (resamples x images) holds how often each image occurs in a bootstrap
    resample; without it the result is the plain (n_classes, n_classes) matrix.
    """
    cells = n_classes * n_classes
    codes = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    if weights is None:
        return np.bincount(codes, minlength=cells).reshape(n_classes, n_classes)
    rows = weights.shape[0]
    index = (np.arange(rows)[:, None] * cells + codes[None, :]).ravel()
    counts = np.bincount(index, weights=weights.ravel(), minlength=rows * cells)
    return counts.reshape(rows, n_classes, n_classes)


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion matrices (any leading axes), as scikit-learn defines them.

    Precision and F1 of a class never predicted are 0 and its recall, when it is absent,
    is 0 in the per-class and macro figures (scikit-learn's ``zero_division=0``); balanced
    accuracy averages the recall of the classes present only. Sensitivity (recall of
    class 1) and specificity (recall of class 0), for two classes, are NaN when undefined.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    n = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        # 2TP / (2TP + FP + FN), and FP + FN + 2TP is predicted + support
        f1 = np.where(predicted + support > 0, 2 * tp / (predicted + support), 0.0)
        recall_or_0 = np.nan_to_num(recall)
        metrics = {
            "accuracy": tp.sum(axis=-1) / n,
            "balanced_accuracy": np.nanmean(recall, axis=-1),
            "macro_precision": precision.mean(axis=-1),
            "macro_recall": recall_or_0.mean(axis=-1),
            "macro_f1": f1.mean(axis=-1),
            "weighted_precision": (precision * support).sum(axis=-1) / n,
            "weighted_recall": (recall_or_0 * support).sum(axis=-1) / n,
            "weighted_f1": (f1 * support).sum(axis=-1) / n,
            "precision": precision,
            "recall": recall_or_0,
            "f1": f1,
            "support": support,
        }
    if cm.shape[-1] == 2:
        metrics["sensitivity"] = recall[..., 1]
        metrics["specificity"] = recall[..., 0]
    return metrics


def number_or_none(value: float | np.ndarray) -> float | None:
    """A metric as a JSON-safe float: NaN (undefined) becomes ``None``."""
    number = float(value)
    return None if np.isnan(number) else number


def headline(counts: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The scalar metrics of :func:`confusion_metrics`, JSON-safe; the per-class arrays left out."""
    return {k: number_or_none(v) for k, v in counts.items() if k not in PER_CLASS}


def threshold_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """The headline decision metrics and the confusion matrix for given predictions."""
    cm = confusion_counts(y_true, y_pred, n_classes)
    return {**headline(confusion_metrics(cm)), "confusion_matrix": cm.tolist()}


# ------------------------------------------------------------------ metrics from probabilities


def log_loss_per_image(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """-log P(true class), the probability clipped so a confident mistake stays finite."""
    return -np.log(np.clip(probs[np.arange(len(y_true)), y_true], _LOG_EPS, 1.0))


def brier_per_image(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Squared error to the one-hot truth, summed over classes; two classes: on class 1 only.

    The two-class form is the usual Brier score, half the summed form.
    """
    if probs.shape[1] == 2:
        return (probs[:, 1] - (y_true == 1)) ** 2
    onehot = np.eye(probs.shape[1])[y_true]
    return ((probs - onehot) ** 2).sum(axis=1)


def calibration_table(y_true: np.ndarray, probs: np.ndarray, bins: int) -> list[dict]:
    """Mean top-class confidence and accuracy per equal-width confidence bin; empty bins left out.

    Bins are (low, high], the first one closed, so a confidence of exactly 1 counts.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = confidence_bins(confidence, bins)
    rows = []
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            rows.append(
                {
                    "bin": f"{edges[b]:.3g}-{edges[b + 1]:.3g}",
                    "confidence": float(confidence[chosen].mean()),
                    "accuracy": float(correct[chosen].mean()),
                    "count": int(chosen.sum()),
                }
            )
    return rows


def confidence_bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's equal-width bin, (low, high] with the first one closed."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], confidence, side="left")


def expected_calibration_error(table: list[dict]) -> float:
    """The count-weighted mean gap between confidence and accuracy over the calibration bins."""
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] / n * abs(row["accuracy"] - row["confidence"]) for row in table))


def scored_classes(n_classes: int) -> list[int]:
    """The classes whose one-vs-rest scores the ranking metrics and curves use."""
    # two classes: one score, P(class 1), carries everything; more: one-vs-rest per class
    return [1] if n_classes == 2 else list(range(n_classes))


def ranking_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC and PR-AUC (average precision), one-vs-rest macro averages for more than two classes.

    Both are undefined (None) unless every class is present: a one-vs-rest curve needs positives
    and negatives of every class.
    """
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return {"roc_auc": None, "pr_auc": None}
    if n_classes == 2:
        auc = roc_auc_score(y_true, probs[:, 1])
    else:
        auc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    ap = np.mean([average_precision_score(y_true == i, probs[:, i]) for i in scored_classes(n_classes)])
    return {"roc_auc": float(auc), "pr_auc": float(ap)}


# ------------------------------------------------------------------ curves


def _curve_classes(y_true: np.ndarray, n_classes: int) -> Iterator[tuple[int, np.ndarray]]:
    # a curve needs both positives and negatives of its class
    for i in scored_classes(n_classes):
        positives = y_true == i
        if positives.any() and not positives.all():
            yield i, positives


def roc_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list[dict]]:
    """One-vs-rest ROC curve points per class (just the positive class for two classes)."""
    curves = {}
    for i, positives in _curve_classes(y_true, len(classes)):
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        curves[classes[i]] = [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr, strict=True)]
    return curves


def pr_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list[dict]]:
    """One-vs-rest precision-recall curve points per class (just the positive class for two classes)."""
    curves = {}
    for i, positives in _curve_classes(y_true, len(classes)):
        precision, recall, _ = precision_recall_curve(positives, probs[:, i])
        # scikit-learn lists them by decreasing recall; plotted left to right they read better rising
        curves[classes[i]] = [
            {"recall": float(r), "precision": float(p)}
            for r, p in zip(recall[::-1], precision[::-1], strict=True)
        ]
    return curves
