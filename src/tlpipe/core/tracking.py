"""MLflow bookkeeping: one run per stage, grouped per pipeline execution, in one experiment.

The store defaults to ``sqlite:///mlflow.db`` (artifacts under ``mlruns/``) in the
directory DVC runs stages from, the repository root; ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` override it as MLflow users expect (a team's server:
docs/team.md). The experiment is marked as model training for MLflow 3's UI, and on a
server each stage logs links that open the UI's model-training view of its run.

Lineage (:mod:`tlpipe.core.lineage`): a stage run is nested under a *pipeline run*
of its execution (one ``dvc repro``, ``dvc exp run``, queued experiment or ``tlpipe
retrain``). Every stage run is tagged with the git commit,
whether the work tree had changes, digests of its params and inputs, and a digest
of each output (``tlpipe.output.<path>``). An input is linked
(``tlpipe.input_run.<path>``) to the run that wrote it, found by that digest, so a
stage DVC skipped because its outputs were cached still shows, on the pipeline
run, as ``tlpipe.cached.<stage>`` pointing to the run that produced them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tlpipe.core import constants as C
from tlpipe.core.files import json_digest, path_digest, read_csv
from tlpipe.core.lineage import (
    execution_id,
    git_state,
    git_tags,
    link_producers,
    param_value,
    pipeline_run,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # in the directory DVC runs stages from
DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for stage commands; a queued experiment's points at its repository
DEFAULT_EXPERIMENT = "tlpipe"
# MLflow's context for a dataset input: what the stage does with it
DATASET_CONTEXT = {"train-frozen": "training", "fine-tune": "training", "evaluate": "evaluation"}
# MLflow 3's UI opens an experiment on its GenAI view (traces) unless told otherwise. The tag is the
# experiment kind its experiment-type selector writes, and reads where its GenAI / model-training
# switch is off; MLflow 3.17's switch is on and picks the view from the URL's workflowType (else the
# browser's last choice, GenAI at first), so the links tlpipe logs carry that parameter
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
TRAINING_VIEW_QUERY = "workflowType=machine_learning"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What the stage's command line says it reads and writes, set by ``cli.stage_main``."""

    params: Mapping[str, object] = field(default_factory=dict)  # every key, flattened
    inputs: Sequence[str] = ()
    outputs: Sequence[str] = ()


_context = StageContext()
_pipeline_run_id: str | None = None  # the current stage's pipeline run, while it runs
_muted = False  # in a stage_run(log=False): a multi-worker cluster's non-chief worker logs nothing


def set_stage_context(context: StageContext) -> None:
    global _context
    _context = context


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the repository's ``mlflow.db``.

    A queued DVC experiment runs in a temporary copy of the repository that is removed
    when it ends; DVC points ``DVC_ROOT`` at the repository itself, whose store is used.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_store_root() / 'mlflow.db'}"


def _store_root() -> Path:
    """Where the default store lives: the directory DVC runs stages from, or, in a queued
    experiment's temporary workspace, the repository it was queued in."""
    root = os.environ.get(DVC_ROOT_ENV)
    if root and Path(root).resolve() != Path.cwd().resolve():
        return Path(root).resolve()
    return Path(".")


