"""Tests for the backbone registry and top-block unfreezing."""

from __future__ import annotations

import keras
import pytest

from tlpipe.backbones import REGISTRY, get_backbone, resolve_weights, set_top_blocks_trainable
from tlpipe.errors import PipelineError


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def model(lite0) -> keras.Model:
    # random weights at 32x32: the block structure is all these tests need
    return lite0.build((32, 32, 3), None)


def _weighted(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer.weights]


def _trainable_names(model: keras.Model) -> set[str]:
    return {layer.name for layer in model.layers if layer.trainable_weights}


def test_registry_lookup(lite0) -> None:
    assert lite0.name == "efficientnet_lite0"
    assert lite0.block_count == 17  # 16 MBConv blocks plus the head conv
    assert lite0.block_index("block03_dwconv") == 3
    assert lite0.block_index("top_conv") == 16
    assert lite0.block_index("stem_conv") is None


def test_unknown_backbone_names_the_available_ones() -> None:
    with pytest.raises(PipelineError) as err:
        get_backbone("resnet9000")
    message = str(err.value)
    assert "'resnet9000'" in message
    assert "available: efficientnet_lite0" in message
    assert set(REGISTRY) == {"efficientnet_lite0"}  # update the message check when this grows


@pytest.mark.parametrize(
    ("weights", "expected"), [("none", None), ("None", None), ("imagenet", "imagenet"), ("w.pth", "w.pth")]
)
def test_resolve_weights(weights: str, expected: str | None) -> None:
    assert resolve_weights(weights) == expected


def test_build_takes_raw_pixels_and_gives_pooled_features(model: keras.Model) -> None:
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 1280)
    assert model.get_layer("rescaling") is not None  # preprocessing lives inside the model


@pytest.mark.parametrize("n_blocks", [1, 3, 17])
def test_exactly_the_top_blocks_become_trainable(model: keras.Model, lite0, n_blocks: int) -> None:
    first = lite0.block_count - n_blocks
    blocks = {layer.name: lite0.block_index(layer.name) for layer in _weighted(model)}
    expected = {
        name
        for name, block in blocks.items()
        if block is not None
        and block >= first
        and not isinstance(model.get_layer(name), keras.layers.BatchNormalization)
    }
    unfrozen = set_top_blocks_trainable(model, lite0, n_blocks)
    assert _trainable_names(model) == expected
    assert unfrozen == len(expected) > 0
    assert model.trainable_weights  # the model as a whole exposes them to the optimizer


def test_top_three_blocks_by_name(model: keras.Model, lite0) -> None:
    """The same rule spelt out with layer names, so the test does not mirror the code."""
    set_top_blocks_trainable(model, lite0, 3)
    trainable = _trainable_names(model)
    assert {"top_conv", "block15_project_conv", "block14_dwconv", "block14_expand_conv"} <= trainable
    assert not trainable & {"block13_project_conv", "block00_dwconv", "stem_conv", "top_bn"}
    assert all(name.startswith(("block14_", "block15_", "top_")) for name in trainable)


def test_batch_normalization_always_stays_frozen(model: keras.Model, lite0) -> None:
    set_top_blocks_trainable(model, lite0, lite0.block_count)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 30
    assert not any(layer.trainable or layer.trainable_weights for layer in norms)
    # the stem is outside every block, so even "all blocks" leaves it frozen
    assert not model.get_layer("stem_conv").trainable_weights


def test_zero_blocks_leaves_nothing_trainable(model: keras.Model, lite0) -> None:
    set_top_blocks_trainable(model, lite0, 5)
    assert set_top_blocks_trainable(model, lite0, 0) == 0
    assert model.trainable_weights == []


def test_unfreezes_a_backbone_that_was_frozen_as_a_whole(model: keras.Model, lite0) -> None:
    # the frozen phase sets backbone.trainable = False before saving; fine-tuning starts from that
    model.trainable = False
    assert set_top_blocks_trainable(model, lite0, 1) == 1  # top_conv: its BN stays frozen
    assert _trainable_names(model) == {"top_conv"}


@pytest.mark.parametrize("n_blocks", [18, 100, -1])
def test_out_of_range_block_count_names_the_allowed_range(model: keras.Model, lite0, n_blocks: int) -> None:
    with pytest.raises(PipelineError, match=r"unfreeze_blocks=-?\d+ .*allowed: 0\.\.17"):
        set_top_blocks_trainable(model, lite0, n_blocks)
