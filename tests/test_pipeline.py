"""End to end: the real ``dvc repro`` in a temporary copy of the repository.

The copy runs on a tiny config (32 px images, one or two epochs) with MLflow's
default in-repo store, exactly as a user's clone would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["download", "split", "augment", "train-frozen", "fine-tune", "evaluate", "report"]

TINY_PARAMS = {
    "data": {"demo": {"images_per_class": 8, "image_size": 32}},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"image_size": 32, "copies": 1},
    "train_frozen": {"epochs": 2, "batch_size": 16, "patience": 1},
    "fine_tune": {"epochs": 1, "batch_size": 16, "unfreeze_blocks": 1},
}

pytestmark = pytest.mark.e2e


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _edit_params(repo: Path, override: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), override), sort_keys=False))


def _copy_repo(dest: Path) -> None:
    """The files a fresh clone would have (tracked and new, not ignored), as in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=tlpipe-tests", "-c", "user.email=tests@tlpipe.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def stages_run(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    repo = tmp_path_factory.mktemp("repo")
    _copy_repo(repo)
    _edit_params(repo, TINY_PARAMS)
    return repo, dvc(repo, "repro")


def declared_outputs(repo: Path) -> list[str]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = []
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


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
    _edit_params(repo, {"fine_tune": {"learning_rate": 5e-5}})
    assert stages_run(dvc(repo, "repro")) == ["fine-tune", "evaluate", "report"]


def test_changing_augment_params_reruns_augment_onward(pipeline):
    repo, _ = pipeline
    _edit_params(repo, {"augment": {"seed": 7}})
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
