"""The registry of pretrained backbones.

Every backbone is built as a Keras model that takes raw RGB pixels in 0..255
(its own preprocessing is inside the model, made of serializable layers so the
saved model reloads with ``safe_mode=True``) and returns pooled features, and
knows how its layers group into blocks so fine-tuning can unfreeze the top N.

Besides EfficientNet-Lite0 (ImageNet weights from an installed pip package) the
zoo wraps ``keras.applications``; their ImageNet weights are downloaded by Keras
into ``$KERAS_HOME/models/`` (default ``~/.keras/models/``) on first use.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import keras

from tlpipe.core.errors import PipelineError

BACKBONE_LAYER_NAME = "backbone"
DEFAULT_MIN_SIZE = 32

Builder = Callable[[tuple[int, int, int], str | None], keras.Model]
# the block of every layer, given ``model.layers`` in order; None: outside every block (input, stem)
BlockAssigner = Callable[[Sequence[keras.layers.Layer]], list[int | None]]


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the model, and how its layers group into blocks."""

    name: str
    builder: Builder  # unchecked; call build()
    block_count: int  # blocks that can be unfrozen, counted from the top
    assign_blocks: BlockAssigner
    min_size: int = DEFAULT_MIN_SIZE  # smallest input side the architecture accepts

    def build(self, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        """Build on raw 0..255 RGB input; ``weights``: None, ``"imagenet"`` or a local file."""
        self._check_input_size(input_shape)
        if weights is not None and weights != "imagenet":
            weights = str(_existing_weights_file(self.name, weights))
        return self.builder(input_shape, weights)

    def layer_blocks(self, model: keras.Model) -> dict[str, int | None]:
        """Block index (0 = bottom) of every layer of a model this backbone built, by layer name.

        Worked out from the layer order rather than from names alone: InceptionV3's
        layers are auto-named (``conv2d_57``), and the numbers change from one
        build to the next, so only the position between its ``mixedN`` layers
        says which block a layer is in.
        """
        return dict(zip((layer.name for layer in model.layers), self.assign_blocks(model.layers)))

    def _check_input_size(self, input_shape: tuple[int, int, int]) -> None:
        height, width = input_shape[0], input_shape[1]
        if min(height, width) < self.min_size:
            raise PipelineError(
                f"backbone {self.name} needs images of at least {self.min_size}x{self.min_size} "
                f"pixels, got {height}x{width}; raise the image size"
            )


def _existing_weights_file(backbone_name: str, weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(
            f"weights file for backbone {backbone_name} not found: {weights} "
            "(weights is 'imagenet', 'none' or the path of a weights file)"
        )
    return path


# ------------------------------------------------------------ EfficientNet-Lite0


def _efficientnet_lite0() -> Backbone:
    from tlpipe.model import efficientnet_lite as lite

    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        return lite.build_efficientnet_lite0(
            input_shape=input_shape, include_top=False, pooling="avg", weights=weights
        )

    def assign_blocks(layers: Sequence[keras.layers.Layer]) -> list[int | None]:
        return [lite.block_index(layer.name) for layer in layers]

    # the head conv ("top_") counts as one more block above the 16 MBConv blocks
    return Backbone("efficientnet_lite0", build, lite.BLOCK_COUNT + 1, assign_blocks)


# ------------------------------------------------------------ keras.applications

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
class _Application:
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

_APPLICATIONS: dict[str, _Application] = {
    "mobilenet_v2": _Application("MobileNetV2", "tf", r"^(expanded_conv|block_\d+|Conv_1)(?:_|$)", 18),
    "mobilenet_v3_small": _Application(
        "MobileNetV3Small",
        "builtin",
        r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)",
        12,
        options=_WITH_PREPROCESSING,
    ),
    "mobilenet_v3_large": _Application(
        "MobileNetV3Large",
        "builtin",
        r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)",
        16,
        options=_WITH_PREPROCESSING,
    ),
    "efficientnet_b0": _Application("EfficientNetB0", "builtin", _EFFICIENTNET_BLOCKS, 17),
    "efficientnet_b1": _Application("EfficientNetB1", "builtin", _EFFICIENTNET_BLOCKS, 24),
    "efficientnet_b2": _Application("EfficientNetB2", "builtin", _EFFICIENTNET_BLOCKS, 24),
    "efficientnet_b3": _Application("EfficientNetB3", "builtin", _EFFICIENTNET_BLOCKS, 27),
    "efficientnetv2_b0": _Application(
        "EfficientNetV2B0", "builtin", _EFFICIENTNET_BLOCKS, 22, options=_WITH_PREPROCESSING
    ),
    "resnet50": _Application("ResNet50", "caffe", r"^(conv[2-5]_block\d+)_", 16),
    # the final post_bn (ResNet50V2) and bn (DenseNet121) join the top block: alone they would
    # make a block with nothing to train while BatchNormalization stays frozen
    "resnet50_v2": _Application("ResNet50V2", "tf", r"^(conv[2-5]_block\d+)_", 16),
    # dense layers convN_blockM and transitions poolN
    "densenet121": _Application("DenseNet121", "torch", r"^(conv[2-5]_block\d+|pool[2-4])_", 61),
    # only the block-ending concatenations mixed0..mixed10: mixed9_1 is inside block mixed10
    "inception_v3": _Application(
        "InceptionV3", "tf", r"^(mixed\d+)$", 11, min_size=75, stem_end=_after_second_max_pool
    ),
    "vgg16": _Application("VGG16", "caffe", r"^(block\d)_", 5),
    "convnext_tiny": _Application(
        "ConvNeXtTiny",
        "builtin",
        r"_(stage_\d+_block_\d+|downsampling_block_\d+)(?:_|$)",
        21,
        options=_WITH_PREPROCESSING,
    ),
}


