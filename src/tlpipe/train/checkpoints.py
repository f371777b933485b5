"""Resumable training: a checkpoint per epoch, early stopping that survives a restart.

A training stage keeps its checkpoint folder between runs: local scratch, ignored
by git and deliberately no DVC output (a fresh clone lacks it, and DVC would rerun
the stage for that); the fingerprint below, not DVC, decides whether it is used.
After every epoch it saves the model and optimizer variables, the best weights so
far and the early-stopping state; a rerun whose inputs have the same fingerprint
loads them and continues from the next epoch. Every file is written
to a temporary name and renamed, so a kill leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.files import atomic_write, json_digest

STATE = "state.json"
LAST_WEIGHTS = "last_weights.npz"
LAST_OPTIMIZER = "last_optimizer.npz"
BEST_WEIGHTS = "best_weights.npz"


def fingerprint(*parts: object) -> str:
    """A digest of everything a checkpoint depends on (params, input digests...)."""
    return json_digest(parts)


@dataclass
class TrainingState:
    fingerprint: str
    epochs_done: int = 0
    rows: list[dict] = field(default_factory=list)  # one history row per finished epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0  # epochs since the best one
    stopped_early: bool = False
    initial_val_loss: float | None = None  # fine-tuning: the input model's, to compare against
    complete: bool = False


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, *arrays)

    atomic_write(path, write)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class Checkpoint:
    """One training run's checkpoint folder."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def load_state(self) -> TrainingState | None:
        """The saved state when it belongs to these inputs and is unfinished, else None.

        A state from other inputs (or a finished run) is removed: resuming it would
        mix two different trainings.
        """
        path = self.directory / STATE
        try:
            state = TrainingState(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            state = None
        if state is None or state.fingerprint != self.fingerprint or state.complete:
            self.clear()
            return None
        if state.epochs_done and not (self.directory / LAST_WEIGHTS).exists():
            self.clear()
            return None
        return state

    def clear(self) -> None:
        for name in (STATE, LAST_WEIGHTS, LAST_OPTIMIZER, BEST_WEIGHTS):
            (self.directory / name).unlink(missing_ok=True)

    def save_state(self, state: TrainingState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(state), indent=1)
        atomic_write(self.directory / STATE, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def save_epoch(self, model: keras.Model, state: TrainingState, improved: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        weights = model.get_weights()
        _save_arrays(self.directory / LAST_WEIGHTS, weights)
        if model.optimizer is not None and model.optimizer.built:
            _save_arrays(self.directory / LAST_OPTIMIZER, [v.numpy() for v in model.optimizer.variables])
        if improved:
            _save_arrays(self.directory / BEST_WEIGHTS, weights)
        self.save_state(state)  # last: the state only ever points at files already in place

    def restore_last(self, model: keras.Model) -> bool:
        """Model weights and, when it fits, optimizer state; True if the optimizer was restored."""
        model.set_weights(_load_arrays(self.directory / LAST_WEIGHTS))
        path = self.directory / LAST_OPTIMIZER
        optimizer = model.optimizer
        if optimizer is None or not path.exists():
            return False
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        saved = _load_arrays(path)
        if [tuple(v.shape) for v in optimizer.variables] != [a.shape for a in saved]:
            return False  # a different trainable set (gradual unfreezing moved on): start it afresh
        for variable, value in zip(optimizer.variables, saved, strict=True):
            variable.assign(value)
        return True

    def best_weights(self) -> list[np.ndarray] | None:
        path = self.directory / BEST_WEIGHTS
        return _load_arrays(path) if path.exists() else None

    def finish(self, state: TrainingState) -> None:
        """Mark the run complete and drop the weight files (the stage's model holds them)."""
        state.complete = True
        for name in (LAST_WEIGHTS, LAST_OPTIMIZER, BEST_WEIGHTS):
            (self.directory / name).unlink(missing_ok=True)
        self.save_state(state)


class ResumableEarlyStopping(keras.callbacks.Callback):
    """Early stopping on val_loss whose state lives in a :class:`Checkpoint`.

    Keras's EarlyStopping forgets its best epoch when the process dies; this one
    records each finished epoch (history row, best weights, patience counter) so
    the run can continue after a kill exactly where it left off.
    """

    def __init__(self, checkpoint: Checkpoint, state: TrainingState, patience: int):
        super().__init__()
        self.checkpoint = checkpoint
        self.state = state
        self.patience = patience

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if k != "learning_rate"}}
        state = self.state
        state.rows.append(row)
        state.epochs_done = epoch + 1
        val_loss = float(logs["val_loss"])
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch + 1, 0
        else:
            state.wait += 1
        if state.wait >= self.patience:
            state.stopped_early = True
            self.model.stop_training = True
        self.checkpoint.save_epoch(self.model, state, improved)
