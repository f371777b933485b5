"""The evaluate stage's guard: fitted on training features, its cut-off on val, measured on test and on
images it should flag (:mod:`tlpipe.evaluate.ood`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.ood import far_images, near_images, separation
from tlpipe.model.guard import Guard, fit_guard

if TYPE_CHECKING:
    import keras

    from tlpipe.data.datasets import AugmentedData, SplitData

logger = logging.getLogger(__name__)


def scored(with_features: keras.Model, data: SplitData, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A split's raw class probabilities and pooled features, in manifest order, in one pass."""
    from tlpipe.data.datasets import image_dataset
    from tlpipe.model.outputs import class_probabilities

    outputs, features = with_features.predict(image_dataset(data, batch_size, with_labels=False), verbose=0)
    return class_probabilities(outputs), np.asarray(features, dtype=np.float64)


def fit_subset(train: SplitData, limit: int, seed: int) -> SplitData:
    """At most ``limit`` training images, drawn reproducibly: the covariance needs thousands, not all."""
    from tlpipe.data.datasets import SplitData

    if len(train.paths) <= limit:
        return train
    keep = np.sort(np.random.default_rng(seed).choice(len(train.paths), limit, replace=False))
    return SplitData([train.paths[i] for i in keep], train.labels[keep], [train.rel_paths[i] for i in keep])


def guard_for(
    with_features: keras.Model,
    data: AugmentedData,
    val_features: np.ndarray | None,
    test_features: np.ndarray,
    params: EvaluateParams,
) -> tuple[Guard | None, dict, np.ndarray | None]:
    """The guard, metrics.json's ``guard`` (its rates on val, test and the unfamiliar sets), and the
    test images' scores (None without a guard)."""
    train = data.splits.get("train")
    if params.guard_fit_images == 0 or val_features is None or train is None or len(train.paths) < 2:
        why = (
            "off (evaluate.guard_fit_images: 0)" if params.guard_fit_images == 0 else "no train or val images"
        )
        return None, {"fitted": False, "reason": why}, None
    _, train_features = scored(
        with_features, fit_subset(train, params.guard_fit_images, params.seed), params.batch_size
    )
    guard = fit_guard(train_features, val_features, params.guard_accept)
    test_scores = guard.scores(test_features)
    size = data.image_size

    def scores_of(pixels: np.ndarray) -> np.ndarray:
        return guard.scores(
            np.asarray(with_features.predict(pixels, batch_size=params.batch_size, verbose=0)[1])
        )

    from tlpipe.data.datasets import load_images

    test = data.split("test")
    near = near_images(load_images(test, min(len(test.paths), 64)))
    far = separation(test_scores, scores_of(far_images(size, params.seed)), guard.cutoff)
    far["images"] = "crops of scikit-learn's sample photographs and the demo shapes"
    nearer = separation(test_scores, scores_of(near), guard.cutoff)
    nearer["images"] = "test images with grey values inverted, turned a quarter"
    doc: dict[str, Any] = {
        "fitted": True,
        "score": "mahalanobis distance of the pooled backbone features (Ledoit-Wolf covariance)",
        "n_fit": guard.n_fit,
        "accept": guard.accept,
        "cutoff": guard.cutoff,
        "val_flagged": float(np.mean(guard.scores(val_features) > guard.cutoff)),
        "test_flagged": float(np.mean(guard.unfamiliar(test_scores))),
        "far": far,
        "near": nearer,
    }
    logger.info(
        "evaluate: guard flags %.1f%% of test images; AUROC %.3f on far-away images, %.3f on nearer ones",
        100 * doc["test_flagged"], far["auroc"], nearer["auroc"],
    )  # fmt: skip
    return guard, doc, test_scores
