"""A queued DVC experiment sweep run two at a time: every experiment completes, alone.

The baseline pipeline is run and committed in a temporary copy of the repository; three
experiments on ``fine_tune.learning_rate`` are queued (``dvc exp run --queue -S``) and run with
``dvc queue start -j 2``. Each runs in its own temporary workspace (DVC's), so the training caches
and checkpoints are its own; the MLflow store they log to is the repository's (the default store,
no MLFLOW_TRACKING_URI), one pipeline run per experiment.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_repo import copy_repo
from pipeline_helpers import TINY_PARAMS, dvc_env, edit_params

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@tlpipe.invalid"]
RATES = {"lr-small": 0.0001, "lr-mid": 0.001, "lr-big": 0.003}  # none the baseline's (0.0003)
QUEUE_TIMEOUT_S = 900


def run_dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(), capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


STATES = {"Queued", "Running", "Success", "Failed"}


def queue_states(repo: Path) -> dict[str, str]:
    """Experiment name -> state, from `dvc queue status` (Task, Name, Created (1 or 2 words), Status)."""
    states = {}
    for line in run_dvc(repo, "queue", "status").stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in STATES:
            states[parts[1]] = parts[-1]
    return states


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    repo = tmp_path_factory.mktemp("sweep") / "repo"
    repo.mkdir()
    copy_repo(repo)
    edit_params(repo, TINY_PARAMS)
    run_dvc(repo, "repro")
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "baseline"], cwd=repo, check=True)
    for name, rate in RATES.items():
        run_dvc(repo, "exp", "run", "--queue", "--name", name, "-S", f"fine_tune.learning_rate={rate}")
    start = time.perf_counter()
    # the workers it starts outlive it and would hold a captured stdout open: no pipes
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo, env=dvc_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)  # fmt: skip
    while True:
        states = queue_states(repo)
        if states and all(s not in ("Queued", "Running") for s in states.values()):
            break
        assert time.perf_counter() - start < QUEUE_TIMEOUT_S, f"sweep still running: {states}"
        time.sleep(5)
    run_dvc(repo, "queue", "stop")  # the idle workers
    show = json.loads(run_dvc(repo, "exp", "show", "--json").stdout)
    return {"repo": repo, "states": states, "show": show, "seconds": time.perf_counter() - start}


def experiments(show: list[dict]) -> dict[str, dict]:
    """Each experiment's name -> its params and metrics, from `dvc exp show --json`."""
    found = {}
    for commit in show:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                found[rev.get("name") or exp.get("name")] = data
    return found


@pytest.mark.e2e
def test_every_queued_experiment_completes(swept):
    assert set(swept["states"]) == set(RATES), swept["states"]
    assert set(swept["states"].values()) == {"Success"}, swept["states"]


@pytest.mark.e2e
def test_exp_show_lists_each_experiments_rate_and_test_metrics(swept):
    found = experiments(swept["show"])
    assert set(RATES) <= set(found)
    for name, rate in RATES.items():
        params = found[name]["params"]["params.yaml"]["data"]
        assert params["fine_tune"]["learning_rate"] == rate
        metrics = found[name]["metrics"]["results/evaluate/metrics.json"]["data"]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "roc_auc" in metrics


@pytest.mark.e2e
def test_each_experiment_is_one_pipeline_run_in_the_repositorys_store(swept):
    import mlflow

    repo = swept["repo"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tlpipe")
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(repo / "mlruns")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    pipelines = [r for r in runs if r.data.tags.get("tlpipe.role") == "pipeline"]
    by_exp = {r.data.tags.get("tlpipe.dvc_experiment"): r for r in pipelines}
    assert set(RATES) <= set(by_exp), by_exp.keys()
    for name in RATES:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_exp[name].info.run_id]
        # only what the rate changes reruns; the baseline's cached stages are found, not rerun
        assert {r.data.tags.get("tlpipe.stage") for r in children} == {"fine-tune", "evaluate", "report"}
        fine_tune = [r for r in children if r.data.tags.get("tlpipe.stage") == "fine-tune"]
        assert [float(r.data.params["fine_tune.learning_rate"]) for r in fine_tune] == [RATES[name]]
    # two at a time: some two experiments' pipeline runs overlap in time
    spans = sorted((by_exp[n].info.start_time, by_exp[n].info.end_time) for n in RATES)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
    # nothing the experiments logged points into their temporary workspaces, removed after the sweep
    for run in runs:
        assert ".dvc/tmp/exps" not in run.info.artifact_uri
