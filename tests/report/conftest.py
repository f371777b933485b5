"""Fixtures of the report tests: an MLflow experiment per test and a tiny trained-looking model."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from report_cases import BINARY

from augmented_fixture import make_augmented


@pytest.fixture(autouse=True)
def experiment(mlflow_store, monkeypatch, tmp_path) -> str:
    """A fresh MLflow experiment per test: evaluate runs that other tests log stay out of the comparison."""
    name = f"report-{uuid.uuid4().hex[:12]}"
    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return experiment_id


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A two-class classifier on the default backbone at 32 px, and its augmented test images."""
    from tlpipe.model import storage
    from tlpipe.train import head

    root = tmp_path_factory.mktemp("tiny")
    augmented = make_augmented(root / "augmented", list(BINARY["per_class"]), {"test": 6}, size=32)
    backbone = head.build_backbone_model("efficientnet_lite0", "imagenet", 32)
    classifier_head = head.build_head(int(backbone.output_shape[-1]), 2, dropout=0.2)
    model_path = root / "model.keras"
    storage.save_model_atomically(head.assemble(backbone, classifier_head, 2, dropout=0.2), model_path)
    return augmented, model_path
