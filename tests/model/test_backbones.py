"""Tests for the backbone registry, its preprocessing, weights and top-block unfreezing."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import h5py
import keras
import numpy as np
import pytest

from tlpipe.core.config import BACKBONES
from tlpipe.core.errors import PipelineError
from tlpipe.model import backbones
from tlpipe.model.backbones import (
    REGISTRY,
    Backbone,
    get_backbone,
    resolve_weights,
    set_top_blocks_trainable,
    set_trainable_from,
)

APPS = keras.applications
# backbone -> (keras.applications constructor, module with its preprocess_input): spelt out
# here rather than read from backbones.py, so the tests do not mirror the code
KERAS_APPLICATIONS: dict[str, tuple[Callable[..., keras.Model], ModuleType]] = {
    "mobilenet_v2": (APPS.MobileNetV2, APPS.mobilenet_v2),
    "mobilenet_v3_small": (APPS.MobileNetV3Small, APPS.mobilenet_v3),
    "mobilenet_v3_large": (APPS.MobileNetV3Large, APPS.mobilenet_v3),
    "efficientnet_b0": (APPS.EfficientNetB0, APPS.efficientnet),
    "efficientnet_b1": (APPS.EfficientNetB1, APPS.efficientnet),
    "efficientnet_b2": (APPS.EfficientNetB2, APPS.efficientnet),
    "efficientnet_b3": (APPS.EfficientNetB3, APPS.efficientnet),
    "efficientnetv2_b0": (APPS.EfficientNetV2B0, APPS.efficientnet_v2),
    "resnet50": (APPS.ResNet50, APPS.resnet50),
    "resnet50_v2": (APPS.ResNet50V2, APPS.resnet_v2),
    "densenet121": (APPS.DenseNet121, APPS.densenet),
    "inception_v3": (APPS.InceptionV3, APPS.inception_v3),
    "vgg16": (APPS.VGG16, APPS.vgg16),
    "convnext_tiny": (APPS.ConvNeXtTiny, APPS.convnext),
}
# these models start with their own preprocessing layers; preprocess_input is the identity
PREPROCESSING_BUILT_IN = {
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnetv2_b0",
    "convnext_tiny",
}
ALL_BACKBONES = ["efficientnet_lite0", *KERAS_APPLICATIONS]


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def _input_shape(backbone: Backbone) -> tuple[int, int, int]:
    # the smallest input each accepts: the block structure does not depend on it, and it is fast
    return (backbone.min_size, backbone.min_size, 3)


@pytest.fixture(scope="module")
def built() -> Callable[[str], keras.Model]:
    """Backbones with random weights, each built once for the module."""
    cache: dict[str, keras.Model] = {}

    def build(name: str) -> keras.Model:
        if name not in cache:
            backbone = get_backbone(name)
            cache[name] = backbone.build(_input_shape(backbone), None)
        return cache[name]

    return build


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def model(built) -> keras.Model:
    # random weights at 32x32: the block structure is all these tests need
    return built("efficientnet_lite0")


def _weighted(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer.weights]


def _trainable_names(model: keras.Model) -> set[str]:
    return {layer.name for layer in model.layers if layer.trainable_weights}


def _pixels(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (2, size, size, 3)).astype("float32")


# ------------------------------------------------------------ registry


def test_registry_lookup(lite0, model: keras.Model) -> None:
    assert lite0.name == "efficientnet_lite0"
    assert lite0.block_count == 17  # 16 MBConv blocks plus the head conv
    blocks = lite0.layer_blocks(model)
    assert blocks["block03_dwconv"] == 3
    assert blocks["top_conv"] == 16
    assert blocks["stem_conv"] is None


def test_backbone_choices_are_the_registry() -> None:
    # params validate train_frozen.backbone against BACKBONES, training looks it up in REGISTRY
    assert list(REGISTRY) == list(BACKBONES)


def test_a_backbone_named_on_one_side_only_fails_at_import() -> None:
    factories = {name: REGISTRY[name] for name in ("vgg16", "resnet50")}
    with pytest.raises(
        RuntimeError, match=r"no factory for \['convnext_tiny'\], not in BACKBONES: \['resnet50'\]"
    ):
        backbones._registry(("vgg16", "convnext_tiny"), factories)


def test_unknown_backbone_names_the_available_ones() -> None:
    with pytest.raises(PipelineError) as err:
        get_backbone("resnet9000")
    message = str(err.value)
    assert "'resnet9000'" in message
    assert f"available: {', '.join(sorted(ALL_BACKBONES))}" in message
    assert set(REGISTRY) == set(ALL_BACKBONES)  # update KERAS_APPLICATIONS when this grows


@pytest.mark.parametrize(
    ("weights", "expected"), [("none", None), ("None", None), ("imagenet", "imagenet"), ("w.pth", "w.pth")]
)
def test_resolve_weights(weights: str, expected: str | None) -> None:
    assert resolve_weights(weights) == expected


@pytest.mark.parametrize(("name", "size", "minimum"), [("vgg16", 31, 32), ("inception_v3", 74, 75)])
def test_too_small_input_names_backbone_size_and_minimum(name: str, size: int, minimum: int) -> None:
    backbone = get_backbone(name)
    assert backbone.min_size == minimum
    with pytest.raises(PipelineError, match=rf"{name} .*{minimum}x{minimum}.*got {size}x{size}"):
        backbone.build((size, size, 3), None)


def test_build_takes_raw_pixels_and_gives_pooled_features(model: keras.Model) -> None:
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 1280)
    assert model.get_layer("rescaling") is not None  # preprocessing lives inside the model


# ------------------------------------------------------------ preprocessing


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Layer by layer: ours has extra preprocessing layers, but none of them has weights."""
    ours, theirs = _weighted(source), _weighted(target)
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs, strict=True):
        assert type(mine) is type(other)
        other.set_weights(mine.get_weights())


