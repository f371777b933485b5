"""End to end: the real ``dvc repro`` in a temporary copy of the repository.

The copy runs on a tiny config (32 px images, one or two epochs) with MLflow's
default in-repo store, exactly as a user's clone would.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench_repo import copy_repo
from pipeline_helpers import (
    STAGES,
    TINY_PARAMS,
    declared_outputs,
    dvc,
    edit_params,
    load_dvc_yaml,
    stages_run,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    repo = tmp_path_factory.mktemp("repo")
    copy_repo(repo)
    edit_params(repo, TINY_PARAMS)
    return repo, dvc(repo, "repro")


def test_full_repro_runs_every_stage_in_order(pipeline):
    _, proc = pipeline
    assert stages_run(proc) == STAGES


def test_every_declared_output_exists(pipeline):
    repo, _ = pipeline
    outputs = declared_outputs(repo)
    assert len(outputs) >= 12
    missing = [p for p in outputs if not (repo / p).exists()]
    assert not missing
    for directory in ("data/raw", "data/split", "data/augmented"):
        assert (repo / directory / "manifest.csv").stat().st_size > 0
    artifacts = load_dvc_yaml(repo)["artifacts"]
    assert all((repo / a["path"]).is_file() for a in artifacts.values())


def test_metrics_file_holds_the_evaluation(pipeline):
    repo, _ = pipeline
    metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
    assert metrics["n_test"] == 8  # 25% of 4 classes x 8 images
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_class"]) == {"circle", "cross", "square", "triangle"}
    assert sum(map(sum, metrics["confusion_matrix"])) == 8
    html = (repo / "results/report/report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html


def test_mlflow_holds_one_run_per_stage_and_both_models(pipeline):
    import mlflow

    repo, _ = pipeline
    assert (repo / "mlflow.db").is_file(), "default store must be inside the repository"
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tlpipe")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("tlpipe.stage", "(pipeline)"), []).append(run)
    assert sorted(by_stage) == sorted([*STAGES, "(pipeline)"])
    assert all(len(v) == 1 for v in by_stage.values())
    assert by_stage["train-frozen"][0].data.params["train_frozen.epochs"] == "2"
    assert "accuracy" in by_stage["evaluate"][0].data.metrics
    history = client.get_metric_history(by_stage["train-frozen"][0].info.run_id, "frozen.val_loss")
    assert len(history) >= 1
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    sources = {m.source_run_id for m in models}
    for stage in ("train-frozen", "fine-tune"):
        assert by_stage[stage][0].info.run_id in sources
    # the final model: Keras flavor with a signature; the raw-image pyfunc with an input example too
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    for stage, example in (("fine-tune", False), ("evaluate", True)):
        (model,) = [m for m in models if m.source_run_id == by_stage[stage][0].info.run_id]
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert info.signature is not None and (info.saved_input_example_info is not None) == example, stage


def _client(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("tlpipe").experiment_id


def _executions(repo: Path) -> list:
    """Pipeline runs, oldest first, each with its stage runs."""
    client, experiment = _client(repo)
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("tlpipe.role") == "pipeline"]
    return [
        (
            p,
            {
                r.data.tags["tlpipe.stage"]: r
                for r in runs
                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
            },
        )
        for p in parents
    ]


def test_one_repro_is_one_pipeline_run_tagged_with_its_commit(pipeline):
    repo, _ = pipeline
    ((parent, children),) = _executions(repo)
    assert sorted(children) == sorted(STAGES)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert parent.data.tags["tlpipe.git_commit"] == head
    assert parent.data.tags["tlpipe.git_dirty"] == "true"  # params.yaml was edited after the commit
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train_frozen.epochs"] == "2" and "accuracy" in parent.data.metrics
    for stage, run in children.items():
        assert run.data.tags["tlpipe.git_commit"] == head
        assert {"tlpipe.params_digest", "tlpipe.data_digest"} <= set(run.data.tags), stage
    # each stage's inputs link to the runs that wrote them
    assert (
        children["fine-tune"].data.tags["tlpipe.input_run.models/frozen.keras"]
        == children["train-frozen"].info.run_id
    )
    assert children["split"].data.tags["tlpipe.input_run.data/raw"] == children["download"].info.run_id
    (dataset,) = children["train-frozen"].inputs.dataset_inputs
    assert dataset.dataset.name == "data/augmented" and len(dataset.dataset.digest) == 32
    assert any(t.key == "mlflow.data.context" and t.value == "training" for t in dataset.tags)


def test_second_repro_runs_nothing(pipeline):
    repo, _ = pipeline
    proc = dvc(repo, "repro")
    assert stages_run(proc) == []
    assert "Data and pipelines are up to date" in proc.stdout


def test_changing_fine_tune_params_reruns_only_what_follows(pipeline):
    repo, _ = pipeline
    edit_params(repo, {"fine_tune": {"learning_rate": 5e-5}})
    assert stages_run(dvc(repo, "repro")) == ["fine-tune", "evaluate", "report"]
    (_, first_children), (parent, children) = _executions(repo)
    assert sorted(children) == ["evaluate", "fine-tune", "report"]
    # the stages DVC skipped point at the runs of the first execution that produced their outputs
    for stage in ("augment", "train-frozen", "split", "download"):
        assert parent.data.tags[f"tlpipe.cached.{stage}"] == first_children[stage].info.run_id


def test_changing_augment_params_reruns_augment_onward(pipeline):
    repo, _ = pipeline
    edit_params(repo, {"augment": {"seed": 7}})
    assert stages_run(dvc(repo, "repro")) == STAGES[2:]


def test_metrics_and_plots_commands_work(pipeline, tmp_path):
    repo, _ = pipeline
    shown = dvc(repo, "metrics", "show", "--json")
    metrics = json.loads(shown.stdout)
    assert "accuracy" in json.dumps(metrics)
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    shown_plots = set(re.findall(r"vegaEmbed\('#([^']+)'", page))
    expected = {"results_train_frozen_history_csv", "results_fine_tune_history_csv",
                "results_evaluate_confusion_csv", "results_evaluate_roc_circle_csv"}  # fmt: skip
    assert expected <= shown_plots
