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
import yaml

from pipeline_helpers import STAGES, TINY_PARAMS, copy_repo, declared_outputs, dvc, edit_params, stages_run

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
    artifacts = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
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
        by_stage.setdefault(run.data.tags["tlpipe.stage"], []).append(run)
    assert sorted(by_stage) == sorted(STAGES)
    assert all(len(v) == 1 for v in by_stage.values())
    assert by_stage["train-frozen"][0].data.params["train_frozen.epochs"] == "2"
    assert "accuracy" in by_stage["evaluate"][0].data.metrics
    history = client.get_metric_history(by_stage["train-frozen"][0].info.run_id, "frozen.val_loss")
    assert len(history) >= 1
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    sources = {m.source_run_id for m in models}
    for stage in ("train-frozen", "fine-tune"):
        assert by_stage[stage][0].info.run_id in sources


def test_second_repro_runs_nothing(pipeline):
    repo, _ = pipeline
    proc = dvc(repo, "repro")
    assert stages_run(proc) == []
    assert "Data and pipelines are up to date" in proc.stdout


def test_changing_fine_tune_params_reruns_only_what_follows(pipeline):
    repo, _ = pipeline
    edit_params(repo, {"fine_tune": {"learning_rate": 5e-5}})
    assert stages_run(dvc(repo, "repro")) == ["fine-tune", "evaluate", "report"]


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
