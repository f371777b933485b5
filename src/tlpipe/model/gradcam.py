"""Grad-CAM heatmaps (Selvaraju et al. 2017) for the pipeline's classifier.

For one image and one class c, Grad-CAM takes the backbone's last feature map
A (h x w x K, before global pooling), weights each channel by the spatial mean
of the gradient of the class score y_c with respect to it,
alpha_k = mean_ij dy_c / dA_ij^k, and keeps ReLU(sum_k alpha_k A^k): the places
whose features push the score of c up. Here the map is then upsampled
bilinearly to the input image's size and divided by its maximum, so it lies in
[0, 1]; a map with no positive evidence at all stays all zero.

Class score: as in the paper, the score before the output activation (a logit).
The softmax head (three classes or more) gives class c the logit z_c. The
sigmoid head (two classes, one unit with logit z, p = sigmoid(z)) gives class 1
the score z and class 0 the score -z, which is the logit of 1 - p: the two
classes' maps then show opposite evidence, ReLU(+S) and ReLU(-S) of the same
weighted sum S. By default each image is explained for its predicted class (the
larger probability; class 0 at a tie, as ``argmax`` of the probabilities does).

The classifier's Dropout is left out, as it is the identity at inference. The
backbone's layers are frozen in a saved model, which does not stop gradients
with respect to its activations: the input images are watched on the tape, so
every operation after them is recorded whether its weights train or not.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from tlpipe.model.outputs import HEAD_OUTPUT, find_backbone

DEFAULT_BATCH_SIZE = 16

# (n, k) inputs of a classifier's last Dense layer -> (n, n_classes) class scores
ScoreFn = Callable[[tf.Tensor], tf.Tensor]

# skipped when looking for the feature map: a keepdims global pooling is 4D too but 1x1 whatever the
# input, and a last local pooling (VGG16's block5_pool) only coarsens the conv map under it, which is
# what the Grad-CAM paper uses (conv5_3 for VGG16)
_POOLING = (
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)


def target_layer_name(backbone_model: keras.Model) -> str:
    """The backbone's last non-pooling layer with a 4D (n, h, w, channels) output: its final feature map."""
    for layer in reversed(backbone_model.layers):
        if isinstance(layer, (keras.layers.InputLayer, *_POOLING)):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer without a single symbolic output
            continue
        if len(shape) == 4:
            return layer.name
    raise ValueError(f"backbone {backbone_model.name} has no layer with a 4D feature-map output")


def gradcam_maps(
    model: keras.Model,
    images: np.ndarray,
    class_indices: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Grad-CAM maps (n, H, W) in [0, 1] of a pipeline classifier, for the given or predicted classes.

    ``model``: the pipeline's classifier (image -> backbone -> head Dropout ->
    head Dense). ``images``: (n, H, W, 3) raw 0..255 RGB, as the model takes.
    ``class_indices``: the class to explain per image; None: the predicted one.
    """
    backbone, _ = find_backbone(model)
    dense = model.get_layer(HEAD_OUTPUT)
    target = backbone.get_layer(target_layer_name(backbone))
    feature_model = keras.Model(backbone.inputs, [target.output, backbone.output], name="gradcam_features")
    units = int(dense.kernel.shape[-1])

    def scores(features: tf.Tensor) -> tf.Tensor:
        logits = dense_logits(dense, features)
        # one sigmoid unit: class 1 scores z, class 0 scores -z (the logit of 1 - p)
        return tf.concat([-logits, logits], axis=-1) if units == 1 else logits

    return gradcam_maps_from(feature_model, scores, images, class_indices, batch_size)


def gradcam_maps_from(
    feature_model: keras.Model,
    scores: ScoreFn,
    images: np.ndarray,
    class_indices: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Grad-CAM maps (n, H, W) in [0, 1] for any (feature model, score function) pair.

    ``feature_model`` maps images to ``[feature_map, features]``, the feature
    map (n, h, w, K) being what the maps are made of and ``features`` what
    ``scores`` turns into (n, n_classes) class scores. gradcam_maps builds this
    pair from the pipeline's classifier; any other classifier split this way
    (an ImageNet model, say) works as well.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (n, height, width, channels), got shape {images.shape}")
    n = len(images)
    if class_indices is not None:
        class_indices = np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if len(class_indices) != n:
            raise ValueError(f"{len(class_indices)} class indices for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size = images.shape[1:3]
    maps = np.zeros((n, *size), dtype=np.float32)
    for start in range(0, n, batch_size):
        chosen = None if class_indices is None else class_indices[start : start + batch_size]
        maps[start : start + batch_size] = _batch_maps(
            feature_model, scores, images[start : start + batch_size], chosen
        )
    return maps


def dense_logits(dense: keras.layers.Dense, inputs: tf.Tensor) -> tf.Tensor:
    """What a Dense layer computes before its activation: its logits, in float32."""
    logits = tf.matmul(tf.cast(inputs, tf.float32), tf.cast(dense.kernel, tf.float32))
    if dense.use_bias:
        logits = logits + tf.cast(dense.bias, tf.float32)
    return logits


def _batch_maps(
    feature_model: keras.Model, scores: ScoreFn, images: np.ndarray, class_indices: np.ndarray | None
) -> np.ndarray:
    pixels = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        # watching the input records every operation after it, frozen layers' ones included
        tape.watch(pixels)
        feature_map, features = feature_model(pixels, training=False)
        class_scores = scores(features)
        n_classes = int(class_scores.shape[-1])
        if class_indices is None:
            chosen = tf.argmax(class_scores, axis=-1)
        else:
            if class_indices.min() < 0 or class_indices.max() >= n_classes:
                raise ValueError(f"class indices must be in 0..{n_classes - 1}, got {class_indices.tolist()}")
            chosen = tf.constant(class_indices)
        # images are independent, so the gradient of the sum is each image's own gradient
        score = tf.reduce_sum(tf.gather(class_scores, chosen, axis=-1, batch_dims=1))
    gradients = tape.gradient(score, feature_map)
    feature_map = tf.cast(feature_map, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    return _normalise(cam)


def _normalise(cam: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum; an all-zero (or non-finite) map becomes zero."""
    cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1)
    scale = np.divide(1.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.clip(cam * scale[:, None, None], 0.0, 1.0).astype(np.float32)


def overlay(
    image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """The image (H, W, 3 or H, W) blended with the coloured heatmap: (1 - alpha) image + alpha colour.

    A heatmap of another size than the image is resized to it (bilinear).
    Returns uint8 RGB (H, W, 3).
    """
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image_uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (height, width[, 1 or 3]), got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = np.clip(image, 0, 255).astype(np.uint8)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (height, width), got shape {heat.shape}")
    if heat.shape != image.shape[:2]:
        resized = Image.fromarray(heat).resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
        heat = np.clip(np.asarray(resized), 0.0, 1.0)
    colour = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
