"""Tests for the fine-tune phase: which layers train, at which rate, and which weights are kept."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from phase_fixtures import BACKBONE, TOP_TWO_BLOCKS, Trained, changed_layers, load, read_history

from tlpipe.core.config import FineTuneParams
from tlpipe.core.errors import PipelineError
from tlpipe.data.datasets import image_dataset, load_augmented
from tlpipe.model import outputs
from tlpipe.model.backbones import get_backbone
from tlpipe.train.fine_tune import (
    UnfreezeStep,
    _unfreeze_description,
    fine_tune,
    phase_params,
    unfreeze,
    unfreeze_plan,
)
from tlpipe.train.fitting import compile_for
from tlpipe.train.optimization import encode_labels

pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def test_fine_tune_changes_only_the_top_blocks(tri: Trained) -> None:
    before, _ = outputs.find_backbone(load(tri.frozen))
    after, _ = outputs.find_backbone(load(tri.model))
    changed, unchanged_norms = set(), 0
    for layer in after.layers:
        old, new = before.get_layer(layer.name).get_weights(), layer.get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name}: BatchNormalization weights or moving statistics changed"
            unchanged_norms += 1
        elif not same:
            changed.add(layer.name)
    assert changed == TOP_TWO_BLOCKS
    assert unchanged_norms > 40
    assert tri.fine_metrics["trainable_layers"] == len(TOP_TWO_BLOCKS)


def test_fine_tune_also_trains_the_head(tri: Trained) -> None:
    old = load(tri.frozen).get_layer(outputs.HEAD_OUTPUT).get_weights()
    new = load(tri.model).get_layer(outputs.HEAD_OUTPUT).get_weights()
    assert not np.array_equal(old[0], new[0])


def test_fine_tune_rejects_too_many_blocks(tri: Trained, tmp_path: Path) -> None:
    params = FineTuneParams(unfreeze_blocks=get_backbone(BACKBONE).block_count + 1, epochs=1)
    with pytest.raises(PipelineError, match=r"allowed: 0\.\.17"):
        fine_tune(tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c")
    assert not (tmp_path / "m.keras").exists()


def test_fine_tune_without_a_frozen_model_says_which_stage_to_run(tri: Trained, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the train-frozen stage first"):
        fine_tune(
            tri.root,
            tmp_path / "nope.keras",
            FineTuneParams(),
            tmp_path / "m.keras",
            tmp_path / "h",
            tmp_path / "c",
        )


def test_fine_tune_that_only_hurts_keeps_the_frozen_weights(tri: Trained, tmp_path: Path) -> None:
    # a huge learning rate wrecks the weights in one step: no epoch can beat the start
    params = FineTuneParams(unfreeze_blocks=2, epochs=1, batch_size=8, learning_rate=50.0, patience=1)
    metrics = fine_tune(
        tri.root, tri.frozen, params, tmp_path / "model.keras", tmp_path / "history.csv", tmp_path / "c"
    )
    assert metrics["kept_initial_weights"] == 1
    assert metrics["best_val_loss"] > metrics["initial_val_loss"]
    kept, frozen = load(tmp_path / "model.keras"), load(tri.frozen)
    for a, b in zip(kept.get_weights(), frozen.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fine_tune_that_helps_keeps_its_weights(tri: Trained) -> None:
    assert tri.fine_metrics["kept_initial_weights"] == 0
    assert tri.fine_metrics["best_val_loss"] < tri.fine_metrics["initial_val_loss"]


# ------------------------------------------------------------ fine-tuning recipes


def test_gradual_unfreezing_plan() -> None:
    plan = unfreeze_plan(FineTuneParams(unfreeze_blocks=3, unfreeze_every=2, epochs=7), 17)
    assert plan == [UnfreezeStep(0, 2, 1), UnfreezeStep(2, 4, 2), UnfreezeStep(4, 7, 3)]
    # more steps than epochs allow: the plan stops where the epochs do
    short = unfreeze_plan(FineTuneParams(unfreeze_blocks=5, unfreeze_every=2, epochs=3), 17)
    assert short == [UnfreezeStep(0, 2, 1), UnfreezeStep(2, 3, 2)]
    assert unfreeze_plan(FineTuneParams(unfreeze_blocks=4, epochs=3), 17) == [UnfreezeStep(0, 3, 4)]
    assert unfreeze_plan(FineTuneParams(unfreeze_from="top_conv", epochs=3), 17) == [UnfreezeStep(0, 3, None)]
    # "all" means the backbone's own block count
    assert unfreeze_plan(FineTuneParams(unfreeze_blocks="all", epochs=3), 5) == [UnfreezeStep(0, 3, 5)]


def test_gradual_unfreezing_trains_one_more_block_per_step(
    tri: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlpipe")
    params = FineTuneParams(unfreeze_blocks=2, unfreeze_every=1, epochs=2, batch_size=8, learning_rate=1e-3)
    metrics = fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    assert "epochs 1-1: 1 backbone layers trainable (top 1 blocks" in caplog.text
    assert "epochs 2-2: 4 backbone layers trainable (top 2 blocks" in caplog.text
    assert "through the whole network (gradual unfreezing moves the cut every step)" in caplog.text
    assert len(read_history(tmp_path / "h.csv")[1]) == 2
    # the saved weights are the best epoch's: block15 has moved only if that is the second
    expected = TOP_TWO_BLOCKS if metrics["best_epoch"] == 2 else {"top_conv"}
    assert changed_layers(tri.frozen, tmp_path / "m.keras") == expected


def test_unfreeze_from_a_named_layer(tri: Trained, tmp_path: Path) -> None:
    params = FineTuneParams(unfreeze_from="block15_project_conv", epochs=1, batch_size=8, learning_rate=1e-4)
    metrics = fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    assert metrics["trainable_layers"] == 2
    assert changed_layers(tri.frozen, tmp_path / "m.keras") == {"block15_project_conv", "top_conv"}


def test_from_scratch_trains_every_layer_batchnorm_included(tri: Trained) -> None:
    params = FineTuneParams(epochs=1, batch_size=8, scratch_learning_rate=2e-3)
    step = unfreeze_plan(params, 17)[0]
    # the phase's rate, resolved once: every later step reads it from the one params object
    scratch_params = phase_params(params, scratch=True)
    assert scratch_params.learning_rate == 2e-3
    assert scratch_params.model_dump(exclude={"learning_rate"}) == params.model_dump(
        exclude={"learning_rate"}
    )
    assert phase_params(params, scratch=False).learning_rate == params.learning_rate
    assert "BatchNormalization included" in _unfreeze_description(params, step, scratch=True)

    # the preparation fine_tune makes, then one training step: every layer moves, BN statistics too
    model = load(tri.frozen)
    backbone, name = outputs.find_backbone(model)
    count = unfreeze(backbone, name, scratch_params, step, scratch=True)
    assert count == sum(1 for layer in backbone.layers if layer.weights)
    compile_for(model, scratch_params, 3)
    assert float(model.optimizer.learning_rate) == pytest.approx(2e-3)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers}
    data = load_augmented(tri.root).split("train")
    model.fit(image_dataset(data, 8, targets=encode_labels(data.labels, 3)).take(1), verbose=0)
    for layer in backbone.layers:
        if layer.weights:
            moved = [
                not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights(), strict=True)
            ]
            assert all(moved), f"{layer.name}: some weights did not move"  # BN: gamma, beta, mean, var


def test_recipe_options_run_together_under_a_mirrored_strategy(
    tri: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlpipe")
    params = FineTuneParams(
        epochs=2, batch_size=8, learning_rate=1e-3, backbone_lr_factor=0.1, optimizer="sgd_nesterov",
        schedule="cosine", warmup_epochs=1, clip_norm=1.0, label_smoothing=0.1, weight_decay=1e-4,
        class_weight="balanced", distribution="mirrored", unfreeze_blocks=1,
    )  # fmt: skip
    metrics = fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    out = caplog.text
    assert "backbone x0.1" in out and "class weights: red=1.000, green=1.000, blue=1.000" in out
    assert metrics["epochs_run"] == 2
    model = load(tmp_path / "m.keras")
    assert getattr(model, "optimizer", None) is None  # saved without the training-only optimizer
    assert changed_layers(tri.frozen, tmp_path / "m.keras") == {"top_conv"}
