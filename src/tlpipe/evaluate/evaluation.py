"""Test-split metrics with confidence intervals, written as DVC metrics and plots.

For two classes the decision threshold on P(class 1) is chosen on the val split and
only then applied to test, so the test figures are not tuned on the data they report.
Every metric that cannot be computed (an AUC with a class absent, say) is ``None``,
JSON null, never NaN: strict JSON readers reject NaN.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from tlpipe.core import constants as C
from tlpipe.core import tracking
from tlpipe.core.config import EvaluateParams, section_dict
from tlpipe.core.files import atomic_dir, path_digest, write_csv, write_json

# the metrics that get bootstrap confidence intervals (sensitivity and specificity: two classes only)
CI_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "sensitivity",
    "specificity",
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier",
)
# below this a probability counts as this, so one confident mistake gives a large, finite log loss
_LOG_EPS = 1e-15
# bootstrap weights are processed this many cells (resamples x images) at a time, bounding memory
_BOOTSTRAP_CELLS = 4_000_000


# ------------------------------------------------------------------ decisions and thresholds


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
    """The threshold maximising sensitivity + specificity - 1; ties go to the highest (fewest positive calls)."""
    thresholds, sensitivity, specificity = threshold_table(scores, positives)
    return float(thresholds[np.argmax(sensitivity + specificity - 1.0)])


def target_sensitivity_threshold(scores: np.ndarray, positives: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (the lowest score always does)."""
    thresholds, sensitivity, _ = threshold_table(scores, positives)
    return float(thresholds[np.flatnonzero(sensitivity >= target)[0]])


def choose_threshold(params: EvaluateParams, y_val: np.ndarray | None, p_val: np.ndarray | None) -> dict:
    """The decision threshold for two classes, by the configured rule, with what it achieved on val."""
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
            "reason": f"the val split has no {missing} images",
        }
    if needs_negatives:
        value = youden_threshold(p_val, positives)
    else:
        value = target_sensitivity_threshold(p_val, positives, params.target_sensitivity)
    val_metrics = confusion_metrics(confusion_counts(y_val, predicted_labels(_two_columns(p_val), value), 2))
    return {
        "rule": params.threshold,
        "value": value,
        "chosen_on": "val",
        "n_val": len(positives),
        "val_sensitivity": _number(val_metrics["sensitivity"]),
        "val_specificity": _number(val_metrics["specificity"]),
    }


def operating_points(
    params: EvaluateParams, y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray
) -> dict[str, dict]:
    """The test decision metrics at cut-offs chosen on val: Youden's and each of ``operating_sensitivities``.

    Every cut-off is chosen on val, as the one in use is, so the table shows the trade-off without
    tuning on test. Where the val split is unlike the test population, its val and test figures part ways.
    """
    rules = {"youden": {"threshold": "youden"}}
    rules |= {
        f"sensitivity_{target:g}": {"threshold": "target_sensitivity", "target_sensitivity": target}
        for target in params.operating_sensitivities
    }
    points = {}
    for name, rule in rules.items():
        chosen = choose_threshold(params.model_copy(update=rule), y_val, p_val)
        decided = predicted_labels(_two_columns(p_test), chosen["value"])
        points[name] = {**chosen, **threshold_metrics(y_test, decided, 2)}
    return points


def _two_columns(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - p1, p1])


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
    index = np.searchsorted(edges[1:-1], confidence, side="left")
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


def expected_calibration_error(table: list[dict]) -> float:
    """The count-weighted mean gap between confidence and accuracy over the calibration bins."""
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] / n * abs(row["accuracy"] - row["confidence"]) for row in table))


def _scored_classes(n_classes: int) -> list[int]:
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
    ap = np.mean([average_precision_score(y_true == i, probs[:, i]) for i in _scored_classes(n_classes)])
    return {"roc_auc": float(auc), "pr_auc": float(ap)}


