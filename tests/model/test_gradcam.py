"""Tests for Grad-CAM maps and their overlays."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from tlpipe.model import outputs, storage
from tlpipe.model.efficientnet_lite import (
    WeightsNotFoundError,
    build_efficientnet_lite0,
    default_weights_path,
)
from tlpipe.model.gradcam import (
    dense_logits,
    gradcam_maps,
    gradcam_maps_from,
    overlay,
    target_layer_name,
)
from tlpipe.train import head as training_head

SIZE = 96
IMAGENET_DAISY = 985


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def _weights_or_skip() -> None:
    try:
        default_weights_path()
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-cropped to a square, PIL-bilinear resized to size x size (uint8 RGB)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """sklearn's flower and china photos, (2, SIZE, SIZE, 3) float32 0..255."""
    return np.stack([_square(load_sample_image(name), SIZE) for name in ("flower.jpg", "china.jpg")]).astype(
        np.float32
    )


def _classifier(backbone_name: str, weights: str, size: int, n_classes: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    backbone = training_head.build_backbone_model(backbone_name, weights, size)
    head = training_head.build_head(int(backbone.output_shape[-1]), n_classes, dropout=0.2)
    return training_head.assemble(backbone, head, n_classes, dropout=0.2)


@pytest.fixture(scope="module")
def lite_models() -> dict[int, keras.Model]:
    """The default backbone with ImageNet weights under random 2-class and 3-class heads."""
    _weights_or_skip()
    return {n: _classifier("efficientnet_lite0", "imagenet", SIZE, n, seed=n) for n in (2, 3)}


def _predicted(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return outputs.class_probabilities(model.predict(images, verbose=0)).argmax(axis=1)


def _check_maps(maps: np.ndarray, n: int, size: int) -> None:
    assert maps.shape == (n, size, size)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


# ------------------------------------------------------------ target layer


def test_target_layer_is_the_last_feature_map_before_pooling():
    lite = training_head.build_backbone_model("efficientnet_lite0", "none", 64)
    assert target_layer_name(lite) == "top_act"
    small = training_head.build_backbone_model("mobilenet_v3_small", "none", 64)
    name = target_layer_name(small)
    layer = small.get_layer(name)
    assert len(layer.output.shape) == 4 and layer.output.shape[1:3] == (2, 2)
    following = small.layers[[lay.name for lay in small.layers].index(name) + 1 :]
    assert [type(lay) for lay in following] == [keras.layers.GlobalAveragePooling2D]


def test_target_layer_needs_a_feature_map():
    inputs = keras.Input((8,))
    flat = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no layer with a 4D"):
        target_layer_name(flat)


# ------------------------------------------------------------ default backbone, ImageNet weights


@pytest.mark.parametrize("n_classes", [2, 3])
def test_maps_of_real_images_are_in_range_and_not_constant(lite_models, photos, n_classes):
    model = lite_models[n_classes]
    maps = gradcam_maps(model, photos)
    _check_maps(maps, len(photos), SIZE)
    for heat in maps:
        assert heat.std() > 0.05
        assert heat.max() == pytest.approx(1.0)  # normalised per image


@pytest.mark.parametrize("n_classes", [2, 3])
def test_default_class_is_the_predicted_one(lite_models, photos, n_classes):
    model = lite_models[n_classes]
    explicit = gradcam_maps(model, photos, _predicted(model, photos))
    np.testing.assert_allclose(gradcam_maps(model, photos), explicit, atol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_classes_get_different_maps(lite_models, photos, n_classes):
    model = lite_models[n_classes]
    maps = [gradcam_maps(model, photos, np.full(len(photos), c)) for c in range(n_classes)]
    for a in range(n_classes):
        for b in range(a + 1, n_classes):
            for i in range(len(photos)):
                assert np.abs(maps[a][i] - maps[b][i]).mean() > 0.05, (a, b, i)


def test_sigmoid_classes_show_opposite_evidence(lite_models, photos):
    """Class 0 scores -z, class 1 +z: the maps are ReLU(-S) and ReLU(+S) of one weighted sum S.

    So the two are never both strong in one place (bilinear upsampling blurs only
    the borders between them), and the predicted class, whose score is positive,
    always has some positive evidence; the other class may have none (an all-zero map).
    """
    model = lite_models[2]
    zeros, ones = (gradcam_maps(model, photos, np.full(len(photos), c)) for c in (0, 1))
    predicted = _predicted(model, photos)
    for i in range(len(photos)):
        assert (np.minimum(zeros[i], ones[i]) < 0.25).mean() > 0.9
        assert (zeros, ones)[predicted[i]][i].max() == pytest.approx(1.0)


def test_batching_does_not_change_the_maps(lite_models, photos):
    model = lite_models[3]
    classes = np.array([2, 0])
    np.testing.assert_allclose(
        gradcam_maps(model, photos, classes, batch_size=1), gradcam_maps(model, photos, classes), atol=1e-5
    )


def test_no_positive_evidence_gives_an_all_zero_map(photos):
    """A head whose weights are all zero has zero gradients: zero maps, not NaNs from 0/0."""
    model = _classifier("efficientnet_lite0", "none", SIZE, 3)
    dense = model.get_layer(outputs.HEAD_OUTPUT)
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    maps = gradcam_maps(model, photos)
    _check_maps(maps, len(photos), SIZE)
    assert not maps.any()


def test_bad_class_indices_are_refused(lite_models, photos):
    with pytest.raises(ValueError, match=r"class indices must be in 0\.\.1"):
        gradcam_maps(lite_models[2], photos, np.array([0, 2]))
    with pytest.raises(ValueError, match="1 class indices for 2 images"):
        gradcam_maps(lite_models[2], photos, np.array([0]))
    with pytest.raises(ValueError, match=r"\(n, height, width, channels\)"):
        gradcam_maps(lite_models[2], photos[0])


# ------------------------------------------------------------ localisation


@pytest.fixture(scope="module")
def imagenet_classifier() -> tuple[keras.Model, keras.Model]:
    """Lite0 at 224 with its ImageNet top, as the pipeline's classifier (1000-way softmax head) and raw."""
    _weights_or_skip()
    raw = build_efficientnet_lite0(include_top=True, weights="imagenet")
    backbone = training_head.build_backbone_model("efficientnet_lite0", "imagenet", 224)
    head = training_head.build_head(int(backbone.output_shape[-1]), 1000, dropout=0.0)
    head.get_layer(outputs.HEAD_OUTPUT).set_weights(raw.get_layer("predictions").get_weights())
    return training_head.assemble(backbone, head, 1000, dropout=0.0), raw


def _flower_in_each_quadrant() -> np.ndarray:
    flower = _square(load_sample_image("flower.jpg"), 112)
    canvases = np.full((4, 224, 224, 3), 128, dtype=np.uint8)
    for q in range(4):
        row, col = divmod(q, 2)
        canvases[q, row * 112 : (row + 1) * 112, col * 112 : (col + 1) * 112] = flower
    return canvases.astype(np.float32)


def _quadrant_mass(heat: np.ndarray) -> np.ndarray:
    half = heat.shape[0] // 2
    quadrants = [
        heat[r * half : (r + 1) * half, c * half : (c + 1) * half].sum() for r in (0, 1) for c in (0, 1)
    ]
    return np.array(quadrants) / heat.sum()


def test_daisy_map_localises_the_pasted_flower(imagenet_classifier):
    """The flower photo pasted into one quadrant of a grey canvas: most of the daisy map's mass is there."""
    model, _ = imagenet_classifier
    canvases = _flower_in_each_quadrant()
    maps = gradcam_maps(model, canvases, np.full(4, IMAGENET_DAISY))
    _check_maps(maps, 4, 224)
    for q, heat in enumerate(maps):
        mass = _quadrant_mass(heat)
        assert mass.argmax() == q, mass
        assert mass[q] > 0.5, mass


def test_generic_pair_gives_the_same_maps(imagenet_classifier):
    """gradcam_maps_from on the raw ImageNet model, split by hand, agrees with the classifier's maps."""
    model, raw = imagenet_classifier
    features = keras.Model(raw.inputs, [raw.get_layer("top_act").output, raw.get_layer("avg_pool").output])
    predictions = raw.get_layer("predictions")
    canvases = _flower_in_each_quadrant()[:2]
    generic = gradcam_maps_from(features, lambda f: dense_logits(predictions, f), canvases)
    np.testing.assert_allclose(generic, gradcam_maps(model, canvases), atol=1e-4)


# ------------------------------------------------------------ other backbones, saved models


@pytest.mark.parametrize("n_classes", [2, 3])
def test_keras_applications_backbone(photos, n_classes):
    model = _classifier("mobilenet_v3_small", "none", 64, n_classes)
    images = np.stack([np.asarray(Image.fromarray(p.astype(np.uint8)).resize((64, 64))) for p in photos])
    maps = gradcam_maps(model, images.astype(np.float32))
    _check_maps(maps, len(images), 64)


def test_saved_and_reloaded_classifier(lite_models, photos, tmp_path):
    model = lite_models[2]
    path = tmp_path / "model.keras"
    storage.save_model_atomically(model, path)
    reloaded = storage.load_model(path)
    classes = np.array([0, 1])
    maps = gradcam_maps(reloaded, photos, classes)
    _check_maps(maps, len(photos), SIZE)
    np.testing.assert_allclose(maps, gradcam_maps(model, photos, classes), atol=1e-5)


# ------------------------------------------------------------ overlays


def test_overlay_shape_dtype_and_blending():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    heat = rng.random((20, 30)).astype(np.float32)
    out = overlay(image, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image)
    import matplotlib

    colours = np.rint(matplotlib.colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, heat, alpha=1.0), colours)
    assert not np.array_equal(out, image)


def test_overlay_resizes_the_heatmap_and_takes_grey_images():
    grey = np.full((40, 40), 100, dtype=np.uint8)
    out = overlay(grey, np.ones((5, 5), dtype=np.float32), alpha=0.5, colormap="inferno")
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert (out == out[0, 0]).all()  # a uniform heatmap on a uniform image stays uniform
    with pytest.raises(ValueError, match="alpha"):
        overlay(grey, np.ones((40, 40)), alpha=1.5)