def _keyed_blocks(layers: Sequence[keras.layers.Layer], application: _Application) -> list[int | None]:
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


def _build_application(name: str, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    application = _APPLICATIONS[name]
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


def _application_backbone(name: str) -> Backbone:
    application = _APPLICATIONS[name]
    return Backbone(
        name=name,
        builder=partial(_build_application, name),
        block_count=application.block_count,
        assign_blocks=partial(_keyed_blocks, application=application),
        min_size=application.min_size,
    )


# ------------------------------------------------------------ registry

REGISTRY: dict[str, Callable[[], Backbone]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    **{name: partial(_application_backbone, name) for name in _APPLICATIONS},
}


def get_backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise PipelineError(f"unknown backbone {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def resolve_weights(weights: str) -> str | None:
    """params spell 'no weights' as the string 'none'."""
    return None if weights.lower() == "none" else weights


# ------------------------------------------------------------ unfreezing


def set_top_blocks_trainable(
    backbone_model: keras.Model, backbone: Backbone, n_blocks: int, *, train_batchnorm: bool = False
) -> int:
    """Unfreeze the top ``n_blocks`` blocks, freeze everything else.

    BatchNormalization layers stay frozen unless ``train_batchnorm``: frozen
    ones run in inference mode in Keras 3, so the ImageNet statistics are kept
    while the convolutions adapt. Training from scratch needs them trainable,
    as there are no statistics worth keeping. Returns the number of layers with
    weights made trainable.
    """
    if not 0 <= n_blocks <= backbone.block_count:
        raise PipelineError(
            f"fine_tune.unfreeze_blocks={n_blocks} but {backbone.name} has "
            f"{backbone.block_count} blocks (allowed: 0..{backbone.block_count})"
        )
    first = backbone.block_count - n_blocks
    blocks = backbone.layer_blocks(backbone_model)
    chosen = {name for name, block in blocks.items() if n_blocks > 0 and block is not None and block >= first}
    return _set_trainable(backbone_model, chosen, train_batchnorm)


def set_trainable_from(backbone_model: keras.Model, layer_name: str, train_batchnorm: bool = False) -> int:
    """Unfreeze ``layer_name`` and every layer after it in ``backbone_model.layers`` order.

    For cut points that do not fall on block boundaries. BatchNormalization
    stays frozen unless ``train_batchnorm`` (see set_top_blocks_trainable).
    Returns the number of layers with weights made trainable.
    """
    names = [layer.name for layer in backbone_model.layers]
    if layer_name not in names:
        raise PipelineError(
            f"backbone {backbone_model.name} has no layer {layer_name!r}; "
            f"layers with similar names: {', '.join(_layer_suggestions(backbone_model, layer_name))}"
        )
    return _set_trainable(backbone_model, set(names[names.index(layer_name) :]), train_batchnorm)


def _layer_suggestions(model: keras.Model, layer_name: str, count: int = 5) -> list[str]:
    """Close matches, else the top layers with weights: the usual place to start unfreezing."""
    names = [layer.name for layer in model.layers]
    close = difflib.get_close_matches(layer_name, names, n=count, cutoff=0.5)
    return close or [layer.name for layer in model.layers if layer.weights][-count:]


def _set_trainable(backbone_model: keras.Model, chosen: set[str], train_batchnorm: bool) -> int:
    # the frozen phase sets the whole backbone untrainable; per-layer flags only count under a trainable parent
    backbone_model.trainable = True
    unfrozen = 0
    for layer in backbone_model.layers:
        train_it = layer.name in chosen and (
            train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization)
        )
        layer.trainable = train_it
        unfrozen += int(train_it and bool(layer.weights))
    return unfrozen
