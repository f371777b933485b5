"""Scheduled retraining: the workflows, ``tlpipe retrain``'s parts, and the job end to end.

The end-to-end test runs ``python -m tlpipe retrain`` twice in a temporary copy of the
repository, against a directory DVC remote and a sqlite MLflow store under tmp_path:
a first run that becomes champion, then a deliberately worse one the gate refuses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench_repo import copy_repo
from pipeline_helpers import REPO, TINY_PARAMS, dvc, dvc_env, edit_params
from tlpipe.core.errors import PipelineError
from tlpipe.ops import retrain

WORKFLOWS = REPO / ".github" / "workflows"
# the tiny config learns nothing at 32 px from 16 training images (test ROC-AUC 0.5): a champion
# worth defending needs a little more (ROC-AUC about 0.9, about 80 s on 2 cores)
LEARNING_PARAMS = {
    "data": {"demo": {"images_per_class": 24, "image_size": 48}},
    "augment": {"image_size": 48},
    "train_frozen": {"epochs": 30, "learning_rate": 0.01, "patience": 5},
}
# learning rates too small to move any weight in one epoch: the head stays at its random start
WORSE_PARAMS = {
    "train_frozen": {"learning_rate": 1e-7, "epochs": 1},
    "fine_tune": {"learning_rate": 1e-7, "epochs": 1},
}


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(spec: dict) -> dict:
    return spec[True]  # YAML 1.1 reads the key `on` as a boolean


def steps(spec: dict) -> list[dict]:
    return [step for job in spec["jobs"].values() for step in job["steps"]]


def action_major(step: dict) -> tuple[str, int]:
    name, _, ref = step["uses"].partition("@")
    return name, int(ref.lstrip("v").split(".")[0])


# ------------------------------------------------------------------ workflows


def test_ci_workflow_runs_the_test_entry_point_on_push_and_pull_requests():
    spec = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(triggers(spec))
    runs = [s["run"] for s in steps(spec) if "run" in s]
    assert any("bash .ci/run" in r for r in runs)
    python = [s for s in steps(spec) if s.get("uses", "").startswith("actions/setup-python@")]
    assert python and str(python[0]["with"]["python-version"]) == "3.11"


def test_retrain_workflow_is_scheduled_and_dispatchable_and_never_overlaps():
    spec = workflow("retrain.yml")
    on = triggers(spec)
    assert "workflow_dispatch" in on
    cron = on["schedule"][0]["cron"]
    assert len(cron.split()) == 5
    assert spec["concurrency"]["cancel-in-progress"] is False
    assert spec["permissions"] == {"contents": "read"}


def test_retrain_workflow_calls_the_script_and_uploads_the_report_even_on_failure():
    spec = workflow("retrain.yml")
    all_steps = steps(spec)
    runs = [s["run"] for s in all_steps if "run" in s]
    assert any(r.strip() == "make retrain" for r in runs)
    uploads = [s for s in all_steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(uploads) == 1
    assert "results/report" in uploads[0]["with"]["path"]
    assert "always()" in uploads[0]["if"]
    # the MLflow store is configured from the repository's settings, not hard-coded
    assert "vars.MLFLOW_TRACKING_URI" in spec["jobs"]["retrain"]["env"]["MLFLOW_TRACKING_URI"]
    retrain_index = next(i for i, s in enumerate(all_steps) if s.get("run", "").strip() == "make retrain")
    assert all_steps.index(uploads[0]) > retrain_index


def test_makefile_retrain_target_runs_the_retrain_command():
    makefile = (REPO / "Makefile").read_text()
    target = re.search(r"^retrain:(.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert target, "no retrain target"
    assert "$(STAMP)" in target.group(1)
    assert "tlpipe retrain $(RETRAIN_ARGS)" in target.group(2)


@pytest.mark.parametrize("name", ["ci.yml", "retrain.yml"])
def test_workflows_use_current_action_versions(name):
    minimum = {"actions/checkout": 4, "actions/setup-python": 5, "actions/upload-artifact": 4}
    used = [action_major(s) for s in steps(workflow(name)) if "uses" in s]
    assert used
    for action, major in used:
        assert major >= minimum.get(action, 1), f"{action}@v{major}"


REMOTE_SCRIPT = ".github/scripts/configure-dvc-remote.sh"


@pytest.mark.parametrize("name", ["retrain.yml", "pr-report.yml"])
def test_workflows_configure_the_dvc_remote_with_the_one_script(name):
    runs = "\n".join(s.get("run", "") for s in steps(workflow(name)))
    assert f"bash {REMOTE_SCRIPT}" in runs
    assert "dvc remote add" not in runs  # not a second copy of what the script does


def test_remote_script_without_a_url_says_which_variable_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT_URL")}
    proc = subprocess.run(
        ["bash", str(REPO / REMOTE_SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "DVC_REMOTE_URL" in proc.stdout + proc.stderr
    assert not (tmp_path / ".dvc").exists()


def test_remote_script_makes_a_local_url_the_default_remote_outside_git(tmp_path):
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    remote = tmp_path.parent / f"{tmp_path.name}-store"
    env = dict(os.environ, DVC_REMOTE_URL=str(remote), VENV_BIN=str(Path(sys.executable).parent))
    env.pop("DVC_REMOTE_ENDPOINT_URL", None)
    subprocess.run(["bash", str(REPO / REMOTE_SCRIPT)], cwd=tmp_path, env=env, check=True)
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "remote = storage" in local and str(remote) in local
    assert "storage" not in (tmp_path / ".dvc" / "config").read_text()


# ------------------------------------------------------------------ the script's parts


def test_steps_pull_repro_promote_push_in_order_with_the_remote():
    names = [s.name for s in retrain.retrain_steps("store")]
    assert [n.split(" (")[0] for n in names] == ["dvc pull", "dvc repro", "promotion gate", "dvc push"]
    pull, _, gate, push = retrain.retrain_steps("store")
    assert pull.argv[:3] == [sys.executable, "-m", "dvc"]
    assert pull.argv[3:] == ["pull", "--allow-missing", "--remote", "store"]
    assert push.argv[3:] == ["push", "--remote", "store"]
    assert gate.argv[1:5] == ["-m", "tlpipe", "promote", "--out"]


def test_no_remote_skips_pull_and_push_only():
    pull, repro, gate, push = retrain.retrain_steps(None)
    assert pull.argv is None and push.argv is None
    assert repro.argv is not None and gate.argv is not None


def test_execution_id_prefers_the_callers_then_the_github_run():
    assert retrain.execution_id({"TLPIPE_EXECUTION_ID": "mine", "GITHUB_RUN_ID": "7"}) == "mine"
    assert retrain.execution_id({"GITHUB_RUN_ID": "7", "GITHUB_RUN_ATTEMPT": "2"}) == "github-7-2"
    fresh = {retrain.execution_id({}) for _ in range(2)}
    assert len(fresh) == 2


def test_child_environment_puts_this_interpreter_first_and_sets_the_execution():
    env = retrain.child_environment({"PATH": "/usr/bin"}, "run-1")
    assert env["TLPIPE_EXECUTION_ID"] == "run-1"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_a_failed_step_names_itself_its_exit_code_and_last_lines(tmp_path):
    code = "import sys; print('\\n'.join(f'line {i}' for i in range(30))); sys.exit(3)"
    step = retrain.Step("dvc repro", [sys.executable, "-c", code])
    with pytest.raises(PipelineError) as err:
        retrain.run_step(step, 2, 5, tmp_path, {"PATH": "/usr/bin"})
    message = str(err.value)
    assert message.startswith("step 2/5 (dvc repro) failed")
    assert "exited with 3" in message
    assert "line 29" in message and "line 0\n" not in message  # the tail only


def write_results(repo: Path, decision: dict) -> None:
    metrics = {
        "accuracy": 0.875,
        "roc_auc": 0.9375,
        "log_loss": 0.41,
        "n_test": 8,
        "ci": {"accuracy": {"low": 0.5, "high": 1.0}, "roc_auc": None},
        "ci_level": 0.95,
        "per_class": {"a": {"f1": 0.5}},
    }
    (repo / "results/evaluate").mkdir(parents=True)
    (repo / "results/evaluate/metrics.json").write_text(json.dumps(metrics))
    (repo / "results/promotion.json").write_text(json.dumps(decision))


def test_summary_holds_metrics_the_decision_with_both_figures_and_the_report(tmp_path):
    decision = {
        "decision": "refused",
        "model_name": "clf",
        "metric": "log_loss",
        "higher_is_better": False,
        "margin": 0.01,
        "challenger": {"version": 3, "value": 0.41},
        "champion": {"version": 2, "value": 0.2},
        "reason": "challenger log_loss 0.4100 does not beat champion 0.2000",
    }
    write_results(tmp_path, decision)
    summary = retrain.summary_markdown(tmp_path, {"TLPIPE_EXECUTION_ID": "x1"})
    assert "| accuracy | 0.8750 | [0.5000, 1.0000] |" in summary
    assert "| roc_auc | 0.9375 | - |" in summary
    assert "| log_loss | 0.4100 | - |" in summary  # the promotion metric, though not a headline one
    assert "| test images | 8 | |" in summary
    assert "**refused**" in summary and "lower is better" in summary
    assert "| challenger (this run) | 3 | 0.4100 |" in summary
    assert "| champion before this run | 2 | 0.2000 |" in summary
    assert "No report" in summary  # no report.html here


def test_first_decision_shows_no_previous_champion(tmp_path):
    decision = {"decision": "promoted", "metric": "roc_auc", "challenger": {"version": 1, "value": 0.9}}
    write_results(tmp_path, {**decision, "champion": None})
    (tmp_path / "results/report").mkdir()
    (tmp_path / "results/report/report.html").write_text("<html></html>")
    summary = retrain.summary_markdown(tmp_path, {"TLPIPE_EXECUTION_ID": "x1"})
    assert "| champion before this run | none | - |" in summary
    assert "`results/report/report.html`" in summary


# ------------------------------------------------------------------ the command


def retrain_env(tmp_path: Path, summary: Path) -> dict[str, str]:
    env = dvc_env()
    # a CI runner's own ids would group the test's runs with the CI job's
    for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_ACTIONS", "TLPIPE_EXECUTION_ID"):
        env.pop(name, None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    return env


def run_retrain(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlpipe", "retrain", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def bare_dvc_repo(path: Path) -> Path:
    path.mkdir()
    dvc(path, "init", "--no-scm", "-q")
    return path


def test_without_a_remote_it_fails_before_any_stage_and_says_how_to_add_one(tmp_path):
    repo = bare_dvc_repo(tmp_path / "repo")
    proc = run_retrain(repo, retrain_env(tmp_path, tmp_path / "summary.md"))
    assert proc.returncode == 1
    assert "tlpipe retrain: error: no DVC remote is configured" in proc.stderr
    assert "dvc remote add -d" in proc.stderr and "--no-remote" in proc.stderr
    assert "retrain [1/" not in proc.stdout  # stopped before the first step


def test_an_unknown_remote_is_named(tmp_path):
    repo = bare_dvc_repo(tmp_path / "repo")
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    proc = run_retrain(repo, retrain_env(tmp_path, tmp_path / "summary.md"), "--remote", "elsewhere")
    assert proc.returncode == 1
    assert "DVC remote 'elsewhere' is not configured (configured: store)" in proc.stderr


def test_remotes_without_a_default_need_one_named(tmp_path):
    repo = bare_dvc_repo(tmp_path / "repo")
    dvc(repo, "remote", "add", "store", str(tmp_path / "remote"))
    proc = run_retrain(repo, retrain_env(tmp_path, tmp_path / "summary.md"))
    assert proc.returncode == 1
    assert "no default DVC remote among store: pass --remote NAME" in proc.stderr


def test_a_failing_step_stops_the_job_and_the_summary_says_so(tmp_path):
    repo = bare_dvc_repo(tmp_path / "repo")  # no dvc.yaml: the pull succeeds, dvc repro fails
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    summary = tmp_path / "summary.md"
    proc = run_retrain(repo, retrain_env(tmp_path, summary))
    assert proc.returncode == 1
    assert "retrain [1/5] dvc pull (remote store)" in proc.stdout
    assert "retrain [3/5]" not in proc.stdout
    error = proc.stderr.strip().splitlines()
    assert error[0].startswith("tlpipe retrain: error: step 2/5 (dvc repro) failed: `")
    assert re.search(r"exited with [1-9]\d*; its last lines:$", error[0])
    assert any("dvc.yaml" in line for line in error[1:])  # dvc's own complaint, quoted
    assert summary.read_text().startswith("## tlpipe retraining failed")


# ------------------------------------------------------------------ end to end


def remote_holds(remote: Path, md5: str) -> bool:
    return (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def locked_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return out["md5"]
    raise AssertionError(f"{path} not in dvc.lock")


def execution_of(summary: str) -> str:
    return re.findall(r"Execution `([^`]+)`", summary)[-1]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """Two retrains in one copy: the tiny config, then a worse model (only training reruns)."""
    tmp = tmp_path_factory.mktemp("retrain")
    repo, remote, summary = tmp / "repo", tmp / "remote", tmp / "summary.md"
    repo.mkdir()
    copy_repo(repo)
    edit_params(repo, TINY_PARAMS)
    edit_params(repo, LEARNING_PARAMS)
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    env = retrain_env(tmp, summary)
    first = run_retrain(repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    after_first = {
        "decision": json.loads((repo / "results/promotion.json").read_text()),
        "summary": summary.read_text(),
        "model_md5": locked_md5(repo, "models/model.keras"),
    }
    edit_params(repo, WORSE_PARAMS)
    second = run_retrain(repo, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {
        "repo": repo,
        "remote": remote,
        "uri": env["MLFLOW_TRACKING_URI"],
        "first": first,
        "second": second,
        "after_first": after_first,
        "decision": json.loads((repo / "results/promotion.json").read_text()),
        "summary": summary.read_text(),
    }


def client_for(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


@pytest.mark.e2e
def test_first_retrain_pushes_to_the_remote_and_promotes_version_1(retrained):
    first, decision = retrained["first"], retrained["after_first"]["decision"]
    progress = re.findall(
        r"^retrain \[(\d)/5\] (dvc pull|dvc repro|promotion gate|dvc push|summary)",
        first.stdout,
        re.MULTILINE,
    )
    assert [name for _, name in progress] == [
        "dvc pull",
        "dvc repro",
        "promotion gate",
        "dvc push",
        "summary",
    ]
    assert remote_holds(retrained["remote"], retrained["after_first"]["model_md5"])
    assert decision["decision"] == "promoted"
    assert decision["challenger"]["version"] == 1 and decision["champion"] is None


@pytest.mark.e2e
def test_first_summary_holds_the_metrics_and_the_decision(retrained):
    summary = retrained["after_first"]["summary"]
    value = retrained["after_first"]["decision"]["challenger"]["value"]
    assert "### Test metrics" in summary and "| accuracy |" in summary
    assert "**promoted**" in summary
    assert f"| challenger (this run) | 1 | {value:.4f} |" in summary
    assert "`results/report/report.html`" in summary
    assert summary in retrained["first"].stdout  # stdout too


@pytest.mark.e2e
def test_the_stages_and_the_gate_share_one_pipeline_run(retrained):
    client = client_for(retrained["uri"])
    execution = execution_of(retrained["after_first"]["summary"])
    experiment = client.get_experiment_by_name("tlpipe")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`tlpipe.execution` = '{execution}'"
    )
    parents = [r for r in runs if r.data.tags.get("tlpipe.role") == "pipeline"]
    assert len(parents) == 1
    children = {
        r.data.tags.get("tlpipe.stage")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert {"download", "evaluate", "promote"} <= children


@pytest.mark.e2e
def test_a_worse_model_is_refused_and_the_champion_stays(retrained):
    decision = retrained["decision"]
    assert decision["decision"] == "refused"
    assert decision["challenger"]["version"] == 2 and decision["champion"]["version"] == 1
    # the premise: the second model really is worse on the gate's metric, by more than the noise
    # of 24 test images (measured: ROC-AUC 0.90 against 0.47)
    assert decision["challenger"]["value"] < decision["champion"]["value"] - 0.1
    client = client_for(retrained["uri"])
    name = decision["model_name"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2


@pytest.mark.e2e
def test_second_retrain_reruns_only_training_and_pushes_the_new_model(retrained):
    ran = re.findall(r"Running stage '([^']+)'", retrained["second"].stdout)
    assert ran == ["train-frozen", "fine-tune", "evaluate", "report"]
    model_md5 = locked_md5(retrained["repo"], "models/model.keras")
    assert model_md5 != retrained["after_first"]["model_md5"]
    assert remote_holds(retrained["remote"], model_md5)
    summary = retrained["summary"]
    assert summary.startswith(retrained["after_first"]["summary"])  # appended, as GitHub expects
    assert "**refused**" in summary[len(retrained["after_first"]["summary"]) :]
    assert execution_of(summary) != execution_of(retrained["after_first"]["summary"])
