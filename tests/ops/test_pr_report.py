"""Pull-request reports: the workflow, ``tlpipe pr-report``'s parts, and the job end to end.

The end-to-end test commits a pipeline run on ``main`` in a temporary copy of the repository,
changes one fine-tune param on a branch, and runs ``python -m tlpipe pr-report --base main``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from bench_repo import copy_repo
from pipeline_helpers import REPO, TINY_PARAMS, dvc_env, edit_params, stages_run
from tlpipe.core.errors import PipelineError
from tlpipe.ops import pr_report

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@tlpipe.invalid"]


def test_pr_workflow_runs_the_command_on_pull_requests_with_the_base_fetched():
    spec = yaml.safe_load((REPO / ".github/workflows/pr-report.yml").read_text())
    assert "pull_request" in spec[True]  # YAML 1.1 reads the key `on` as a boolean
    steps = [s for job in spec["jobs"].values() for s in job["steps"]]
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] == 0
    runs = "\n".join(s.get("run", "") for s in steps)
    assert ".venv/bin/tlpipe pr-report --no-remote" in runs and ".venv/bin/tlpipe pr-report\n" in runs
    assert spec["permissions"] == {"contents": "read"}


def test_base_is_the_callers_then_the_pull_requests_target_then_main():
    assert pr_report.base_revision("v1", {"GITHUB_BASE_REF": "dev"}) == "v1"
    assert pr_report.base_revision(None, {"GITHUB_BASE_REF": "dev"}) == "origin/dev"
    assert pr_report.base_revision(None, {}) == "main"


def test_steps_pull_with_the_remote_then_repro():
    pull, repro = pr_report.report_steps("store")
    assert pull.argv is not None and pull.argv[3:] == ["pull", "--allow-missing", "--remote", "store"]
    assert repro.argv is not None and repro.argv[3:] == ["repro"]
    skipped, _ = pr_report.report_steps(None)
    assert skipped.argv is None and "skipped" in skipped.name


def test_summary_shows_both_diffs_and_the_report_under_its_own_headings():
    summary = pr_report.summary_markdown("main", "| Path | Param |", "", "# Report\nline")
    assert "Compared with `main`." in summary
    assert "### Params changed\n\n| Path | Param |" in summary
    assert "### Metrics changed\n\nNo metric changed." in summary
    assert "#### Report\nline" in summary
    assert "is missing" in pr_report.summary_markdown("main", "", "", None)


def test_an_unknown_base_is_refused_before_anything_runs(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(base="nope", remote=None, no_remote=True, out=None)
    with pytest.raises(PipelineError, match=r"base revision 'nope' not found.*fetch-depth: 0"):
        pr_report.run(args)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """main: the tiny pipeline run and committed; a branch: fine_tune.learning_rate changed, reported."""
    tmp = tmp_path_factory.mktemp("pr")
    repo = tmp / "repo"
    repo.mkdir()
    copy_repo(repo)
    subprocess.run([*GIT, "branch", "-M", "main"], cwd=repo, check=True)
    edit_params(repo, TINY_PARAMS)
    env = {**dvc_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "main's run"], cwd=repo, check=True)
    subprocess.run([*GIT, "checkout", "-qb", "change"], cwd=repo, check=True)
    edit_params(repo, {"fine_tune": {"learning_rate": 0.05}})
    out = tmp / "summary.md"
    job_summary = tmp / "job_summary.md"
    proc = subprocess.run(
        [sys.executable, "-m", "tlpipe", "pr-report", "--base", "main", "--no-remote", "--out", str(out)],
        cwd=repo, env={**env, "GITHUB_STEP_SUMMARY": str(job_summary)}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"repo": repo, "proc": proc, "summary": out.read_text(), "job_summary": job_summary.read_text()}


@pytest.mark.e2e
def test_pr_report_reruns_only_what_the_branch_changed(reported):
    assert stages_run(reported["proc"]) == ["fine-tune", "evaluate", "report"]
    assert "pr-report [3/3] compare with main" in reported["proc"].stdout


@pytest.mark.e2e
def test_pr_report_shows_the_changed_param_and_metrics_against_the_base(reported):
    summary = reported["summary"]
    assert summary == reported["job_summary"]  # the same Markdown in the job summary
    params = summary.split("### Params changed")[1].split("###")[0]
    assert "fine_tune.learning_rate" in params and "0.0003" in params and "0.05" in params
    metrics = summary.split("### Metrics changed")[1].split("###")[0]
    # log loss moves with any change of the probabilities (accuracy may not, on 16 test images)
    assert "results/evaluate/metrics.json" in metrics and "| log_loss " in metrics, metrics
    assert "### This branch's report" in summary and "is missing" not in summary
