"""Training recipes: optimizers, learning-rate schedules, losses and class weights.

Everything a training phase needs to turn its params section into Keras objects,
kept apart from the phases themselves so each piece can be tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from tlpipe.core.config import TrainingPhaseParams
from tlpipe.core.errors import PipelineError

# classes are "imbalanced" (class_weight: auto turns weighting on) above this largest/smallest ratio
IMBALANCE_RATIO = 1.5

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "sgd_nesterov": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


# ------------------------------------------------------------ learning rate


def epoch_learning_rate(params: TrainingPhaseParams, epoch: int) -> float:
    """The learning rate for a 0-based epoch: warm-up, then the constant, step or cosine schedule.

    The schedule starts from ``params.learning_rate``.

    Per-epoch rather than per-step, so a run resumed at epoch k continues on the
    same curve without needing the optimizer's step counter.
    """
    base_lr, floor, warmup = params.learning_rate, params.min_learning_rate, params.warmup_epochs
    if epoch < warmup:  # linear, never 0: a first epoch at rate 0 would be wasted
        return base_lr * (epoch + 1) / (warmup + 1)
    if params.schedule == "step":
        return max(floor, base_lr * params.decay_factor ** ((epoch - warmup) // params.decay_every))
    if params.schedule == "cosine":
        # each epoch trains at the rate of its start: the last one still learns a little
        progress = min(1.0, (epoch - warmup) / (params.epochs - warmup))
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr


def schedule_callbacks(params: TrainingPhaseParams) -> list[keras.callbacks.Callback]:
    """The Keras callbacks that apply ``params.schedule`` (none for a constant rate)."""
    if params.schedule in ("step", "cosine") or params.warmup_epochs:
        return [keras.callbacks.LearningRateScheduler(lambda e, _lr: epoch_learning_rate(params, e))]
    if params.schedule == "plateau":
        return [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=params.decay_factor,
                patience=params.plateau_patience,
                min_lr=params.min_learning_rate,
                verbose=1,
            )
        ]
    return []


# ------------------------------------------------------------ optimizers


def make_optimizer(
    params: TrainingPhaseParams, lr_factors: dict[int, float] | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer ``params`` names, at ``params.learning_rate``.

    ``lr_factors`` maps ``id(variable)`` to a learning-rate multiplier, for
    discriminative rates (a backbone slower than its head). Keras applies one
    rate to every variable, and scaling gradients instead would be undone by
    Adam's normalisation, so the multiplier is applied in the update step.
    """
    cls = _OPTIMIZERS[params.optimizer]
    kwargs: dict[str, object] = {
        "learning_rate": params.learning_rate,
        "clipnorm": params.clip_norm,
        # named: Keras would number it by how many optimizers this process made ("adam_2")
        "name": params.optimizer,
    }
    if params.weight_decay:
        kwargs["weight_decay"] = params.weight_decay
    if params.optimizer.startswith("sgd"):
        kwargs.update(momentum=params.momentum, nesterov=params.optimizer == "sgd_nesterov")
    elif params.optimizer == "rmsprop":
        kwargs["momentum"] = params.momentum
    if lr_factors and any(f != 1.0 for f in lr_factors.values()):
        return _with_lr_factors(cls)(lr_factors=lr_factors, **kwargs)
    return cls(**kwargs)


def _with_lr_factors(cls: type[keras.optimizers.Optimizer]) -> type[keras.optimizers.Optimizer]:
    class Discriminative(cls):
        """``cls`` with a learning-rate multiplier per variable (never saved: see fine_tune)."""

        def __init__(self, lr_factors: dict[int, float], **kwargs):
            super().__init__(**kwargs)
            self._lr_factor_by_id = dict(lr_factors)
            self._lr_factor_by_index: list[float] = []

        def build(self, variables):
            self._lr_factor_by_index = [self._lr_factor_by_id.get(id(v), 1.0) for v in variables]
            super().build(variables)

        def update_step(self, gradient, variable, learning_rate):
            factor = self._lr_factor_by_index[self._get_variable_index(variable)]
            return super().update_step(gradient, variable, learning_rate * factor)

    Discriminative.__name__ = f"Discriminative{cls.__name__}"
    return Discriminative


def lr_factors_for(variables: Iterable, factor: float) -> dict[int, float]:
    """The ``lr_factors`` that give every one of ``variables`` the same multiplier."""
    return {id(v): factor for v in variables}


# ------------------------------------------------------------ losses and weights


def loss_for(n_classes: int, label_smoothing: float) -> keras.losses.Loss:
    """Binary cross-entropy for a sigmoid head, categorical (one-hot labels) for softmax.

    Multi-class labels are one-hot so label smoothing works for both heads.
    """
    if n_classes == 2:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def encode_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Label indices in the form :func:`loss_for`'s loss takes."""
    labels = np.asarray(labels)
    if n_classes == 2:
        return labels.astype(np.float32).reshape(-1, 1)
    return np.eye(n_classes, dtype=np.float32)[labels]


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """Keras ``class_weight``: n / (k * count) per class ("balanced"), or None.

    ``auto`` weights only when the classes are imbalanced (largest/smallest above
    :data:`IMBALANCE_RATIO`); a class absent from ``labels`` is an error either way.
    """
    if mode == "none":
        return None
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise PipelineError(f"the train split has no images of class index {missing}")
    if mode == "auto" and counts.max() / counts.min() <= IMBALANCE_RATIO:
        return None
    balanced = compute_class_weight("balanced", classes=np.arange(n_classes), y=labels)
    return {i: float(w) for i, w in enumerate(balanced)}
