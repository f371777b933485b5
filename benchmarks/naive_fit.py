"""The usual Keras recipe for the frozen phase, which the pipeline does not use.

Every epoch runs the frozen backbone on every image. Kept as the reference that
the feature-cache path (:mod:`tlpipe.train.features`) is tested against
(tests/train/test_features.py) and benchmarked against (benchmarks/training_speed.py).
"""

from __future__ import annotations

import keras

from tlpipe.core.config import TrainFrozenParams
from tlpipe.data.datasets import AugmentedData, image_dataset
from tlpipe.train.fitting import compile_for, targets


def fit_through_frozen_backbone(
    backbone_model: keras.Model, head: keras.Model, data: AugmentedData, params: TrainFrozenParams
) -> keras.callbacks.History:
    """Train ``head`` on the frozen ``backbone_model``'s output, computed afresh every epoch."""
    n_classes = len(data.classes)
    backbone_model.trainable = False
    inputs = keras.Input(backbone_model.input_shape[1:])
    model = keras.Model(inputs, head(backbone_model(inputs, training=False)))
    compile_for(model, params, n_classes)
    train, val = (
        image_dataset(data.split(s), params.batch_size, targets=targets(data, s)) for s in ("train", "val")
    )
    return model.fit(train, validation_data=val, epochs=params.epochs, verbose=0)
