"""The classification head, and the model that puts it on a backbone.

The head is built twice from the same layer recipe: alone, to train on cached
backbone features, and on top of the backbone, to take raw pixels.
"""

from __future__ import annotations

import keras

from tlpipe.model.backbones import get_backbone, resolve_weights
from tlpipe.model.outputs import HEAD_DROPOUT, HEAD_OUTPUT, output_spec


def _head_layers(
    n_classes: int, dropout: float, l2: float = 0.0
) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    spec = output_spec(n_classes)
    return (
        keras.layers.Dropout(dropout, name=HEAD_DROPOUT),
        keras.layers.Dense(
            spec.units,
            activation=spec.activation,
            kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
            dtype="float32",  # probabilities in float32 under a mixed-precision policy too
            name=HEAD_OUTPUT,
        ),
    )


def build_head(n_features: int, n_classes: int, dropout: float, l2: float = 0.0) -> keras.Model:
    """The classification head alone, trained on cached backbone features."""
    dropout_layer, dense = _head_layers(n_classes, dropout, l2)
    inputs = keras.Input((n_features,), name="features")
    return keras.Model(inputs, dense(dropout_layer(inputs)), name="head")


def assemble(
    backbone_model: keras.Model, head: keras.Model, n_classes: int, dropout: float, l2: float = 0.0
) -> keras.Model:
    """Backbone and a copy of the trained head as one model that takes raw pixels.

    The head's layers are copied rather than reused: a layer shared by two
    functional models does not survive a save/load of one of them intact.
    """
    backbone_model.trainable = False
    dropout_layer, dense = _head_layers(n_classes, dropout, l2)
    inputs = keras.Input(backbone_model.input_shape[1:], name="image")
    # no training=False here: frozen BatchNormalization runs in inference mode anyway (Keras 3),
    # and a from-scratch fine-tune needs its unfrozen BatchNormalization to learn statistics
    features = backbone_model(inputs)
    outputs = dense(dropout_layer(features))
    dense.set_weights(head.get_layer(HEAD_OUTPUT).get_weights())
    return keras.Model(inputs, outputs, name="classifier")


def build_backbone_model(name: str, weights: str, image_size: int) -> keras.Model:
    """The registry's backbone ``name`` with ``weights``, for square RGB images of ``image_size``."""
    backbone = get_backbone(name)
    inner = backbone.build((image_size, image_size, 3), resolve_weights(weights))
    # named after the registry entry so fine-tuning can find it and its block structure
    return keras.Model(inner.input, inner.output, name=backbone.name)