@pytest.mark.parametrize("name", list(KERAS_APPLICATIONS))
def test_preprocessing_matches_keras_applications(built, name: str) -> None:
    """Our model on raw pixels == keras.applications' model on preprocess_input(pixels)."""
    ours = built(name)
    constructor, module = KERAS_APPLICATIONS[name]
    size = get_backbone(name).min_size
    reference = constructor(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    _copy_weights(ours, reference)
    pixels = _pixels(size)
    expected = keras.ops.convert_to_numpy(reference(module.preprocess_input(pixels.copy())))
    got = keras.ops.convert_to_numpy(ours(pixels))
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
    if name not in PREPROCESSING_BUILT_IN:  # the check above would catch missing preprocessing
        unprocessed = keras.ops.convert_to_numpy(reference(pixels))
        assert not np.allclose(got, unprocessed, rtol=1e-3, atol=1e-3 * scale)


def test_custom_preprocessing_survives_a_safe_mode_round_trip(built, tmp_path: Path) -> None:
    inner = built("vgg16")  # caffe mode: RGB->BGR flip, then mean subtraction
    wrapped = keras.Model(inner.input, inner.output, name="vgg16")  # as training.py does
    path = tmp_path / "vgg16.keras"
    wrapped.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("rgb_to_bgr")).__name__ == "ReverseChannels"
    pixels = _pixels(32, seed=1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(pixels)), keras.ops.convert_to_numpy(wrapped(pixels)), rtol=1e-6
    )


