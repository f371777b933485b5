"""Tests for what both phases share: history, best-epoch metrics, MLflow logging, reproducibility."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from phase_fixtures import HISTORY_COLUMNS, Trained, read_history

from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.train.fine_tune import fine_tune
from tlpipe.train.fitting import best_epoch_metrics, write_history
from tlpipe.train.frozen import train_frozen

pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def test_best_epoch_metrics_picks_lowest_val_loss() -> None:
    rows = [
        {"epoch": 1, "loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.5},
        {"epoch": 2, "loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.7},
        {"epoch": 3, "loss": 0.3, "val_loss": 0.6, "val_accuracy": 0.9},
    ]
    assert best_epoch_metrics(rows) == {
        "best_epoch": 2,
        "epochs_run": 3,
        "best_loss": 0.5,
        "best_val_loss": 0.4,
        "best_val_accuracy": 0.7,
    }


def test_history_csv_puts_epoch_first_with_newline_endings(tmp_path: Path) -> None:
    rows = [{"loss": 0.5, "epoch": 1, "val_loss": 0.25}, {"loss": 0.125, "epoch": 2, "val_loss": 0.75}]
    write_history(rows, tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_bytes() == b"epoch,loss,val_loss\n1,0.5,0.25\n2,0.125,0.75\n"
    # the bytes the hand-written csv.DictWriter gave before write_csv took over
    with open(tmp_path / "old.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "loss", "val_loss"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert (tmp_path / "h.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()
    write_history([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_bytes() == b"epoch\n"


@pytest.mark.parametrize("phase", ["frozen", "fine"])
def test_history_has_one_row_per_epoch(tri: Trained, phase: str) -> None:
    path, metrics = getattr(tri, f"{phase}_history"), getattr(tri, f"{phase}_metrics")
    fields, rows = read_history(path)
    assert fields[0] == "epoch" and set(fields) == HISTORY_COLUMNS
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert metrics["epochs_run"] == 2
    assert all(r["loss"] > 0 and 0 <= r["val_accuracy"] <= 1 for r in rows)
    best = min(rows, key=lambda r: r["val_loss"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_val_loss"] == best["val_loss"]


# --------------------------------------------------------------------- MLflow


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


@pytest.mark.parametrize(
    ("phase", "stage", "prefix", "section", "param_value"),
    [
        ("frozen", "train-frozen", "frozen", "train_frozen", ("train_frozen.learning_rate", "0.01")),
        ("fine", "fine-tune", "fine_tune", "fine_tune", ("fine_tune.unfreeze_blocks", "2")),
    ],
)
def test_each_stage_logs_a_run_with_params_epoch_metrics_and_model(
    tri: Trained, phase: str, stage: str, prefix: str, section: str, param_value: tuple[str, str]
) -> None:
    client = _client()
    run_id = getattr(tri, f"{phase}_run")
    run = client.get_run(run_id)
    tagged = client.search_runs([run.info.experiment_id], filter_string=f"tags.`tlpipe.stage` = '{stage}'")
    assert run_id in {r.info.run_id for r in tagged}
    assert all(r.data.tags["tlpipe.stage"] == stage for r in tagged)

    key, value = param_value
    assert run.data.params[key] == value
    assert run.data.params[f"{section}.epochs"] == "2" and f"{section}.seed" in run.data.params

    _, rows = read_history(getattr(tri, f"{phase}_history"))
    for name in ("loss", "val_loss", "accuracy", "val_accuracy"):
        logged = sorted(client.get_metric_history(run_id, f"{prefix}.{name}"), key=lambda m: m.step)
        assert [m.step for m in logged] == [r["epoch"] for r in rows] == [1, 2], name
        np.testing.assert_allclose([m.value for m in logged], [r[name] for r in rows], rtol=1e-6)
    assert run.data.metrics["epochs_run"] == 2
    assert run.data.metrics["best_val_loss"] == pytest.approx(
        getattr(tri, f"{phase}_metrics")["best_val_loss"]
    )

    models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id]
    assert [m.name for m in models] == ["model"]
    assert str(models[0].status).endswith("READY")


# ------------------------------------------------------------- reproducibility


def test_same_params_and_data_give_byte_identical_models_on_cpu(tri: Trained, tmp_path: Path) -> None:
    """Seeds plus TensorFlow op determinism: a rerun reproduces both phases' files exactly."""
    frozen_params = TrainFrozenParams(epochs=2, batch_size=8, learning_rate=0.01, patience=5)
    train_frozen(tri.root, frozen_params, tmp_path / "frozen.keras", tmp_path / "frozen.csv", tmp_path / "c1")
    assert (tmp_path / "frozen.keras").read_bytes() == tri.frozen.read_bytes()
    assert (tmp_path / "frozen.csv").read_bytes() == tri.frozen_history.read_bytes()
    fine_params = FineTuneParams(unfreeze_blocks=2, epochs=2, batch_size=8, learning_rate=1e-3, patience=5)
    fine_tune(
        tri.root, tri.frozen, fine_params, tmp_path / "model.keras", tmp_path / "fine.csv", tmp_path / "c2"
    )
    assert (tmp_path / "model.keras").read_bytes() == tri.model.read_bytes()
    assert (tmp_path / "fine.csv").read_bytes() == tri.fine_history.read_bytes()
