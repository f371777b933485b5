"""Class probabilities for a batch of images, the one way every caller runs a model.

Evaluate, ``tlpipe predict`` and the served model all call :func:`probabilities`,
so they cannot drift apart in how a model's output is read.
"""

from __future__ import annotations

import keras
import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.model.decision import Decided, Decision
from tlpipe.model.guard import Guard
from tlpipe.model.outputs import class_probabilities


def probabilities(model: keras.Model, images: object, n_classes: int | None = None) -> np.ndarray:
    """An (n, n_classes) probability matrix for ``images``.

    ``images`` is what ``model.predict`` takes: an array of raw 0..255 pixels, or a
    tf.data dataset of them. With ``n_classes``, a model with another number of
    outputs is an error naming both.
    """
    probs = class_probabilities(model.predict(images, verbose=0))
    if n_classes is not None and probs.shape[1] != n_classes:
        raise PipelineError(f"the model has {probs.shape[1]} outputs but {n_classes} class names were given")
    return probs


def decide(
    model: keras.Model, decision: Decision, images: object, guard: Guard | None = None
) -> tuple[Decided, np.ndarray | None]:
    """The decision on ``images``, and with a guard each image's unfamiliarity score.

    With a guard, ``model`` is the classifier's :func:`tlpipe.model.guard.feature_model`.
    """
    if guard is None:
        return decision.apply(probabilities(model, images, len(decision.classes))), None
    outputs, features = model.predict(images, verbose=0)
    raw = class_probabilities(outputs)
    if raw.shape[1] != len(decision.classes):
        raise PipelineError(
            f"the model has {raw.shape[1]} outputs but {len(decision.classes)} class names were given"
        )
    return decision.apply(raw), guard.scores(features)
