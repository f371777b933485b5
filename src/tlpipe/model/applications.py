"""``keras.applications`` models as backbones: their preprocessing as layers, their blocks, their weights.

Each model is built on raw RGB pixels in 0..255 with its own ``preprocess_input``
rebuilt from serializable layers (so a saved model reloads with ``safe_mode=True``),
and its layers are numbered into blocks from their names and order. ImageNet
weights are downloaded by Keras into ``$KERAS_HOME/models/`` (default
``~/.keras/models/``) on first use; a failed download says how to work offline.
"""

from __future__ import annotations

import inspect
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras

from tlpipe.core.errors import PipelineError

DEFAULT_MIN_SIZE = 32  # smallest input side most architectures accept

# What keras.applications.<module>.preprocess_input does, per model family;
# "builtin": the model already starts with its own preprocessing layers.
Preprocessing = Literal["tf", "torch", "caffe", "builtin"]

_TORCH_MEAN = (0.485, 0.456, 0.406)  # RGB, of pixels scaled to 0..1
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # BGR, of 0..255 pixels


@keras.saving.register_keras_serializable(package="tlpipe")
class ReverseChannels(keras.layers.Layer):
    """RGB -> BGR: Caffe-trained weights (ResNet50, VGG16) expect BGR input."""

    def call(self, inputs: Any) -> Any:
        return keras.ops.flip(inputs, axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape


def _preprocess(pixels: keras.KerasTensor, mode: Preprocessing) -> keras.KerasTensor:
    """The preprocess_input of ``mode`` as layers (imagenet_utils.preprocess_input, channels_last)."""
    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescaling")(pixels)
    if mode == "torch":
        x = keras.layers.Rescaling(1.0 / 255.0, name="rescaling")(pixels)
        return keras.layers.Normalization(
            mean=_TORCH_MEAN, variance=[std**2 for std in _TORCH_STD], name="imagenet_normalization"
        )(x)
    if mode == "caffe":
        x = ReverseChannels(name="rgb_to_bgr")(pixels)
        # variance 1: zero-centred only, no scaling
        return keras.layers.Normalization(
            mean=_CAFFE_BGR_MEAN, variance=(1.0, 1.0, 1.0), name="imagenet_centering"
        )(x)
    return pixels


@dataclass(frozen=True)
class Application:
    constructor: str  # attribute of keras.applications
    preprocessing: Preprocessing
    block_key: str  # regex on layer names; group 1 names the block the layer belongs to
    block_count: int
    min_size: int = DEFAULT_MIN_SIZE
    # index in model.layers just past the stem; None: the stem ends at the first keyed layer
    stem_end: Callable[[Sequence[keras.layers.Layer]], int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _after_second_max_pool(layers: Sequence[keras.layers.Layer]) -> int:
    """InceptionV3's stem (5 convs, 2 max pools) has no layer names to go by."""
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.MaxPooling2D)]
    return pools[1] + 1


_WITH_PREPROCESSING = {"include_preprocessing": True}  # the default; spelt out as we rely on it

_EFFICIENTNET_BLOCKS = r"^(block\d+[a-z]|top)_"  # block1a_*, ..., block7b_*, then the head top_*

APPLICATIONS: dict[str, Application] = {
    "mobilenet_v2": Application("MobileNetV2", "tf", r"^(expanded_conv|block_\d+|Conv_1)(?:_|$)", 18),
    "mobilenet_v3_small": Application(
        "MobileNetV3Small",
        "builtin",
        r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)",
        12,
        options=_WITH_PREPROCESSING,
    ),
    "mobilenet_v3_large": Application(
        "MobileNetV3Large",
        "builtin",
        r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)",
        16,
        options=_WITH_PREPROCESSING,
    ),
    "efficientnet_b0": Application("EfficientNetB0", "builtin", _EFFICIENTNET_BLOCKS, 17),
    "efficientnet_b1": Application("EfficientNetB1", "builtin", _EFFICIENTNET_BLOCKS, 24),
    "efficientnet_b2": Application("EfficientNetB2", "builtin", _EFFICIENTNET_BLOCKS, 24),
    "efficientnet_b3": Application("EfficientNetB3", "builtin", _EFFICIENTNET_BLOCKS, 27),
    "efficientnetv2_b0": Application(
        "EfficientNetV2B0", "builtin", _EFFICIENTNET_BLOCKS, 22, options=_WITH_PREPROCESSING
    ),
    "resnet50": Application("ResNet50", "caffe", r"^(conv[2-5]_block\d+)_", 16),
    # the final post_bn (ResNet50V2) and bn (DenseNet121) join the top block: alone they would
    # make a block with nothing to train while BatchNormalization stays frozen
    "resnet50_v2": Application("ResNet50V2", "tf", r"^(conv[2-5]_block\d+)_", 16),
    # dense layers convN_blockM and transitions poolN
    "densenet121": Application("DenseNet121", "torch", r"^(conv[2-5]_block\d+|pool[2-4])_", 61),
    # only the block-ending concatenations mixed0..mixed10: mixed9_1 is inside block mixed10
    "inception_v3": Application(
        "InceptionV3", "tf", r"^(mixed\d+)$", 11, min_size=75, stem_end=_after_second_max_pool
    ),
    "vgg16": Application("VGG16", "caffe", r"^(block\d)_", 5),
    "convnext_tiny": Application(
        "ConvNeXtTiny",
        "builtin",
        r"_(stage_\d+_block_\d+|downsampling_block_\d+)(?:_|$)",
        21,
        options=_WITH_PREPROCESSING,
    ),
}


