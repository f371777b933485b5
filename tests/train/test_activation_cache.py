"""Tests for fine-tuning on cached activations: the same training as through the whole network."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from phase_fixtures import BACKBONE, Trained, load, read_history

from tlpipe.core.config import FineTuneParams
from tlpipe.data.datasets import load_augmented, load_images
from tlpipe.model import outputs
from tlpipe.model.backbones import get_backbone, set_top_blocks_trainable
from tlpipe.train.activation_cache import CannotCut, cut_at_first_trainable, multiply_adds
from tlpipe.train.fine_tune import fine_tune

pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models

# the tri fixture's fine-tune: top 2 blocks, 2 epochs, on cached activations (the default)
TRI_FINE_TUNE = {"unfreeze_blocks": 2, "epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "patience": 5}


def test_training_on_cached_activations_equals_training_through_the_whole_network(
    tri: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlpipe")
    cache = tri.root.parent / "ckpt-fine" / "activations" / "train.npy"
    assert np.load(cache, mmap_mode="r").ndim == 4  # the fixture trained on a (n, h, w, c) cache
    params = FineTuneParams(**TRI_FINE_TUNE, activation_cache=False)
    fine_tune(tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c")
    assert "training through the whole network (activation_cache is false)" in caplog.text
    cached, whole = load(tri.model).get_weights(), load(tmp_path / "m.keras").get_weights()
    for a, b in zip(cached, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    moved = sum(not np.array_equal(a, b) for a, b in zip(load(tri.frozen).get_weights(), whole, strict=True))
    assert moved > 0  # both trained: the equality is not two untouched copies
    for row_cached, row_whole in zip(
        read_history(tri.fine_history)[1], read_history(tmp_path / "h.csv")[1], strict=True
    ):
        assert row_cached["val_loss"] == pytest.approx(row_whole["val_loss"], rel=1e-4)
        assert row_cached["loss"] == pytest.approx(row_whole["loss"], rel=1e-4)


def test_another_seed_reuses_the_cached_activations(
    tri: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlpipe")
    checkpoints = tmp_path / "c"
    for seed in (1, 2):
        params = FineTuneParams(**{**TRI_FINE_TUNE, "epochs": 1}, seed=seed)
        fine_tune(tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", checkpoints)
    assert "training the top on cached activations entering 'block15_expand_conv'" in caplog.text
    assert caplog.text.count("already done, reused") == 2  # train and val, on the second run


def test_the_cut_model_computes_what_the_whole_model_does(tri: Trained) -> None:
    model = load(tri.frozen)
    backbone, _ = outputs.find_backbone(model)
    set_top_blocks_trainable(backbone, get_backbone(BACKBONE), 3)
    cut = cut_at_first_trainable(model, backbone)
    assert cut.cut == "block14_expand_conv"
    images = load_images(load_augmented(tri.root).split("val"), 5)
    np.testing.assert_allclose(cut.top(cut.bottom(images)), model(images), rtol=1e-5, atol=1e-6)
    # the top trains the whole model's own variables: nothing to copy back
    shared = {id(v) for v in model.trainable_variables}
    assert {id(v) for v in cut.top.trainable_variables} == shared


def _tiny(below: list[keras.layers.Layer], skip: bool = False) -> tuple[keras.Model, keras.Model]:
    """A backbone: frozen conv, ``below``, a trainable conv (with a skip across it if asked); and a head."""
    inputs = keras.Input((8, 8, 3))
    frozen = keras.layers.Conv2D(4, 3, padding="same", trainable=False)
    x = frozen(inputs)
    for layer in below:
        x = layer(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="trainable_conv")(x)
    if skip:
        y = keras.layers.Add()([y, frozen.output])
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(y), name=BACKBONE)
    outer_in = keras.Input((8, 8, 3))
    head = keras.layers.Dense(1, name=outputs.HEAD_OUTPUT)
    drop = keras.layers.Dropout(0.1, name=outputs.HEAD_DROPOUT)
    return keras.Model(outer_in, head(drop(backbone(outer_in)))), backbone


@pytest.mark.parametrize(
    ("below", "skip", "reason"),
    [
        ([keras.layers.Dropout(0.5)], False, "behaves differently in training"),
        ([keras.layers.GaussianNoise(1.0)], False, "behaves differently in training"),
        ([keras.layers.ReLU()], True, "also read activations from below it"),
    ],
)
def test_a_cut_that_would_change_the_training_is_refused(
    below: list[keras.layers.Layer], skip: bool, reason: str
) -> None:
    model, backbone = _tiny(below, skip)
    with pytest.raises(CannotCut, match=reason):
        cut_at_first_trainable(model, backbone)


def test_a_frozen_batchnorm_below_the_cut_is_accepted() -> None:
    norm = keras.layers.BatchNormalization()
    model, backbone = _tiny([norm, keras.layers.ReLU()])
    norm.trainable = False
    cut = cut_at_first_trainable(model, backbone)
    assert cut.cut == "trainable_conv"
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(cut.top(cut.bottom(x)), model(x), rtol=1e-5, atol=1e-5)


def test_multiply_adds_count_each_kernel_weight_once_per_output_position() -> None:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8 x 8 positions x (3 x 3 x 3 x 4) weights
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4 x 4 x (3 x 3 x 4 x 1)
    x = keras.layers.BatchNormalization()(x)  # no kernel: left out
    outputs_ = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))  # 4 x 5
    model = keras.Model(inputs, outputs_)
    assert multiply_adds(model.layers) == 64 * 108 + 16 * 36 + 20
    assert multiply_adds([keras.Sequential([model])]) == multiply_adds(model.layers)  # nested models count


def test_a_bottom_doing_little_of_the_work_is_not_cut(tri: Trained) -> None:
    # every block trainable (the default "all"): below the cut lies only the stem, under 10 % of the work
    model = load(tri.frozen)
    backbone, _ = outputs.find_backbone(model)
    spec = get_backbone(BACKBONE)
    set_top_blocks_trainable(backbone, spec, spec.block_count)
    with pytest.raises(CannotCut, match=r"does 2\.8% of the backbone's multiply-adds \(under 10%\)"):
        cut_at_first_trainable(model, backbone)


def test_training_every_layer_has_nothing_to_cache(tri: Trained) -> None:
    model = load(tri.frozen)
    backbone, _ = outputs.find_backbone(model)
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = True
    with pytest.raises(CannotCut, match="nothing with weights lies below"):
        cut_at_first_trainable(model, backbone)