# ------------------------------------------------------------ block structure


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_blocks_cover_the_model_bottom_to_top(built, name: str) -> None:
    backbone, model = get_backbone(name), built(name)
    blocks = backbone.layer_blocks(model)
    assert backbone.block_count >= 3
    numbered = [blocks[layer.name] for layer in model.layers if blocks[layer.name] is not None]
    assert set(numbered) == set(range(backbone.block_count))
    weighted = [blocks[layer.name] for layer in _weighted(model)]
    first_in_block = next(i for i, block in enumerate(weighted) if block is not None)
    assert None not in weighted[first_in_block:]  # above the stem, every layer with weights is in a block
    assert first_in_block <= 10  # and the stem is small (InceptionV3's has 5 conv+BN pairs)
    assert weighted[first_in_block:] == sorted(weighted[first_in_block:])
    # each block has something to train while BatchNormalization stays frozen
    trainable_blocks = {
        blocks[layer.name]
        for layer in _weighted(model)
        if not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert trainable_blocks - {None} == set(range(backbone.block_count))


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_top_block_alone_becomes_trainable(built, name: str) -> None:
    backbone, model = get_backbone(name), built(name)
    blocks = backbone.layer_blocks(model)
    top = {layer.name for layer in _weighted(model) if blocks[layer.name] == backbone.block_count - 1}
    norms = {layer for layer in top if isinstance(model.get_layer(layer), keras.layers.BatchNormalization)}
    assert set_top_blocks_trainable(model, backbone, 1) == len(top - norms) > 0
    assert _trainable_names(model) == top - norms
    assert set_top_blocks_trainable(model, backbone, 1, train_batchnorm=True) == len(top)
    assert _trainable_names(model) == top


@pytest.mark.parametrize(
    ("name", "layer", "block"),
    [
        ("mobilenet_v2", "expanded_conv_project", 0),
        ("mobilenet_v2", "block_16_project", 16),
        ("mobilenet_v2", "Conv_1", 17),
        ("mobilenet_v2", "bn_Conv1", None),
        ("mobilenet_v3_small", "expanded_conv_squeeze_excite_conv", 0),
        ("mobilenet_v3_small", "expanded_conv_10_project", 10),
        ("mobilenet_v3_small", "conv_1", 11),
        ("mobilenet_v3_large", "expanded_conv_14_expand", 14),
        ("efficientnet_b0", "block1a_dwconv", 0),
        ("efficientnet_b0", "block7a_project_conv", 15),
        ("efficientnet_b0", "top_conv", 16),
        ("efficientnet_b0", "stem_conv", None),
        ("efficientnet_b3", "block7b_project_conv", 25),
        ("efficientnetv2_b0", "block6h_project_conv", 20),
        ("resnet50", "conv2_block1_0_conv", 0),
        ("resnet50", "conv5_block3_3_conv", 15),
        ("resnet50", "conv1_conv", None),
        ("resnet50_v2", "conv5_block3_3_conv", 15),
        ("resnet50_v2", "post_bn", 15),
        ("densenet121", "conv2_block6_2_conv", 5),
        ("densenet121", "pool2_conv", 6),
        ("densenet121", "conv5_block16_2_conv", 60),
        ("densenet121", "bn", 60),
        ("inception_v3", "mixed0", 0),
        ("inception_v3", "mixed9_0", 9),
        ("inception_v3", "mixed9_1", 10),
        ("inception_v3", "mixed10", 10),
        ("vgg16", "block1_conv1", 0),
        ("vgg16", "block5_conv3", 4),
        ("convnext_tiny", "convnext_tiny_stage_0_block_0_depthwise_conv", 0),
        ("convnext_tiny", "convnext_tiny_downsampling_block_0", 3),
        ("convnext_tiny", "convnext_tiny_stage_3_block_2_pointwise_conv_2", 20),
        ("convnext_tiny", "convnext_tiny_stem", None),
    ],
)
def test_block_of_named_layers(built, name: str, layer: str, block: int | None) -> None:
    assert get_backbone(name).layer_blocks(built(name))[layer] == block


def test_unnamed_layers_get_their_block_from_the_layer_order(built) -> None:
    """InceptionV3 layers are conv2d_NN, numbered differently in every build."""
    backbone, model = get_backbone("inception_v3"), built("inception_v3")
    blocks = backbone.layer_blocks(model)
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [blocks[name] for name in convs[:6]] == [None] * 5 + [0]  # the 5 stem convs, then mixed0's
    assert blocks[convs[-1]] == 10
    # ConvNeXt's last LayerNormalization (after the pooling) is the head: part of the top block
    convnext = built("convnext_tiny")
    assert get_backbone("convnext_tiny").layer_blocks(convnext)[convnext.layers[-1].name] == 20


def test_blocks_survive_wrapping_and_reloading(built) -> None:
    """training.py wraps the backbone and fine-tuning reloads it from its config."""
    backbone, model = get_backbone("inception_v3"), built("inception_v3")
    wrapped = keras.Model(model.input, model.output, name="inception_v3")
    reloaded = keras.Model.from_config(wrapped.get_config())
    expected = backbone.layer_blocks(model)
    assert backbone.layer_blocks(wrapped) == expected
    assert backbone.layer_blocks(reloaded) == expected  # layer names come back from the config


# ------------------------------------------------------------ unfreezing (EfficientNet-Lite0)


@pytest.mark.parametrize("n_blocks", [1, 3, 17])
def test_exactly_the_top_blocks_become_trainable(model: keras.Model, lite0, n_blocks: int) -> None:
    first = lite0.block_count - n_blocks
    blocks = lite0.layer_blocks(model)
    expected = {
        layer.name
        for layer in _weighted(model)
        if blocks[layer.name] is not None
        and blocks[layer.name] >= first
        and not isinstance(layer, keras.layers.BatchNormalization)
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


def test_batch_normalization_stays_frozen_by_default(model: keras.Model, lite0) -> None:
    set_top_blocks_trainable(model, lite0, lite0.block_count)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 30
    assert not any(layer.trainable or layer.trainable_weights for layer in norms)
    # the stem is outside every block, so even "all blocks" leaves it frozen
    assert not model.get_layer("stem_conv").trainable_weights


def test_batch_normalization_trains_when_asked(model: keras.Model, lite0) -> None:
    assert set_top_blocks_trainable(model, lite0, 1, train_batchnorm=True) == 2
    assert _trainable_names(model) == {"top_conv", "top_bn"}


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


def test_trainable_from_a_named_layer(model: keras.Model) -> None:
    model.trainable = False
    assert set_trainable_from(model, "block15_project_conv") == 2
    assert _trainable_names(model) == {"block15_project_conv", "top_conv"}
    assert set_trainable_from(model, "block15_project_conv", train_batchnorm=True) == 4
    assert _trainable_names(model) == {"block15_project_conv", "block15_project_bn", "top_conv", "top_bn"}


def test_trainable_from_counts_plain_layers(built) -> None:
    vgg = built("vgg16")
    assert set_trainable_from(vgg, "block5_conv1") == 3
    assert _trainable_names(vgg) == {"block5_conv1", "block5_conv2", "block5_conv3"}


def test_trainable_from_an_unknown_layer_suggests_real_ones(model: keras.Model) -> None:
    with pytest.raises(PipelineError, match=r"no layer 'block15_projct_conv'.*block15_project_conv"):
        set_trainable_from(model, "block15_projct_conv")
    with pytest.raises(PipelineError, match=r"no layer 'fc7'.*top_conv"):  # nothing close: the top layers
        set_trainable_from(model, "fc7")


# ------------------------------------------------------------ weights


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Keras cache, and downloads refused at once by a proxy that is not there."""
    import keras.src.backend.config as keras_config

    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))  # Keras reads KERAS_HOME at import
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urlopen builds its opener, proxies included, on first use and keeps it: start afresh here, and put
    # the previous one back afterwards so the dead proxy does not outlive the test
    monkeypatch.setattr(urllib.request, "_opener", None)
    return home


@pytest.mark.parametrize(
    ("name", "file_name", "url_part"),
    [
        ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras-applications/resnet/"),
        ("efficientnet_b0", "efficientnetb0_notop.h5", "keras-applications/efficientnetb0_notop.h5"),
    ],
)
def test_failed_imagenet_download_says_where_to_put_the_file(
    offline: Path, name: str, file_name: str, url_part: str
) -> None:
    from keras.src.utils import file_utils

    download = file_utils.get_file
    with pytest.raises(PipelineError) as err:
        get_backbone(name).build((32, 32, 3), "imagenet")
    message = str(err.value)
    assert f"backbone {name}: {file_name} from https://storage.googleapis.com/" in message
    assert url_part in message
    assert str(offline / "models" / file_name) in message
    assert "~/.keras/models/" in message and "train_frozen.weights" in message
    assert file_utils.get_file is download  # the download hook is put back


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(PipelineError, match=rf"vgg16 not found: {missing}"):
        get_backbone("vgg16").build((32, 32, 3), str(missing))


def _assert_same_weights(model: keras.Model, other: keras.Model) -> None:
    mine, theirs = model.get_weights(), other.get_weights()
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")  # MobileNetV2 on 32x32
def test_weights_from_a_saved_weights_file(built, tmp_path: Path) -> None:
    source = built("mobilenet_v2")
    path = tmp_path / "mobilenet_v2.weights.h5"
    source.save_weights(path)
    _assert_same_weights(get_backbone("mobilenet_v2").build((32, 32, 3), str(path)), source)


def test_weights_from_a_keras_notop_file_fetched_by_hand(tmp_path: Path) -> None:
    """The legacy .h5 that Keras downloads for "imagenet", here written from a random EfficientNetB0."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    reference = APPS.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, reference)
    ours = get_backbone("efficientnet_b0").build((32, 32, 3), str(path))
    _assert_same_weights(ours, reference)
    # built as for "imagenet": Keras then adds a Rescaling that fixes its ImageNet normalisation
    rescalings = [layer for layer in ours.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescalings) == 2