# ------------------------------------------------------------------ bootstrap


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Bootstrap resamples as multiplicities (resamples x n: how often each image was drawn), in chunks."""
    per_chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        rows = min(per_chunk, resamples - done)
        draws = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        done += rows


def _score_groups(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weight of positives and of negatives at each distinct score, highest score first."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    w = weights[:, order]
    is_pos = positives[order]
    return np.add.reduceat(w * is_pos, starts, axis=1), np.add.reduceat(w * ~is_pos, starts, axis=1)


def weighted_roc_auc(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC per row of weights: the share of (positive, negative) pairs ranked right, ties half."""
    pos, neg = _score_groups(scores, positives, weights)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = n_neg[:, None] - np.cumsum(neg, axis=1)
    pairs = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), pairs / (n_pos * n_neg), np.nan)


def weighted_average_precision(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision per row of weights: precision at each threshold weighted by the recall it adds."""
    pos, neg = _score_groups(scores, positives, weights)
    tp, called = np.cumsum(pos, axis=1), np.cumsum(pos + neg, axis=1)
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    n_pos = pos.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (pos * precision).sum(axis=1) / n_pos, np.nan)


def bootstrap_samples(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each CI metric on ``resamples`` bootstrap resamples of the test images; NaN where undefined.

    The decisions ``y_pred`` are fixed beforehand (the threshold came from val), so only
    which images are drawn varies.
    """
    n_classes = probs.shape[1]
    losses = log_loss_per_image(y_true, probs)
    brier = brier_per_image(y_true, probs)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in CI_METRICS}
    for weights in resample_weights(len(y_true), resamples, np.random.default_rng(seed)):
        counts = confusion_metrics(confusion_counts(y_true, y_pred, n_classes, weights))
        drawn = weights.sum(axis=1)
        values = {name: counts[name] for name in CI_METRICS if name in counts}
        # NaN for any class propagates through the mean: the macro average is then undefined
        values["roc_auc"] = np.mean(
            [weighted_roc_auc(probs[:, i], y_true == i, weights) for i in _scored_classes(n_classes)], axis=0
        )
        ap = np.mean(
            [
                weighted_average_precision(probs[:, i], y_true == i, weights)
                for i in _scored_classes(n_classes)
            ],
            axis=0,
        )
        # undefined exactly where the AUC is (a class missing), as for the point estimate
        values["pr_auc"] = np.where(np.isnan(values["roc_auc"]), np.nan, ap)
        values["log_loss"] = weights @ losses / drawn
        values["brier"] = weights @ brier / drawn
        for name, value in values.items():
            chunks[name].append(value)
    return {name: np.concatenate(parts) for name, parts in chunks.items() if parts}


def percentile_interval(samples: np.ndarray, level: float) -> list[float] | None:
    """The percentile-method interval over the resamples where the metric is defined."""
    defined = samples[~np.isnan(samples)]
    if not len(defined):
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(defined, [tail, 100.0 - tail])
    return [float(low), float(high)]


def confidence_intervals(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, resamples: int, level: float, seed: int
) -> dict[str, list[float] | None]:
    """Bootstrap percentile intervals of the CI metrics ({} with no resamples)."""
    if resamples == 0:
        return {}
    samples = bootstrap_samples(y_true, probs, y_pred, resamples, seed)
    return {name: percentile_interval(values, level) for name, values in samples.items()}


# ------------------------------------------------------------------ the metrics document


def _number(value: object) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _headline(counts: dict[str, np.ndarray]) -> dict[str, float | None]:
    # the per-class arrays go to their own block
    return {k: _number(v) for k, v in counts.items() if k not in ("precision", "recall", "f1", "support")}


def threshold_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """The headline decision metrics and the confusion matrix for given predictions."""
    cm = confusion_counts(y_true, y_pred, n_classes)
    return {**_headline(confusion_metrics(cm)), "confusion_matrix": cm.tolist()}


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
    metrics: dict = _headline(counts)
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
    )
    # {low, high} rather than a list: `dvc metrics show/diff` leaves lists out
    metrics["ci"] = {k: None if v is None else {"low": v[0], "high": v[1]} for k, v in intervals.items()}
    metrics["ci_level"] = params.ci_level
    metrics["bootstrap_resamples"] = params.bootstrap_resamples
    return metrics


# ------------------------------------------------------------------ curves


