"""Tests for the train-frozen phase: real (tiny) runs, and the model they hand to fine-tuning."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from phase_fixtures import BACKBONE, HISTORY_COLUMNS, Trained, load, read_history

from augmented_fixture import make_augmented
from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.data.datasets import image_dataset, load_augmented
from tlpipe.model import outputs
from tlpipe.model.backbones import get_backbone
from tlpipe.train.fine_tune import fine_tune
from tlpipe.train.fitting import compile_for
from tlpipe.train.frozen import train_frozen
from tlpipe.train.optimization import encode_labels

pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def test_frozen_model_loads_with_a_softmax_head(tri: Trained) -> None:
    model = load(tri.frozen)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer(outputs.HEAD_OUTPUT).get_config()["activation"] == "softmax"
    backbone, name = outputs.find_backbone(model)
    assert name == BACKBONE and backbone.trainable is False
    assert not [p for p in tri.frozen.parent.iterdir() if "partial" in p.name]  # atomic save cleaned up


def test_frozen_backbone_is_exactly_the_pretrained_one(tri: Trained, fresh_backbone: keras.Model) -> None:
    backbone, _ = outputs.find_backbone(load(tri.frozen))
    compared = 0
    for layer in fresh_backbone.layers:
        for saved, fresh in zip(
            backbone.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True
        ):
            np.testing.assert_array_equal(saved, fresh, err_msg=layer.name)
            compared += 1
    assert compared > 200  # every conv kernel and BN statistic of the backbone


def test_frozen_model_carries_the_best_trained_head(tri: Trained) -> None:
    """Its val loss is the history's best: the trained head (best epoch) was copied, not a fresh one."""
    model = load(tri.frozen)
    compile_for(model, TrainFrozenParams(learning_rate=1e-3), 3)
    val = load_augmented(tri.root).split("val")
    loss, _ = model.evaluate(image_dataset(val, 8, targets=encode_labels(val.labels, 3)), verbose=0)
    _, rows = read_history(tri.frozen_history)
    assert loss == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-4)
    assert loss == pytest.approx(tri.frozen_metrics["best_val_loss"], rel=1e-4)


def test_two_classes_train_a_one_unit_sigmoid_head(binary: Trained) -> None:
    val = load_augmented(binary.root).split("val")
    for path in (binary.frozen, binary.model):
        model = load(path)
        assert model.output_shape == (None, 1)
        assert model.get_layer(outputs.HEAD_OUTPUT).get_config()["activation"] == "sigmoid"
        raw = model.predict(image_dataset(val, 8, with_labels=False), verbose=0)
        assert raw.shape == (6, 1) and ((raw > 0) & (raw < 1)).all()
        np.testing.assert_allclose(outputs.class_probabilities(raw).sum(axis=1), 1.0)
    assert len(read_history(binary.frozen_history)[1]) == 2
    fields, rows = read_history(binary.fine_history)
    assert set(fields) == HISTORY_COLUMNS and len(rows) == 1


def test_a_keras_applications_backbone_trains_through_both_phases(tmp_path: Path) -> None:
    """The zoo's models go through the same code: features, assembly, block-aware unfreezing."""
    root = make_augmented(tmp_path / "augmented", ["red", "green"], {"train": 4, "val": 2})
    frozen_params = TrainFrozenParams(backbone="mobilenet_v3_small", weights="none", epochs=1, batch_size=4)
    train_frozen(root, frozen_params, tmp_path / "f.keras", tmp_path / "f.csv", tmp_path / "c1")
    backbone, name = outputs.find_backbone(load(tmp_path / "f.keras"))
    assert name == "mobilenet_v3_small"
    params = FineTuneParams(unfreeze_blocks=1, epochs=1, batch_size=4, learning_rate=1e-4)
    # "imagenet" here only says "treat the backbone as pretrained": top-block unfreezing, not from scratch
    metrics = fine_tune(
        root,
        tmp_path / "f.keras",
        params,
        tmp_path / "m.keras",
        tmp_path / "h.csv",
        tmp_path / "c2",
        "imagenet",
    )
    blocks = get_backbone(name).layer_blocks(backbone)
    top = get_backbone(name).block_count - 1
    expected = sum(
        1
        for layer in backbone.layers
        if blocks[layer.name] == top
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    )
    assert metrics["trainable_layers"] == expected > 0
    assert load(tmp_path / "m.keras").output_shape == (None, 1)
