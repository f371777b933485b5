"""Tiny real runs of both training phases, shared by the tests of each training module."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.model import outputs
from tlpipe.train.fine_tune import fine_tune
from tlpipe.train.frozen import train_frozen

BACKBONE = "efficientnet_lite0"
HISTORY_COLUMNS = {"epoch", "loss", "val_loss", "accuracy", "val_accuracy"}
# fine-tuning the top 2 blocks (block15 and the head conv) trains exactly these backbone layers
TOP_TWO_BLOCKS = {"block15_expand_conv", "block15_dwconv", "block15_project_conv", "top_conv"}


@dataclass
class Trained:
    root: Path
    frozen: Path
    frozen_history: Path
    frozen_metrics: dict
    frozen_run: str
    model: Path
    fine_history: Path
    fine_metrics: dict
    fine_run: str
    oof: Path


def train_both_phases(root: Path, frozen_epochs: int, fine_epochs: int, mlflow_store: str) -> Trained:
    with pytest.MonkeyPatch.context() as mp:
        # shared fixtures run before conftest's per-test MLflow isolation: isolate here too
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "tlpipe-tests")
        out = root.parent
        frozen_params = TrainFrozenParams(epochs=frozen_epochs, batch_size=8, learning_rate=0.01, patience=5)
        frozen_metrics = train_frozen(
            root, frozen_params, out / "frozen.keras", out / "frozen" / "history.csv", out / "ckpt-frozen",
            out / "frozen" / "oof.csv",
        )  # fmt: skip
        frozen_run = mlflow.last_active_run().info.run_id
        fine_params = FineTuneParams(
            unfreeze_blocks=2, epochs=fine_epochs, batch_size=8, learning_rate=1e-3, patience=5
        )
        fine_metrics = fine_tune(
            root, out / "frozen.keras", fine_params, out / "model.keras", out / "fine" / "history.csv",
            out / "ckpt-fine",
        )  # fmt: skip
        fine_run = mlflow.last_active_run().info.run_id
    return Trained(
        root,
        out / "frozen.keras",
        out / "frozen" / "history.csv",
        frozen_metrics,
        frozen_run,
        out / "model.keras",
        out / "fine" / "history.csv",
        fine_metrics,
        fine_run,
        out / "frozen" / "oof.csv",
    )


def load(path: Path) -> keras.Model:
    return keras.models.load_model(path)


def read_history(path: Path) -> tuple[list[str], list[dict[str, float]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), [{k: float(v) for k, v in row.items()} for row in reader]


def changed_layers(before: Path, after: Path) -> set[str]:
    """The backbone layers whose weights differ between two saved models."""
    old, _ = outputs.find_backbone(load(before))
    new, _ = outputs.find_backbone(load(after))
    return {
        layer.name
        for layer in new.layers
        if not all(
            np.array_equal(a, b)
            for a, b in zip(old.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True)
        )
    }
