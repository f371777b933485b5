"""Does the test split look like val? A diagnostic from the model's scores, without test labels.

Two signs, both computed as a deployment would see them (no test labels):

* the scores' distributions: a two-sample Kolmogorov-Smirnov test between the val and
  test images' calibrated P(class 1) (two classes) or top-class confidence;
* the class prior: estimated on test from the calibrated probabilities by the EM
  procedure of Saerens, Latinne and Decaestecker (2002), against val's known prior.

A decision rule and a calibration fitted on val carry over to test only as far as test
looks like val; when it does not, the report says so plainly.
"""

from __future__ import annotations

import numpy as np

KS_P = 0.01  # below it the score distributions differ
PRIOR_GAP = 0.10  # a larger gap in any class's share is a different population
_EM_STEPS = 200


def estimated_prior(probs: np.ndarray, train_prior: np.ndarray) -> np.ndarray:
    """The class prior of the images behind ``probs``, by EM on the posteriors (Saerens et al. 2002)."""
    probs = np.asarray(probs, dtype=np.float64)
    prior = np.asarray(train_prior, dtype=np.float64)
    for _ in range(_EM_STEPS):
        adjusted = probs * (prior / train_prior)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        updated = adjusted.mean(axis=0)
        if np.abs(updated - prior).max() < 1e-9:
            return updated
        prior = updated
    return prior


def shift_document(
    val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray, classes: list[str]
) -> dict:
    """metrics.json's ``shift``: the KS test, the priors, and whether test looks unlike val."""
    from scipy.stats import ks_2samp

    def score(probs: np.ndarray) -> np.ndarray:
        return probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)

    ks = ks_2samp(score(val_probs), score(test_probs))
    val_prior = np.bincount(np.asarray(val_labels, dtype=np.int64), minlength=len(classes)) / len(val_labels)
    test_prior = estimated_prior(test_probs, np.clip(val_prior, 1e-6, None))
    gap = float(np.abs(test_prior - val_prior).max())
    unlike = bool(ks.pvalue < KS_P or gap > PRIOR_GAP)
    return {
        "scores_ks_statistic": float(ks.statistic),
        "scores_ks_p": float(ks.pvalue),
        "val_prior": dict(zip(classes, map(float, val_prior), strict=True)),
        "test_prior_estimated": dict(zip(classes, map(float, test_prior), strict=True)),
        "largest_prior_gap": gap,
        "test_unlike_val": unlike,
        "statement": statement(unlike, float(ks.statistic), float(ks.pvalue), gap),
    }


def statement(unlike: bool, ks_statistic: float, ks_p: float, gap: float) -> str:
    if not unlike:
        return (
            f"The test split looks like val (scores: KS {ks_statistic:.3f}, p = {ks_p:.2g}; estimated class "
            f"shares within {gap:.2f}): a decision that holds on val should carry over."
        )
    return (
        f"Caution: the test split looks unlike val (scores: KS {ks_statistic:.3f}, p = {ks_p:.2g}; estimated "
        f"class shares differ by up to {gap:.2f}), so a decision rule and calibration that hold on val may not "
        "hold on test, nor on the images this model will meet."
    )
