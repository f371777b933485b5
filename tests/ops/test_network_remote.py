"""The retrain job against a DVC remote reached over the network, and a second clone from it.

An S3-compatible server (moto's, tests/remote_fixtures.py) listens on 127.0.0.1; DVC talks to it
over HTTP with the ``dvc-s3`` plugin, as it would to AWS S3 or MinIO. In a temporary copy of the
repository (tiny demo params), the retrain workflow's own "Configure the DVC remote" step sets it
up from ``DVC_REMOTE_URL`` and ``DVC_REMOTE_ENDPOINT_URL``, ``tlpipe retrain`` pulls, reproduces,
gates and pushes, and the result is committed as the README says. Then a ``git clone`` of that
repository, configured by the same step, runs ``dvc pull``: ``dvc status`` must say everything is
up to date, and ``dvc repro`` must run no stage.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench_repo import copy_repo
from pipeline_helpers import REPO, STAGES, TINY_PARAMS, dvc_env, edit_params
from remote_fixtures import s3_environment, s3_server

pytestmark = pytest.mark.e2e

WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
CONFIGURE_STEP = "Configure the DVC remote"
UP_TO_DATE = "Data and pipelines are up to date."
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "tlpipe test",
    "GIT_AUTHOR_EMAIL": "test@tlpipe.invalid",
    "GIT_COMMITTER_NAME": "tlpipe test",
    "GIT_COMMITTER_EMAIL": "test@tlpipe.invalid",
}


def configure_step_script() -> str:
    """The workflow step's shell script, as written (it calls .github/scripts/configure-dvc-remote.sh).

    Its ``pip install -c constraints.txt dvc-s3`` finds the pinned version already there (make
    setup installs the test extra) and changes nothing."""
    spec = yaml.safe_load(WORKFLOW.read_text())
    steps = [s for job in spec["jobs"].values() for s in job["steps"] if s.get("name") == CONFIGURE_STEP]
    assert len(steps) == 1, f"{WORKFLOW.name} has no single step named {CONFIGURE_STEP!r}"
    return steps[0]["run"]


class Transcript:
    """Runs commands in a folder, failing on a non-zero exit, and keeps what each printed."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.lines: list[str] = []

    def run(self, where: Path, argv: list[str], shown: str, env: dict[str, str] | None = None, keep=None):
        """``keep``: a regex; only the output lines it finds go into the transcript (all by default)."""
        proc = subprocess.run(
            argv, cwd=where, env=env or self.env, capture_output=True, text=True, check=False
        )
        output = (proc.stdout + proc.stderr).rstrip()
        assert proc.returncode == 0, f"{shown} exited with {proc.returncode}:\n{output[-4000:]}"
        kept = [line for line in output.splitlines() if keep is None or re.search(keep, line)]
        self.lines += [f"$ ({where.name}) {shown}", *kept]
        return proc

    def dvc(self, where: Path, *args: str):
        return self.run(where, [sys.executable, "-m", "dvc", *args], "dvc " + " ".join(args))

    def git(self, where: Path, *args: str):
        return self.run(where, ["git", *args], "git " + " ".join(args))

    def configure_remote(self, where: Path, remote) -> subprocess.CompletedProcess:
        env = dict(self.env, DVC_REMOTE_URL=remote.url, DVC_REMOTE_ENDPOINT_URL=remote.endpoint)
        env["VENV_BIN"] = str(Path(sys.executable).parent)  # the script's tools wherever this venv lives
        # as GitHub Actions runs a step's script
        argv = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", configure_step_script()]
        return self.run(where, argv, f"(retrain.yml) {CONFIGURE_STEP}", env=env)


