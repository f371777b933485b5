"""What both training phases share: seeding, compiling, a resumable fit and its history.

Every function here reads the learning rate from the phase's params: a phase that
trains at another rate (the from-scratch baseline) resolves it there once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlpipe.core import tracking
from tlpipe.core.config import TrainingPhaseParams
from tlpipe.core.files import write_csv
from tlpipe.data.datasets import AugmentedData
from tlpipe.train.checkpoints import Checkpoint, ResumableEarlyStopping, TrainingState
from tlpipe.train.optimization import encode_labels, loss_for, make_optimizer, schedule_callbacks
from tlpipe.train.progress import ProgressLog

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops deterministic."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, under a phase prefix."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {f"{self.prefix}.{k}": float(v) for k, v in (logs or {}).items()}
        tracking.log_metrics(metrics, step=epoch + 1)  # 1-based, as in the history CSVs


def targets(data: AugmentedData, split: str) -> np.ndarray:
    """A split's labels in the form the phase's loss takes."""
    return encode_labels(data.split(split).labels, len(data.classes))


def compile_for(
    model: keras.Model,
    params: TrainingPhaseParams,
    n_classes: int,
    lr_factors: dict[int, float] | None = None,
) -> None:
    """Compile with the optimizer, loss and metrics ``params`` describe."""
    model.compile(
        optimizer=make_optimizer(params, lr_factors),
        loss=loss_for(n_classes, params.label_smoothing),
        metrics=["accuracy"],
    )


def fit_resumable(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    epochs: tuple[int, int],
    params: TrainingPhaseParams,
    checkpoint: Checkpoint,
    state: TrainingState,
    class_weight: dict[int, float] | None,
    prefix: str,
) -> None:
    """Fit from ``state.epochs_done`` up to ``epochs[1]``, checkpointing every epoch.

    ``epochs[0]`` is where this fit's own epochs begin (a gradual-unfreezing step
    starts later than 0); the schedule counts from the phase's first epoch.
    """
    if state.epochs_done >= epochs[1] or state.stopped_early:
        return
    if state.epochs_done > 0:
        restored = checkpoint.restore_last(model)
        logger.info(
            f"{prefix}: resuming after epoch {state.epochs_done} from {checkpoint.directory}"
            f" ({'with' if restored else 'without'} optimizer state)"
        )
    model.fit(
        train,
        validation_data=val,
        initial_epoch=state.epochs_done,
        epochs=epochs[1],
        shuffle=False,  # the datasets shuffle themselves (seeded); Keras cannot shuffle a tf.data input
        class_weight=class_weight,
        callbacks=[
            ResumableEarlyStopping(checkpoint, state, params.patience),
            *schedule_callbacks(params),
            MlflowEpochLogger(prefix),
            ProgressLog(prefix, params.batch_size, epochs[1]),
        ],
        verbose=2,
    )


def describe_class_weight(weights: dict[int, float] | None, classes: list[str]) -> str:
    """The class weights as one log line, by class name."""
    if weights is None:
        return "class weights: none"
    return "class weights: " + ", ".join(f"{classes[i]}={w:.3f}" for i, w in weights.items())


def write_history(rows: list[dict], path: Path) -> None:
    """One row per epoch, across every run that contributed (a resumed run included)."""
    keys = ["epoch", *(k for k in rows[0] if k != "epoch")] if rows else ["epoch"]
    write_csv(path, rows, keys)


def best_epoch_metrics(rows: list[dict]) -> dict[str, float]:
    """The lowest-val_loss epoch's metrics as ``best_*``, with its number and the epochs run."""
    best = min(rows, key=lambda r: r["val_loss"])  # the first of equals, as early stopping keeps it
    return {
        "best_epoch": best["epoch"],
        "epochs_run": len(rows),
        **{f"best_{k}": v for k, v in best.items() if k != "epoch"},
    }
