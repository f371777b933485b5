"""Tests for MLflow bookkeeping: the reachability check, and lineage across the runs of one execution."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import mlflow
import pytest

from tlpipe.core import lineage, tracking
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import json_digest, path_digest


def test_local_stores_need_no_server() -> None:
    tracking.check_reachable("sqlite:///mlflow.db")
    tracking.check_reachable("file:///tmp/mlruns")


def test_unreachable_server_is_named_with_what_to_do() -> None:
    with pytest.raises(PipelineError) as err:
        tracking.check_reachable("http://127.0.0.1:9", timeout=2)
    message = str(err.value)
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in message
    assert "--host 127.0.0.1" in message and "MLFLOW_TRACKING_URI" in message


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # the http.server API names it
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_answers_health_passes() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()


# ------------------------------------------------------------------ lineage


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/venv/bin/python3.11", "/venv/bin/dvc", "repro"], True),
        (["python", "-m", "dvc", "repro", "--force"], True),
        (["dvc", "exp", "run"], True),
        (["/venv/bin/dvc", "exp", "exec-run", "--infofile", "x.run"], True),  # a `dvc queue start` worker's
        (["dvc", "status"], False),
        (["dvc", "exp", "show"], False),
        (["python", "stages/split.py", "--raw", "data/raw"], False),
        (["bash", "-c", "cd dvc && make repro"], False),
        ([], False),
    ],
)
def test_is_dvc_execution(cmdline, expected) -> None:
    assert lineage.is_dvc_execution(cmdline) is expected


def test_the_default_store_is_the_repositorys_even_from_a_queued_experiments_workspace(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo, workspace = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_ROOT", str(repo))  # dvc repro: the stage runs in the repository
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.chdir(workspace)  # a queued experiment: DVC_ROOT is the repository it was queued in
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert tracking._experiment_artifacts() == (repo.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking._experiment_artifacts() is None  # the server decides


def test_stages_under_one_dvc_process_share_its_execution_id(tmp_path) -> None:
    # a stand-in `dvc` that starts two "stages", each printing the execution id it finds
    stage = "from tlpipe.core.lineage import dvc_ancestor; print(dvc_ancestor())"
    fake = tmp_path / "dvc"
    fake.write_text(
        "import subprocess, sys\n"
        f"for _ in range(2): subprocess.run([sys.executable, '-c', {stage!r}], check=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(tracking.__file__).parents[2])}
    first = subprocess.run(
        [sys.executable, str(fake), "repro"], env=env, capture_output=True, text=True, check=False
    )
    second = subprocess.run(
        [sys.executable, str(fake), "repro"], env=env, capture_output=True, text=True, check=False
    )
    ids = first.stdout.split() + second.stdout.split()
    assert len(ids) == 4 and all(i.startswith("dvc-") for i in ids), first.stderr
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
    # not under dvc: nothing to group by
    alone = subprocess.run(
        [sys.executable, "-c", stage], env=env, capture_output=True, text=True, check=False
    )
    assert alone.stdout.strip() == "None"


def _run_stage(stage: str, inputs: list[Path], outputs: list[Path], write: dict[Path, str]):
    tracking.set_stage_context(tracking.StageContext(params={"x.a": 1}, inputs=inputs, outputs=outputs))
    try:
        with tracking.stage_run(stage, {f"{stage}.p": 1}) as run:
            for path, text in write.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        return mlflow.get_run(run.info.run_id)
    finally:
        tracking.set_stage_context(tracking.StageContext())


def _pipeline_runs(execution: str):
    return mlflow.search_runs(
        filter_string=f"tags.`tlpipe.execution` = '{execution}' and tags.`tlpipe.role` = 'pipeline'",
        output_format="list",
    )


def test_one_execution_is_one_pipeline_run_with_a_child_per_stage(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw, split = Path("data/raw"), Path("data/split")
    monkeypatch.setenv(lineage.EXECUTION_ENV, f"exec-{uuid.uuid4()}")
    first = _run_stage("download", [], [raw], {raw / "manifest.csv": "path,label\na.png,cat\n"})
    second = _run_stage("split", [raw], [split], {split / "manifest.csv": "path,label,split\n"})

    (parent,) = _pipeline_runs(os.environ[lineage.EXECUTION_ENV])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["x.a"] == "1"  # every param, to compare executions side by side
    for child in (first, second):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    assert second.data.tags["tlpipe.stage"] == "split"
    assert second.data.tags["tlpipe.params_digest"] == json_digest({"split.p": 1})
    raw_digest = path_digest(raw)
    assert (
        second.data.tags["tlpipe.input.data/raw"] == raw_digest == first.data.tags["tlpipe.output.data/raw"]
    )
    assert second.data.tags["tlpipe.data_digest"] == json_digest({"data/raw": raw_digest})
    assert second.data.tags["tlpipe.input_run.data/raw"] == first.info.run_id
    assert not any(k.startswith("tlpipe.cached.") for k in parent.data.tags)  # nothing came from a cache

    # the dataset input: name, digest and source of the manifest folder
    (dataset_input,) = second.inputs.dataset_inputs
    assert dataset_input.dataset.name == "data/raw"
    assert dataset_input.dataset.digest == raw_digest[:32]
    assert (tmp_path / "data/raw").as_uri() in dataset_input.dataset.source

    # a second execution in which DVC skipped download: split links to the cached download run
    monkeypatch.setenv(lineage.EXECUTION_ENV, f"exec-{uuid.uuid4()}")
    again = _run_stage("split", [raw], [split], {split / "manifest.csv": "path,label,split\n"})
    (parent2,) = _pipeline_runs(os.environ[lineage.EXECUTION_ENV])
    assert parent2.info.run_id != parent.info.run_id
    assert again.data.tags["tlpipe.input_run.data/raw"] == first.info.run_id
    assert parent2.data.tags["tlpipe.cached.download"] == first.info.run_id


def test_git_state_tags_commit_and_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert lineage.git_state() == {}  # not a git work tree: no tags, no error
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(["git", "init", "-q"], check=True)
    Path("params.yaml").write_text("a: 1\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert lineage.git_state() == {"tlpipe.git_commit": head, "tlpipe.git_dirty": "false"}
    Path("params.yaml").write_text("a: 2\n")
    assert lineage.git_state()["tlpipe.git_dirty"] == "true"


def test_a_failing_stage_marks_the_pipeline_run_failed(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(lineage.EXECUTION_ENV, f"exec-{uuid.uuid4()}")
    with pytest.raises(RuntimeError), tracking.stage_run("train-frozen", {}):
        raise RuntimeError("boom")
    (parent,) = _pipeline_runs(os.environ[lineage.EXECUTION_ENV])
    assert parent.info.status == "FAILED"


def test_pipeline_metrics_land_on_the_pipeline_run(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(lineage.EXECUTION_ENV, f"exec-{uuid.uuid4()}")
    with tracking.stage_run("evaluate", {}):
        tracking.log_pipeline_metrics({"accuracy": 0.75})
    (parent,) = _pipeline_runs(os.environ[lineage.EXECUTION_ENV])
    assert parent.data.metrics["accuracy"] == 0.75