def _experiment_artifacts() -> str | None:
    """The default store's artifact folder beside it (``mlruns/``), absolute, so that an
    experiment first created from a temporary workspace does not keep its artifacts there."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (_store_root() / "mlruns").resolve().as_uri()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before a stage does any work, when an MLflow tracking server does not answer.

    Otherwise the stage would train for minutes and fail when it logs, and its
    run would be lost. Local stores (sqlite, files) need no check.
    """
    import urllib.error
    import urllib.request

    from tlpipe.core.errors import PipelineError

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
    # MLflow prints links to each run it ends on a server, which open the UI's GenAI view;
    # stage_run logs the model-training view's instead (unless the user asked for MLflow's)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def use_experiment() -> str:
    """Make tlpipe's store and experiment MLflow's current ones; the experiment's id.

    The experiment is marked as model training (``mlflow.experimentKind``) unless it
    has a kind already, one a user chose included.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = experiment_name()
    if mlflow.get_experiment_by_name(name) is None:
        # suppressed: a concurrent experiment of the same sweep may have created it first
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(name, artifact_location=_experiment_artifacts())
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def ui_url(experiment_id: str, run_id: str | None = None, uri: str | None = None) -> str | None:
    """The MLflow UI's page of the experiment's runs (or of one run) in its model-training view.

    None for a local store, which has no UI until ``mlflow ui`` serves it. Credentials in
    the tracking URI are left out: the link is for logs.
    """
    from urllib.parse import urlsplit, urlunsplit

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri.rstrip("/"))
    base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?{TRAINING_VIEW_QUERY}"


def log_ui_links(stage: str, experiment_id: str, run_id: str) -> None:
    """Where to watch the stage's run and the experiment's, when the store is a server with a UI."""
    run_url = ui_url(experiment_id, run_id)
    if run_url:
        logger.info("MLflow run %s: %s", stage, run_url)
        logger.info("MLflow experiment (training runs): %s", ui_url(experiment_id))


@contextmanager
def stage_run(
    stage: str, params: Mapping[str, object], tags: Mapping[str, str] | None = None, log: bool = True
) -> Iterator[Any]:
    """An MLflow run for one stage, with its params, lineage tags and dataset inputs logged.

    Nested under the execution's pipeline run when there is one; output digests
    are tagged once the body has written the outputs. ``log=False`` (a worker of a
    multi-worker cluster other than the chief, which logs for the cluster) opens no run
    and touches no store, and every ``log_*`` call in the body does nothing (yields None).
    """
    global _pipeline_run_id, _muted
    if not log:
        _muted = True
        try:
            yield None
        finally:
            _muted = False
        return
    import mlflow

    _quiet_mlflow()
    experiment_id = use_experiment()
    client = mlflow.MlflowClient()
    inputs = {_key(p): path_digest(p) for p in _context.inputs if Path(p).exists()}
    execution = execution_id()
    parent = pipeline_run(client, experiment_id, execution, _context.params) if execution else None
    git = git_tags(client.get_run(parent).data.tags) if parent else git_state()
    run_tags = {
        C.STAGE_TAG: stage,
        C.PARAMS_DIGEST_TAG: json_digest(dict(params)),
        C.DATA_DIGEST_TAG: json_digest(inputs),
        **git,
        **{C.INPUT_TAG_PREFIX + path: digest for path, digest in inputs.items()},
        **({C.EXECUTION_TAG: execution} if execution else {}),
        **(tags or {}),
    }
    if parent:
        client.update_run(parent, status="RUNNING")
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=run_tags) as run:
            _pipeline_run_id = parent
            mlflow.log_params({k: param_value(v) for k, v in params.items()})
            link_producers(client, experiment_id, run.info.run_id, parent, inputs)
            log_dataset_inputs(stage, inputs)
            log_ui_links(stage, experiment_id, run.info.run_id)
            yield run
            outputs = {_key(p): path_digest(p) for p in _context.outputs if Path(p).exists()}
            mlflow.set_tags({C.OUTPUT_TAG_PREFIX + path: digest for path, digest in outputs.items()})
        status = "FINISHED"
    finally:
        _pipeline_run_id = None
        if parent:
            client.set_terminated(parent, status)


def _key(path: str | Path) -> str:
    return Path(path).as_posix()


def log_dataset_inputs(stage: str, inputs: Mapping[str, str]) -> None:
    """Each input folder holding a manifest, as an MLflow dataset input (name, digest, source)."""
    import mlflow
    import pandas as pd

    for path, digest in inputs.items():
        manifest = Path(path) / "manifest.csv"
        if not manifest.is_file():
            continue
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that it picked one of the two
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]  # set up by mlflow.data at import
                pd.DataFrame(read_csv(manifest)),
                source=Path(path).resolve().as_uri(),
                name=path,
                digest=digest[:32],  # the store keeps at most 36 characters
            )
        mlflow.log_input(dataset, context=DATASET_CONTEXT.get(stage, stage))


def log_pipeline_metrics(metrics: Mapping[str, float]) -> None:
    """Also log these on the pipeline run, so executions compare on the same names in the UI."""
    if _pipeline_run_id is None or _muted:
        return
    import mlflow
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    client = mlflow.MlflowClient()
    for start in range(0, len(items), 1000):
        client.log_batch(_pipeline_run_id, metrics=items[start : start + 1000])


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if _muted:
        return
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    if _muted:
        return
    import mlflow

    mlflow.log_artifact(path, artifact_path=artifact_path)


def log_keras_model(model, name: str, example_batch) -> None:
    """Log a Keras model with the Keras flavor and a signature inferred from real inputs.

    No input example: MLflow's Keras flavor writes it before creating the model folder
    and fails (mlflow/mlflow#16183, open). The raw-image pyfunc model the evaluate
    stage logs carries one.
    """
    if _muted:
        return
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
