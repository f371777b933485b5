"""The registry of pretrained backbones.

Every backbone is built as a Keras model that takes raw RGB pixels in 0..255
(its own preprocessing is inside the model) and returns pooled features, and
knows how its layers group into blocks so fine-tuning can unfreeze the top N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras

from tlpipe.errors import PipelineError

BACKBONE_LAYER_NAME = "backbone"


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[tuple[int, int, int], str | None], keras.Model]
    block_index: Callable[[str], int | None]  # layer name -> block, None outside any block
    block_count: int  # blocks that can be unfrozen, counted from the top


def _efficientnet_lite0() -> Backbone:
    from tlpipe import efficientnet_lite as lite

    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        return lite.build_efficientnet_lite0(
            input_shape=input_shape, include_top=False, pooling="avg", weights=weights
        )

    # the head conv ("top_") counts as one more block above the 16 MBConv blocks
    return Backbone("efficientnet_lite0", build, lite.block_index, lite.BLOCK_COUNT + 1)


REGISTRY: dict[str, Callable[[], Backbone]] = {"efficientnet_lite0": _efficientnet_lite0}


def get_backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise PipelineError(f"unknown backbone {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def resolve_weights(weights: str) -> str | None:
    """params spell 'no weights' as the string 'none'."""
    return None if weights.lower() == "none" else weights


def set_top_blocks_trainable(backbone_model: keras.Model, backbone: Backbone, n_blocks: int) -> int:
    """Unfreeze the top ``n_blocks`` blocks; BatchNormalization layers stay frozen.

    Frozen BatchNormalization layers run in inference mode in Keras 3, so the
    ImageNet statistics are kept while the convolutions adapt. Returns the number
    of layers with weights made trainable.
    """
    if not 0 <= n_blocks <= backbone.block_count:
        raise PipelineError(
            f"fine_tune.unfreeze_blocks={n_blocks} but {backbone.name} has "
            f"{backbone.block_count} blocks (allowed: 0..{backbone.block_count})"
        )
    first = backbone.block_count - n_blocks
    backbone_model.trainable = True
    unfrozen = 0
    for layer in backbone_model.layers:
        index = backbone.block_index(layer.name)
        train_it = (
            n_blocks > 0
            and index is not None
            and index >= first
            and not isinstance(layer, keras.layers.BatchNormalization)
        )
        layer.trainable = train_it
        unfrozen += int(train_it and bool(layer.weights))
    return unfrozen
