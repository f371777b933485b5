"""Bootstrap percentile confidence intervals of the test metrics.

A resample is a row of multiplicities (how often each test image was drawn), so every
metric is computed for many resamples at once from weighted counts, without copying
the images' probabilities per resample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tlpipe.evaluate.metrics import (
    brier_per_image,
    confidence_bins,
    confusion_counts,
    confusion_metrics,
    log_loss_per_image,
    scored_classes,
)

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
    "ece",
)
# bootstrap weights are processed this many cells (resamples x images) at a time, bounding memory
_BOOTSTRAP_CELLS = 4_000_000


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


def weighted_ece(weights: np.ndarray, probs: np.ndarray, y_true: np.ndarray, bins: int) -> np.ndarray:
    """The expected calibration error of each resample: sum over bins of |accuracy - confidence|
    weighted by the bin's share, i.e. |sum(correct) - sum(confidence)| per bin over all images."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    onehot = np.eye(bins)[confidence_bins(confidence, bins)]
    gap = np.abs(weights @ (onehot * correct[:, None]) - weights @ (onehot * confidence[:, None]))
    return gap.sum(axis=1) / weights.sum(axis=1)


def bootstrap_samples(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, resamples: int, seed: int, bins: int = 10
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
            [weighted_roc_auc(probs[:, i], y_true == i, weights) for i in scored_classes(n_classes)], axis=0
        )
        ap = np.mean(
            [
                weighted_average_precision(probs[:, i], y_true == i, weights)
                for i in scored_classes(n_classes)
            ],
            axis=0,
        )
        # undefined exactly where the AUC is (a class missing), as for the point estimate
        values["pr_auc"] = np.where(np.isnan(values["roc_auc"]), np.nan, ap)
        values["log_loss"] = weights @ losses / drawn
        values["brier"] = weights @ brier / drawn
        values["ece"] = weighted_ece(weights, probs, y_true, bins)
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
    y_true: np.ndarray,
    probs: np.ndarray,
    y_pred: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
    bins: int = 10,
) -> dict[str, list[float] | None]:
    """Bootstrap percentile intervals of the CI metrics ({} with no resamples)."""
    if resamples == 0:
        return {}
    samples = bootstrap_samples(y_true, probs, y_pred, resamples, seed, bins)
    return {name: percentile_interval(values, level) for name, values in samples.items()}