def _curve_classes(y_true: np.ndarray, n_classes: int) -> Iterator[tuple[int, np.ndarray]]:
    # a curve needs both positives and negatives of its class
    for i in _scored_classes(n_classes):
        positives = y_true == i
        if positives.any() and not positives.all():
            yield i, positives


def roc_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list[dict]]:
    """One-vs-rest ROC curve points per class (just the positive class for two classes)."""
    curves = {}
    for i, positives in _curve_classes(y_true, len(classes)):
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        curves[classes[i]] = [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)]
    return curves


def pr_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list[dict]]:
    """One-vs-rest precision-recall curve points per class (just the positive class for two classes)."""
    curves = {}
    for i, positives in _curve_classes(y_true, len(classes)):
        precision, recall, _ = precision_recall_curve(positives, probs[:, i])
        # scikit-learn lists them by decreasing recall; plotted left to right they read better rising
        curves[classes[i]] = [
            {"recall": float(r), "precision": float(p)} for r, p in zip(recall[::-1], precision[::-1])
        ]
    return curves


# ------------------------------------------------------------------ MLflow


def metric_key(name: str) -> str:
    """A class name as part of an MLflow metric name, which allows only ``\\w``, ``-``, ``.`` and space.

    Class names are folder names ("c++", "pepper (red)"): logged as they are, MLflow
    would reject them and fail the stage after its outputs were written.
    """
    return re.sub(r"[^\w\-. ]", "_", name)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# settings echoed in metrics.json for readers of that file; MLflow has them as params already
_NOT_LOGGED = ("ci_level", "bootstrap_resamples", "confusion_matrix")
# what MLflow gets of each operating point (metrics.json has them whole)
OPERATING_POINT_LOGGED = (
    "value",
    "val_sensitivity",
    "val_specificity",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Scalar metrics as flat dotted names (``at_0.5.accuracy``, ``ci.roc_auc.low``), for MLflow.

    Undefined metrics (None) and text (the threshold rule) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key in _NOT_LOGGED:
            continue
        if key == "per_class":
            for cls, values in value.items():
                for name, number in values.items():
                    flat[f"{metric_key(cls)}.{name}"] = number
        elif key == "ci":
            for name, interval in value.items():
                if interval is not None:
                    flat[f"ci.{name}.low"], flat[f"ci.{name}.high"] = interval["low"], interval["high"]
        elif key == "operating_points":
            for name, point in value.items():
                logged = (k for k in OPERATING_POINT_LOGGED if _is_number(point.get(k)))
                flat |= {f"{key}.{name}.{k}": point[k] for k in logged}
        elif isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items() if _is_number(v)}
        elif _is_number(value):
            flat[key] = value
    return flat


# ------------------------------------------------------------------ the stage


def predict_probabilities(model, data, batch_size: int) -> np.ndarray:
    from tlpipe.data.datasets import image_dataset
    from tlpipe.model.inference import probabilities

    return probabilities(model, image_dataset(data, batch_size, with_labels=False))


def prediction_rows(data, probs: np.ndarray, y_pred: np.ndarray, names: list[str]) -> Iterator[dict]:
    for path, label, pred, row in zip(data.rel_paths, data.labels, y_pred, probs):
        yield {
            "path": path,
            "label": names[label],
            "predicted": names[pred],
            **{f"p_{c}": float(v) for c, v in zip(names, row)},
        }


def write_outputs(
    scratch: Path, test, probs: np.ndarray, y_pred: np.ndarray, metrics: dict, names: list[str], bins: int
) -> None:
    """metrics.json, predictions, and the confusion, ROC, PR and calibration plot data."""
    write_json(scratch / "metrics.json", metrics)
    write_csv(
        scratch / "predictions.csv",
        prediction_rows(test, probs, y_pred, names),
        ("path", "label", "predicted", *[f"p_{c}" for c in names]),
    )
    write_csv(
        scratch / "confusion.csv",
        ({"actual": names[t], "predicted": names[p]} for t, p in zip(test.labels, y_pred)),
        ("actual", "predicted"),
    )
    # the folders exist even when no curve can be drawn: DVC expects every declared output
    for folder, curves, fields in (
        ("roc", roc_points(test.labels, probs, names), ("fpr", "tpr")),
        ("pr", pr_points(test.labels, probs, names), ("recall", "precision")),
    ):
        (scratch / folder).mkdir()
        for cls, points in curves.items():
            write_csv(scratch / folder / f"{cls}.csv", points, fields)
    write_csv(
        scratch / "calibration.csv",
        calibration_table(test.labels, probs, bins),
        ("bin", "confidence", "accuracy", "count"),
    )