def keyed_blocks(layers: Sequence[keras.layers.Layer], application: Application) -> list[int | None]:
    """Number the blocks named by ``block_key`` in layer order.

    Layers whose names carry no block (auto-named ones such as InceptionV3's
    ``conv2d_57`` or MobileNetV3's ``re_lu_3``) join the next named block: in
    ``model.layers`` order a block's layers all come before the layer that
    ends it. Unnamed layers after the last named block (pooling, ConvNeXt's
    final LayerNormalization) are the head and join the top block.
    """
    pattern = re.compile(application.block_key)
    keys = [_block_key(pattern, layer.name) for layer in layers]
    if application.stem_end is not None:
        stem_end = application.stem_end(layers)
    else:
        stem_end = next((i for i, key in enumerate(keys) if key is not None), len(keys))
    blocks: list[int | None] = [None] * len(layers)
    numbers: dict[str, int] = {}
    waiting: list[int] = []  # unnamed layers, until the next named one says their block
    for i in range(stem_end, len(layers)):
        key = keys[i]
        if key is None:
            waiting.append(i)
            continue
        block = numbers.setdefault(key, len(numbers))
        for j in [*waiting, i]:
            blocks[j] = block
        waiting = []
    for j in waiting:
        blocks[j] = len(numbers) - 1 if numbers else None
    return blocks


def _block_key(pattern: re.Pattern[str], layer_name: str) -> str | None:
    match = pattern.search(layer_name)
    return match.group(1) if match else None


def build_application(name: str, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    application = APPLICATIONS[name]
    constructor = getattr(keras.applications, application.constructor)
    pixels = keras.Input(shape=input_shape, name="image")
    # input_tensor makes the preprocessing layers part of the application model itself,
    # so model.layers is one flat list, as the block numbering and set_trainable_from need
    features = _preprocess(pixels, application.preprocessing)
    local_file = None if weights in (None, "imagenet") else Path(weights)
    with _imagenet_weights(name, local_file):
        try:
            model = constructor(
                include_top=False,
                # a local file is the ImageNet weights fetched by hand: build exactly as for
                # "imagenet" (EfficientNet B* adds a layer then) and let Keras load the file
                weights=None if weights is None else "imagenet",
                input_tensor=features,
                input_shape=input_shape,
                pooling="avg",
                **application.options,
            )
        except (ValueError, OSError) as err:
            if local_file is None:
                raise
            raise PipelineError(f"could not load weights file {local_file} into {name}: {err}") from err
    # most applications take their inputs as a list of one; a bare input saves callers a warning per call
    return keras.Model(pixels, model.outputs[0], name=model.name)


@contextmanager
def _imagenet_weights(backbone_name: str, local_file: Path | None) -> Iterator[None]:
    """While keras.applications builds a model, serve ``local_file`` as its ImageNet weights,
    or turn a failed download into a PipelineError that says how to work offline.

    keras.applications fetch their weights with ``file_utils.get_file`` looked up
    at call time; it names the file and its URL, so no table of them is kept here.
    Not thread-safe (it swaps a module attribute), as model building here is not threaded.
    """
    from keras.src.utils import file_utils

    download = file_utils.get_file

    def get_file(*args: Any, **kwargs: Any) -> str:
        if local_file is not None:
            return str(local_file)
        try:
            return download(*args, **kwargs)
        except Exception as err:  # get_file raises a bare Exception for URL errors
            request = inspect.signature(download).bind(*args, **kwargs).arguments
            raise _download_failure(backbone_name, request, err) from err

    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = download


def _download_failure(backbone_name: str, request: dict[str, Any], err: Exception) -> PipelineError:
    url = request.get("origin") or "?"
    file_name = request.get("fname") or os.path.basename(urllib.parse.urlsplit(url).path)
    target = _keras_cache_dir(request) / file_name
    return PipelineError(
        f"could not download the ImageNet weights of backbone {backbone_name}: {file_name} "
        f"from {url} ({err}). Without network access, fetch that file elsewhere and put it at "
        f"{target} (Keras looks in $KERAS_HOME/models/, default ~/.keras/models/), or set "
        "train_frozen.weights to the path of a local copy"
    )


def _keras_cache_dir(request: dict[str, Any]) -> Path:
    """Where get_file looks for a cached file: cache_dir (default $KERAS_HOME) / cache_subdir."""
    from keras.src.backend.config import keras_home

    root = request.get("cache_dir") or keras_home()
    return Path(os.path.expanduser(root)) / request.get("cache_subdir", "datasets")
