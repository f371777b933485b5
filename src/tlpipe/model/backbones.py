"""The registry of pretrained backbones.

Every backbone is built as a Keras model that takes raw RGB pixels in 0..255
(its own preprocessing is inside the model, made of serializable layers so the
saved model reloads with ``safe_mode=True``) and returns pooled features, and
knows how its layers group into blocks so fine-tuning can unfreeze the top N.

Besides EfficientNet-Lite0 (ImageNet weights from an installed pip package) the
zoo wraps ``keras.applications`` (:mod:`tlpipe.model.applications`). The names
are those of ``tlpipe.core.config.BACKBONES``, which params are validated against;
the registry is built in that order and refuses, at import, any name on one side only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import keras

from tlpipe.core.config import BACKBONES
from tlpipe.core.errors import PipelineError
from tlpipe.model.applications import APPLICATIONS, DEFAULT_MIN_SIZE, build_application, keyed_blocks

BACKBONE_LAYER_NAME = "backbone"

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
        names = (layer.name for layer in model.layers)
        return dict(zip(names, self.assign_blocks(model.layers), strict=True))

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


def _application_backbone(name: str) -> Backbone:
    application = APPLICATIONS[name]
    return Backbone(
        name=name,
        builder=partial(build_application, name),
        block_count=application.block_count,
        assign_blocks=partial(keyed_blocks, application=application),
        min_size=application.min_size,
    )


# ------------------------------------------------------------ registry

Factory = Callable[[], Backbone]

_FACTORIES: dict[str, Factory] = {
    "efficientnet_lite0": _efficientnet_lite0,
    **{name: partial(_application_backbone, name) for name in APPLICATIONS},
}


def _registry(names: Sequence[str], factories: dict[str, Factory]) -> dict[str, Factory]:
    """The factories in the order of ``names`` (params' choices), refusing any difference between the two."""
    missing = [name for name in names if name not in factories]
    unlisted = [name for name in factories if name not in names]
    if missing or unlisted:
        # at import: a backbone params accept but nothing builds (or the reverse) must never ship
        raise RuntimeError(
            f"tlpipe.core.config.BACKBONES and the backbone factories disagree: "
            f"no factory for {missing}, not in BACKBONES: {unlisted}"
        )
    return {name: factories[name] for name in names}


REGISTRY: dict[str, Factory] = _registry(BACKBONES, _FACTORIES)


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
    # the frozen phase sets the whole backbone untrainable; per-layer flags only count under a
    # trainable parent
    backbone_model.trainable = True
    unfrozen = 0
    for layer in backbone_model.layers:
        train_it = layer.name in chosen and (
            train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization)
        )
        layer.trainable = train_it
        unfrozen += int(train_it and bool(layer.weights))
    return unfrozen