def evaluate(
    augmented_dir: Path,
    model_path: Path,
    params: EvaluateParams,
    out_dir: Path,
    backbone_weights: str = "imagenet",
) -> dict:
    """The evaluate stage: metrics.json, plot data and per-image predictions for the test split.

    ``backbone_weights`` (train_frozen.weights) tags the MLflow run as ``tlpipe.weights``,
    so a report can tell a from-scratch baseline (``none``) from a transfer run.
    """
    import mlflow

    from tlpipe.data.datasets import load_augmented
    from tlpipe.serve.pyfunc import log_raw_image_model
    from tlpipe.model.storage import load_model

    data = load_augmented(augmented_dir)
    names = data.classes
    test = data.split("test")
    # only two classes have a threshold to choose; a rule other than fixed needs val, the operating
    # points use it when it is there
    has_val = "val" in data.splits and bool(data.splits["val"].paths)
    val = data.split("val") if len(names) == 2 and (params.threshold != "fixed" or has_val) else None
    model = load_model(model_path)
    run_params = {**section_dict(params, "evaluate"), "train_frozen.weights": backbone_weights}
    # the model's digest: how `tlpipe promote` finds the run that evaluated it
    run_tags = {C.WEIGHTS_TAG: backbone_weights, C.MODEL_DIGEST_TAG: path_digest(model_path)}
    with tracking.stage_run("evaluate", run_params, tags=run_tags):
        probs = predict_probabilities(model, test, params.batch_size)
        threshold = operating = None
        if len(names) == 2:
            p_val = None if val is None else predict_probabilities(model, val, params.batch_size)[:, 1]
            threshold = choose_threshold(params, None if val is None else val.labels, p_val)
            if threshold["chosen_on"] == "fallback":
                print(f"evaluate: warning: threshold 0.5 used: {threshold['reason']}", file=sys.stderr)
            if val is not None:
                operating = operating_points(params, val.labels, p_val, test.labels, probs[:, 1])
        metrics = evaluation_metrics(test.labels, probs, names, params, threshold, operating)
        y_pred = predicted_labels(probs, None if threshold is None else threshold["value"])
        with atomic_dir(Path(out_dir)) as scratch:
            write_outputs(scratch, test, probs, y_pred, metrics, names, params.calibration_bins)
        tracking.log_metrics(flat_metrics(metrics))
        tracking.log_pipeline_metrics(flat_metrics(metrics))
        tracking.log_artifact(str(Path(out_dir) / "metrics.json"))
        # the same model taking image files: what `mlflow models serve` and the registry get
        served = log_raw_image_model(
            model_path, Path(augmented_dir) / "classes.json", Path(test.paths[0]).read_bytes()
        )
        mlflow.set_tag(C.LOGGED_MODEL_TAG, served.model_id)
    print(summary_line(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    def show(name: str) -> str:
        value = metrics.get(name)
        if value is None:
            return "n/a"
        interval = metrics["ci"].get(name)
        return f"{value:.4f}" + (
            "" if interval is None else f" [{interval['low']:.4f}, {interval['high']:.4f}]"
        )

    parts = [f"accuracy {show('accuracy')}", f"macro F1 {show('macro_f1')}", f"ROC-AUC {show('roc_auc')}"]
    if "threshold" in metrics:
        parts += [f"sensitivity {show('sensitivity')}", f"specificity {show('specificity')}"]
        parts.append(f"at threshold {metrics['threshold']['value']:.4f} ({metrics['threshold']['rule']})")
    return f"evaluate: test {', '.join(parts)} on {metrics['n_test']} images"