def locked_outputs(repo: Path) -> dict[str, str]:
    """Each cached output's path and md5 in dvc.lock: what the remote must hold."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if "md5" in out
    }


def output_times(repo: Path, paths) -> dict[str, int]:
    times = {}
    for path in paths:
        target = repo / path
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for file in files:
            times[file.relative_to(repo).as_posix()] = file.stat().st_mtime_ns
    return times


@pytest.fixture(scope="module")
def network_remote(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("network-remote")
    repo, clone = tmp / "repo", tmp / "clone"
    env = s3_environment(dvc_env(), tmp) | GIT_IDENTITY
    # a CI runner's own ids would group the test's runs with the CI job's
    for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY"):
        env.pop(name, None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    log = Transcript(env)
    with s3_server() as remote:
        repo.mkdir()
        copy_repo(repo)
        edit_params(repo, TINY_PARAMS)
        log.git(repo, "commit", "-qam", "tiny params")
        configured = log.configure_remote(repo, remote)
        retrain = log.run(
            repo,
            [sys.executable, "-m", "tlpipe", "retrain"],
            "tlpipe retrain",
            keep=r"^retrain \[|^Running stage|pushed|fetched|^\| (accuracy|roc_auc) |^### Promotion",
        )
        pushed = remote.keys()
        in_sync = log.dvc(repo, "status", "--cloud")
        # what the README asks after a retrain: commit dvc.lock (and the uncached metrics and plots)
        log.git(repo, "add", "-A")
        log.git(repo, "commit", "-qm", "retrained")
        log.git(tmp, "clone", "-q", str(repo), str(clone))
        had_model_before_pull = (clone / "models/model.keras").exists()
        log.configure_remote(clone, remote)
        pull = log.dvc(clone, "pull")
        status = log.dvc(clone, "status")
        cloud = log.dvc(clone, "status", "--cloud")
        outputs = locked_outputs(clone)
        before = output_times(clone, outputs)
        repro = log.dvc(clone, "repro")
        after = output_times(clone, outputs)
        remote_config = log.dvc(clone, "config", "--list", "--local").stdout
        print("\n".join(["", *log.lines]))  # the sequence as it ran: `pytest -s` or -rP shows it
        yield {
            "repo": repo,
            "clone": clone,
            "remote": remote,
            "configured": configured,
            "retrain": retrain,
            "pushed": pushed,
            "in_sync": in_sync,
            "had_model_before_pull": had_model_before_pull,
            "pull": pull,
            "status": status,
            "cloud": cloud,
            "outputs": outputs,
            "times": (before, after),
            "repro": repro,
            "remote_config": remote_config,
        }


def test_the_workflow_step_makes_the_s3_server_the_default_remote_outside_git(network_remote):
    remote = network_remote["remote"]
    config = dict(line.partition("=")[::2] for line in network_remote["remote_config"].splitlines())
    assert config["core.remote"] == "storage"
    assert config["remote.storage.url"] == remote.url and remote.url.startswith("s3://")
    assert config["remote.storage.endpointurl"] == remote.endpoint
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", remote.endpoint)  # a real socket, not a mock
    # --local: .dvc/config.local, which git ignores; the committed .dvc/config names no remote
    tracked = subprocess.run(
        ["git", "ls-files", ".dvc"], cwd=network_remote["clone"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert ".dvc/config.local" not in tracked
    assert "storage" not in (network_remote["clone"] / ".dvc/config").read_text()


def test_retrain_pushes_every_cached_output_to_the_network_remote(network_remote):
    stdout = network_remote["retrain"].stdout
    assert "retrain [1/5] dvc pull (remote storage)" in stdout
    assert "retrain [4/5] dvc push (remote storage)" in stdout
    assert re.findall(r"Running stage '([^']+)'", stdout) == STAGES
    remote, outputs = network_remote["remote"], network_remote["outputs"]
    for path in ("models/model.keras", "data/augmented"):
        assert remote.holds(outputs[path]), f"{path} ({outputs[path]}) is not in {remote.url}"
    assert len(network_remote["pushed"]) > len(outputs)  # the folders' files too
    assert "Cache and remote 'storage' are in sync." in network_remote["in_sync"].stdout


def test_a_second_clone_pulls_every_output_from_the_network_remote(network_remote):
    repo, clone = network_remote["repo"], network_remote["clone"]
    assert not network_remote["had_model_before_pull"]  # git brought no model: the pull did
    assert re.search(r"\d+ files? (added|fetched)", network_remote["pull"].stdout)
    for path in ("models/model.keras", "models/decision.json", "results/report/report.html"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "Cache and remote 'storage' are in sync." in network_remote["cloud"].stdout


def test_the_clone_is_up_to_date_and_reruns_no_stage(network_remote):
    assert network_remote["status"].stdout.strip() == UP_TO_DATE
    repro = network_remote["repro"].stdout
    assert re.findall(r"Running stage '([^']+)'", repro) == []
    assert sorted(re.findall(r"Stage '([^']+)' didn't change, skipping", repro)) == sorted(STAGES)
    assert repro.rstrip().endswith(UP_TO_DATE)
    before, after = network_remote["times"]
    assert before == after and len(before) > len(network_remote["outputs"])  # no output rewritten
