"""The MLflow UI opens tlpipe's experiment on its model-training view: the experiment's kind and the links.

tests/ops/test_mlflow_server.py opens a logged link in headless Chromium against a real server.
"""

from __future__ import annotations

import logging
import uuid

import mlflow
import pytest

from tlpipe.core import tracking


@pytest.fixture
def fresh_experiment(monkeypatch, tmp_path) -> str:
    """A new experiment name, so the first stage creates it (artifacts under tmp_path, not the repo)."""
    monkeypatch.chdir(tmp_path)
    name = f"ui-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


def test_a_stage_marks_the_experiment_it_creates_as_model_training(fresh_experiment) -> None:
    with tracking.stage_run("download", {}):
        pass
    experiment = mlflow.MlflowClient().get_experiment_by_name(fresh_experiment)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.EXPERIMENT_KIND_TAG == "mlflow.experimentKind"  # the tag MLflow 3's UI reads and writes


def test_an_existing_unmarked_experiment_is_marked_and_a_chosen_kind_is_kept(fresh_experiment) -> None:
    client = mlflow.MlflowClient()
    unmarked = client.create_experiment(fresh_experiment, artifact_location="file:///tmp/unused")
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(unmarked).tags
    assert tracking.use_experiment() == unmarked
    assert client.get_experiment(unmarked).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    client.set_experiment_tag(unmarked, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice
    tracking.use_experiment()
    assert client.get_experiment(unmarked).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.parametrize(
    ("uri", "run", "expected"),
    [
        ("http://127.0.0.1:5000", None, "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"),
        ("https://mlflow.example.org/", "abc", "https://mlflow.example.org/#/experiments/7/runs/abc?workflowType=machine_learning"),
        # behind a reverse proxy under a path; credentials never reach a log
        ("https://ann:secret@example.org/mlflow", None, "https://example.org/mlflow/#/experiments/7/runs?workflowType=machine_learning"),
        ("sqlite:///mlflow.db", "abc", None),
        ("file:///tmp/mlruns", None, None),
    ],
)  # fmt: skip
def test_ui_links_open_the_model_training_view_of_a_server(uri, run, expected) -> None:
    assert tracking.ui_url("7", run, uri=uri) == expected


def test_a_stage_on_a_server_logs_its_links_and_mlflow_prints_none(monkeypatch, caplog) -> None:
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        tracking.log_ui_links("evaluate", "3", "r1")
    assert caplog.messages == [
        "MLflow run evaluate: http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning",
        "MLflow experiment (training runs): http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning",
    ]
    tracking._quiet_mlflow()
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True  # its links open the GenAI view


def test_a_local_store_logs_no_links(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        tracking.log_ui_links("evaluate", "3", "r1")
    assert caplog.messages == []
