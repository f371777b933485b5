"""Fine-tuning on cached activations: the frozen bottom of the backbone run once per image.

With augmentation done offline and BatchNormalization frozen, the layers below
fine-tuning's first trainable layer give the same output for an image in every
epoch, exactly as the whole frozen backbone does in the frozen phase. So the
network is cut there: the bottom runs once per image into a cache on disk
(streamed and resumable, :func:`tlpipe.train.features.compute_features`) and the
top, which shares its layers and weights with the whole model, trains on it. The
saved model is still the whole network taking raw pixels.

The cut is refused, and training goes through the whole network, when it would
change what is trained: a layer below the cut that behaves differently in
training (dropout, random transforms), or layers above the cut that
also read activations from below it (a skip connection across the cut). It is
also refused when it would save little: a bottom doing under
``MIN_BOTTOM_SHARE`` of the backbone's multiply-adds (with every block trainable,
only the stem) saves that share of the forward pass, while its output, cached,
is several times the image's size (7 GB for Kermany at 128 px; docs/speed.md).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlpipe.data.datasets import AugmentedData
from tlpipe.model.outputs import HEAD_DROPOUT, HEAD_OUTPUT
from tlpipe.train.checkpoints import fingerprint
from tlpipe.train.devices import FPMATH_ENV
from tlpipe.train.features import compute_features, data_digest, feature_dataset

logger = logging.getLogger(__name__)

MIN_BOTTOM_SHARE = (
    0.10  # chosen before its runs: docs/speed.md, "The activation cache when every block trains"
)


class CannotCut(Exception):
    """The model cannot be cut at its first trainable layer without changing the training; says why."""


@dataclass(frozen=True)
class CutModel:
    bottom: keras.Model  # raw pixels -> the activation entering the first trainable layer (frozen)
    top: keras.Model  # that activation -> the classifier's output; its layers are the whole model's
    cut: str  # the first trainable layer's name


def cut_at_first_trainable(model: keras.Model, backbone_model: keras.Model) -> CutModel:
    """``model`` (backbone, then the head) cut where ``backbone_model``'s first trainable layer begins.

    Raises :class:`CannotCut` with the reason when cached activations would train
    differently from the whole network, or would save nothing.
    """
    layers = backbone_model.layers
    first = next((i for i, layer in enumerate(layers) if layer.trainable and layer.weights), None)
    if first is None:
        raise CannotCut("no backbone layer trains")
    if not any(layer.weights for layer in layers[:first]):
        raise CannotCut(f"nothing with weights lies below the first trainable layer {layers[first].name!r}")
    cut_layer = layers[first]
    share = multiply_adds(layers[:first]) / max(multiply_adds(layers), 1)
    if share < MIN_BOTTOM_SHARE:
        raise CannotCut(
            f"the frozen bottom below {cut_layer.name!r} does {share:.1%} of the backbone's multiply-adds "
            f"(under {MIN_BOTTOM_SHARE:.0%}): caching its output would cost more disk than it saves time"
        )
    for layer in layers[:first]:
        if _behaves_differently_in_training(layer):
            raise CannotCut(f"{layer.name!r} below the cut behaves differently in training")
    try:
        upper = keras.Model(cut_layer.input, backbone_model.output)
    except ValueError as error:
        raise CannotCut(f"layers above {cut_layer.name!r} also read activations from below it") from error
    head = model.layers[-2:]
    if [layer.name for layer in head] != [HEAD_DROPOUT, HEAD_OUTPUT]:
        raise CannotCut("the model does not end in tlpipe's head")
    inputs = keras.Input(tuple(cut_layer.input.shape[1:]), name="activations")
    x = upper(inputs)
    for layer in head:
        x = layer(x)
    bottom = keras.Model(backbone_model.input, cut_layer.input, name="frozen_bottom")
    return CutModel(bottom, keras.Model(inputs, x, name="trainable_top"), cut_layer.name)


def multiply_adds(layers: list[keras.layers.Layer]) -> int:
    """The multiply-adds per image of ``layers``' kernels (convolutions, dense layers; nested models too).

    A kernel's weights each multiply once per output position: its size times the
    output's spatial size (1 for a dense layer). Biases, normalisation and
    activations, a small share, are left out.
    """
    total = 0
    for layer in layers:
        if isinstance(layer, keras.Model):
            total += multiply_adds(layer.layers)
            continue
        kernels = [w for w in layer.weights if "kernel" in w.name]
        if kernels:
            positions = int(np.prod(layer.output.shape[1:-1]))
            total += positions * sum(int(np.prod(w.shape)) for w in kernels)
    return total


def _behaves_differently_in_training(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.BatchNormalization):
        return False  # below the first trainable layer it is frozen, and frozen runs in inference mode
    return "training" in inspect.signature(layer.call).parameters


def weights_digest(model: keras.Model) -> str:
    h = hashlib.sha256()
    for array in model.get_weights():
        h.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CachedInputs:
    train: tf.data.Dataset
    val: tf.data.Dataset
    megabytes: float


def cached_inputs(
    cut: CutModel,
    data: AugmentedData,
    targets: dict[str, np.ndarray],
    batch_size: int,
    shuffle_seed: int,
    directory: Path,
) -> CachedInputs:
    """Train and val batches of the bottom's activations, computed once per image into ``directory``.

    Keyed by the bottom's weights, the cut, the images and oneDNN's math, so a rerun with another
    seed or learning rate reuses it and anything else recomputes it.
    """
    # oneDNN's math (bf16 or strict float32) changes the activations' last bits
    key = fingerprint(cut.cut, weights_digest(cut.bottom), data_digest(data), os.environ.get(FPMATH_ENV, ""))
    cached = {
        s: compute_features(cut.bottom, data.split(s), batch_size, directory / f"{s}.npy", key)
        for s in ("train", "val")
    }
    return CachedInputs(
        feature_dataset(cached["train"], targets["train"], batch_size, shuffle_seed),
        feature_dataset(cached["val"], targets["val"], batch_size, None),
        sum(a.nbytes for a in cached.values()) / 2**20,
    )
