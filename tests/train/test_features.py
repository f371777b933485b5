"""Tests for the frozen phase's feature cache: same results as the naive fit, reused while valid."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from phase_fixtures import Trained, load

from naive_fit import fit_through_frozen_backbone
from tlpipe.core.config import TrainFrozenParams
from tlpipe.data.datasets import image_dataset, load_augmented
from tlpipe.model import outputs
from tlpipe.train.features import compute_features, feature_dataset
from tlpipe.train.fitting import compile_for
from tlpipe.train.frozen import train_frozen
from tlpipe.train.head import build_head
from tlpipe.train.optimization import encode_labels

pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def test_assembled_model_equals_head_on_cached_features(
    tri: Trained, fresh_backbone: keras.Model, tmp_path: Path
) -> None:
    """The frozen phase trains on cached features: the saved model must compute the same thing."""
    val = load_augmented(tri.root).split("val")
    features = compute_features(fresh_backbone, val, 4, tmp_path / "val.npy", "key")
    assert features.shape == (9, 1280)
    model = load(tri.frozen)
    head_on_features = keras.ops.convert_to_numpy(model.get_layer(outputs.HEAD_OUTPUT)(features))
    predictions = model.predict(image_dataset(val, 4, with_labels=False), verbose=0)
    np.testing.assert_allclose(predictions, head_on_features, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


def test_training_on_cached_features_equals_training_through_the_frozen_backbone(
    tri: Trained, fresh_backbone: keras.Model, tmp_path: Path
) -> None:
    """Same initial head, same batches in the same order: the same trained head, either way."""
    data = load_augmented(tri.root)
    params = TrainFrozenParams(epochs=3, batch_size=4, learning_rate=0.01, dropout=0.0)
    keras.utils.set_random_seed(3)
    cached_head = build_head(1280, 3, 0.0)
    naive_head = build_head(1280, 3, 0.0)
    naive_head.set_weights(cached_head.get_weights())
    initial = cached_head.get_weights()

    features = {s: compute_features(fresh_backbone, data.split(s), 4, tmp_path / f"{s}.npy", "k")
                for s in ("train", "val")}  # fmt: skip
    targets = {s: encode_labels(data.split(s).labels, 3) for s in ("train", "val")}
    compile_for(cached_head, params, 3)
    cached_head.fit(
        feature_dataset(features["train"], targets["train"], 4, None),
        validation_data=feature_dataset(features["val"], targets["val"], 4, None),
        epochs=3, verbose=0,
    )  # fmt: skip
    fit_through_frozen_backbone(fresh_backbone, naive_head, data, params)

    for cached, naive, start in zip(
        cached_head.get_weights(), naive_head.get_weights(), initial, strict=True
    ):
        assert not np.allclose(cached, start)  # both trained
        np.testing.assert_allclose(cached, naive, rtol=1e-4, atol=1e-5)


def test_feature_cache_is_reused_while_backbone_and_images_are_unchanged(
    tri: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlpipe")
    ckpt = tmp_path / "ckpt"
    first = TrainFrozenParams(epochs=1, batch_size=8)
    train_frozen(tri.root, first, tmp_path / "a.keras", tmp_path / "a.csv", ckpt)
    caplog.clear()
    cache = ckpt / "features" / "train.npy"
    stamp = cache.stat().st_mtime_ns
    # head params changed: the features stay valid
    second = TrainFrozenParams(epochs=1, batch_size=8, dropout=0.5, learning_rate=0.02)
    train_frozen(tri.root, second, tmp_path / "b.keras", tmp_path / "b.csv", ckpt)
    assert "18 of 18 images already done, reused" in caplog.text
    assert cache.stat().st_mtime_ns == stamp
    caplog.clear()
    # other backbone weights: recomputed
    third = TrainFrozenParams(epochs=1, batch_size=8, weights="none")
    train_frozen(tri.root, third, tmp_path / "c.keras", tmp_path / "c.csv", ckpt)
    assert "already done" not in caplog.text
    assert cache.stat().st_mtime_ns != stamp
