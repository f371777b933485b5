"""Shared fixtures: every test logs to a throw-away MLflow store, never the repo's."""

from __future__ import annotations

import os

import pytest

# strict float32 math in every test and every process a test starts, on any CPU: the training stages'
# bf16 math on CPUs with bf16 units (tlpipe.train.devices) has its own tests, which unset this
os.environ["ONEDNN_DEFAULT_FPMATH_MODE"] = "STRICT"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session (creating one costs seconds).

    Its experiment keeps artifacts in the temporary folder too: MLflow's default
    for a SQLite store is ./mlruns under the current directory, the repository.
    """
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment(
        "tlpipe-tests", artifact_location=(root / "artifacts").as_uri()
    )
    return uri


@pytest.fixture(autouse=True)
def _isolated_mlflow(mlflow_store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tlpipe-tests")
    # mlflow's fluent API keeps the last store and experiment set in this process, ahead of the
    # environment: a test that logs with mlflow.start_run() directly must not inherit another test's
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("tlpipe-tests")
