"""MLflow bookkeeping: one run per stage, in one experiment.

The store defaults to ``sqlite:///mlflow.db`` (artifacts under ``mlruns/``) in the
directory DVC runs stages from, the repository root; ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` override it as MLflow users expect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "tlpipe"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before a stage does any work, when an MLflow tracking server does not answer.

    Otherwise the stage would train for minutes and fail when it logs, and its
    run would be lost. Local stores (sqlite, files) need no check.
    """
    import urllib.error
    import urllib.request

    from tlpipe.errors import PipelineError

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"  # the MLflow server's liveness endpoint
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            response.read(64)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or set MLFLOW_TRACKING_URI "
            f"to a reachable server, or unset it to use the local store {DEFAULT_TRACKING_URI}"
        ) from None


def _quiet_mlflow() -> None:
    # alembic prints a dozen INFO lines on the first use of a new store
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def stage_run(
    stage: str, params: Mapping[str, object], tags: Mapping[str, str] | None = None
) -> Iterator[object]:
    """An MLflow run for one stage, with the params the stage read already logged."""
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_name())
    with mlflow.start_run(run_name=stage, tags={"tlpipe.stage": stage, **(tags or {})}) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        yield run


def _param_value(value: object) -> object:
    return "null" if value is None else value


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(path, artifact_path=artifact_path)


def log_keras_model(model, name: str, example_batch) -> None:
    """Log a Keras model with the Keras flavor and a signature inferred from real inputs."""
    import mlflow
    from mlflow.models import infer_signature

    predictions = model.predict(example_batch, verbose=0)
    signature = infer_signature(example_batch, predictions)
    mlflow.keras.log_model(model, name=name, signature=signature, pip_requirements=model_requirements())


def model_requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it.

    Given explicitly because MLflow's own inference starts a subprocess that
    reloads the model, about ten seconds per logged model.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("keras", "tensorflow-cpu", "tensorflow", "numpy"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins
