"""A team's shared MLflow server, for real: ``mlflow server`` on PostgreSQL, artifacts proxied.

One temporary copy of the repository works against the server as a team member's clone would
(``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT``, nothing else): ``dvc repro``, ``tlpipe promote``,
``tlpipe predict --model models:/tlpipe-classifier@champion``, then ``tlpipe retrain --no-remote``
after a training change. Runs, models and tags must land in PostgreSQL, artifacts under the
server's ``--artifacts-destination``, nothing in the clone; the link a stage logs must open the
MLflow UI on the model-training view of those runs (headless Chromium); a ``pg_dump`` must restore
them. The same server behind MLflow's basic-auth app lets users in, and only them.

The server set-up is docs/team.md's; tests/mlflow_server_fixtures.py starts it.
"""

from __future__ import annotations

import csv
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench_repo import copy_repo
from mlflow_server_fixtures import basic_auth_server, mlflow_server, postgres, require_postgres
from pipeline_helpers import STAGES, TINY_PARAMS, dvc_env, edit_params

pytestmark = pytest.mark.e2e

MODEL = "tlpipe-classifier"
CHAMPION_URI = f"models:/{MODEL}@champion"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "google-chrome", "google-chrome-stable"))), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_postgres()
    tmp = tmp_path_factory.mktemp("team-server")
    with postgres() as pg:
        # docs/team.md's command: the password in libpq's PGPASSWORD, not in the command line
        env = {"PGPASSWORD": pg.password}
        with mlflow_server(pg.uri(), tmp / "artifacts", tmp / "server.log", env=env) as srv:
            yield pg, srv


def _run(argv: list[str], repo: Path, env: dict[str, str], seconds: dict[str, float], name: str):
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, check=False)
    seconds[name] = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def team(server, tmp_path_factory):
    """The clone's commands against the server, in order; their output and wall seconds."""
    _, srv = server
    tmp = tmp_path_factory.mktemp("team-clone")
    repo = tmp / "repo"
    repo.mkdir()
    copy_repo(repo)
    edit_params(repo, TINY_PARAMS)
    env = dvc_env()  # the test process's MLflow settings stripped: the server is the only store
    for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_ACTIONS", "TLPIPE_EXECUTION_ID"):
        env.pop(name, None)
    env["MLFLOW_TRACKING_URI"] = srv.url
    env["GITHUB_STEP_SUMMARY"] = str(tmp / "summary.md")
    seconds: dict[str, float] = {}
    tlpipe = [sys.executable, "-m", "tlpipe"]

    repro = _run([sys.executable, "-m", "dvc", "repro"], repo, env, seconds, "dvc repro")
    promote = _run([*tlpipe, "promote"], repo, env, seconds, "tlpipe promote")
    decision = json.loads((repo / "results/promotion.json").read_text())
    expected = list(csv.DictReader((repo / "results/evaluate/predictions.csv").open()))
    images = [str(repo / "data/augmented" / row["path"]) for row in expected]
    _run([*tlpipe, "predict", *images, "--model", CHAMPION_URI, "--out", str(tmp / "champion.csv")],
         repo, env, seconds, "tlpipe predict")  # fmt: skip
    predicted = list(csv.DictReader((tmp / "champion.csv").open()))
    # a training change (the head's initialisation): retrain reruns train-frozen on, registers version 2
    edit_params(repo, {"train_frozen": {"seed": 7}})
    retrain = _run([*tlpipe, "retrain", "--no-remote"], repo, env, seconds, "tlpipe retrain")
    print("against the PostgreSQL-backed server:", {k: round(v, 1) for k, v in seconds.items()})
    return {
        "repo": repo,
        "repro": repro,
        "promote": promote,
        "decision": decision,
        "expected": expected,
        "predicted": predicted,
        "retrain": retrain,
        "retrain_decision": json.loads((repo / "results/promotion.json").read_text()),
        "seconds": seconds,
    }


def _experiment(srv):
    import mlflow

    client = mlflow.MlflowClient(srv.url)
    return client, client.get_experiment_by_name("tlpipe")


def test_the_pipeline_logs_every_stage_to_the_server(server, team):
    _, srv = server
    client, experiment = _experiment(srv)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("tlpipe.role") == "pipeline"]
    assert len(parents) == 2  # dvc repro's, and the retrain's
    first = {
        r.data.tags["tlpipe.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert sorted(first) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "accuracy" in first["evaluate"].data.metrics and "accuracy" in parents[0].data.metrics
    history = client.get_metric_history(first["train-frozen"].info.run_id, "frozen.val_loss")
    assert len(history) >= 1
    # lineage across processes through the server: fine-tune's input is train-frozen's output
    assert (
        first["fine-tune"].data.tags["tlpipe.input_run.models/frozen.keras"]
        == first["train-frozen"].info.run_id
    )
    # the retrain: training reran, the data stages were DVC's cached ones, and the gate joined it
    second = {
        r.data.tags["tlpipe.stage"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id
    }
    assert second == {"train-frozen", "fine-tune", "evaluate", "report", "promote"}
    assert parents[1].data.tags["tlpipe.cached.augment"] == first["augment"].info.run_id


def test_promote_registers_the_champion_on_the_server(server, team):
    _, srv = server
    client, _ = _experiment(srv)
    decision = team["decision"]
    assert decision["decision"] == "promoted" and decision["challenger"]["version"] == 1
    assert decision["champion"] is None
    retrained = team["retrain_decision"]
    assert retrained["challenger"]["version"] == 2 and retrained["champion"]["version"] == 1
    assert retrained["decision"] in ("promoted", "refused")
    assert f"**{retrained['decision']}**" in team["retrain"].stdout  # retrain's summary
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == (2 if retrained["decision"] == "promoted" else 1)
    assert int(client.get_model_version_by_alias(MODEL, "challenger").version) == 2
    version = client.get_model_version(MODEL, "1")
    assert version.tags["tlpipe.decision"] == "promoted"
    assert version.description.startswith("#")  # the model card


def test_predict_loads_the_champion_through_the_server_and_answers_as_evaluate_did(team):
    expected, predicted = team["expected"], team["predicted"]
    assert len(predicted) == len(expected) == 8
    classes = [c[2:] for c in expected[0] if c.startswith("p_")]
    for want, got in zip(expected, predicted, strict=True):
        assert got["error"] == "" and Path(got["path"]).name == Path(want["path"]).name
        assert got["predicted"] == want["predicted"]
        for name in classes:
            assert abs(float(got[f"p_{name}"]) - float(want[f"p_{name}"])) < 1e-5


def test_runs_and_models_are_in_postgresql_and_artifacts_behind_the_server(server, team):
    import psycopg

    pg, srv = server
    _, experiment = _experiment(srv)
    # artifacts proxied: clients are given mlflow-artifacts:/ URIs and upload through the server
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    with psycopg.connect(pg.uri(with_password=True)) as db:
        tables = {
            row[0]
            for row in db.execute("select tablename from pg_tables where schemaname = 'public'").fetchall()
        }
        assert {"runs", "experiments", "registered_models", "model_versions", "logged_models"} <= tables
        ((runs,),) = db.execute(
            "select count(*) from runs where experiment_id = %s", (int(experiment.experiment_id),)
        ).fetchall()
        # two pipeline runs, seven stages and a promote, then four stages and a promote
        assert runs == 2 + len(STAGES) + 1 + 4 + 1
        versions = db.execute(
            "select version from model_versions where name = %s order by version", (MODEL,)
        ).fetchall()
        assert [v for (v,) in versions] == [1, 2]
        kind = db.execute(
            "select value from experiment_tags where experiment_id = %s and key = 'mlflow.experimentKind'",
            (int(experiment.experiment_id),),
        ).fetchall()
        assert kind == [("custom_model_development",)]
    stored = {p.name for p in srv.artifacts.rglob("*") if p.is_file()}
    assert {"MLmodel", "model.keras", "promotion.json", "report.html"} <= stored, sorted(stored)[:40]
    repo = team["repo"]
    assert not [p for p in ("mlflow.db", "mlruns", "mlartifacts") if (repo / p).exists()]


def test_the_nightly_dump_restores_every_run_and_model_version(server, team):
    """docs/team.md's backup: pg_dump's custom format, restored into an empty database."""
    import psycopg

    pg, _ = server
    dump = pg.root / "mlflow.dump"
    pg.client("pg_dump", "--format=custom", f"--file={dump}", "mlflow")
    pg.create_database("mlflow_restored")
    pg.client("pg_restore", "--no-owner", "--dbname=mlflow_restored", str(dump))
    tables = ["runs", "params", "metrics", "tags", "experiment_tags", "logged_models", "model_versions",
              "registered_model_aliases"]  # fmt: skip
    counts = {}
    for uri in (pg.uri(with_password=True), pg.uri("mlflow_restored", with_password=True)):
        with psycopg.connect(uri) as db:
            counts[uri] = [db.execute(f"select count(*) from {table}").fetchone()[0] for table in tables]
    original, copy = counts.values()
    assert original == copy and all(original), dict(zip(tables, original, strict=True))


def test_stages_log_links_to_the_model_training_view_instead_of_mlflows(server, team):
    _, srv = server
    _, experiment = _experiment(srv)
    out = team["repro"].stdout
    runs_page = f"{srv.url}/#/experiments/{experiment.experiment_id}/runs"
    assert f"MLflow experiment (training runs): {runs_page}?workflowType=machine_learning" in out
    assert (
        len(re.findall(rf"MLflow run \S+: {re.escape(runs_page)}/\w+\?workflowType=machine_learning", out))
        == 7
    )
    assert "View experiment at" not in out  # MLflow's own link: the GenAI view


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_the_logged_link_opens_the_ui_on_the_training_runs(server, team, tmp_path):
    from playwright.sync_api import sync_playwright

    out = team["repro"].stdout
    (link,) = set(re.findall(r"MLflow experiment \(training runs\): (\S+)", out))
    (evaluate_link,) = re.findall(r"MLflow run evaluate: (\S+)", out)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(link)
            # the runs table with the pipeline runs by name; the sidebar's model-training items (the
            # registry), not the GenAI ones (judges, prompts)
            page.get_by_text(re.compile(r"^pipeline ")).first.wait_for(timeout=60_000)
            page.get_by_text("Model registry").first.wait_for(timeout=10_000)
            page.screenshot(path=str(tmp_path / "ui.png"))
            assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
            assert page.get_by_text("Judges", exact=True).count() == 0
            # a stage's own link: its run page, with its metrics
            page.goto(evaluate_link)
            page.get_by_text("accuracy", exact=True).first.wait_for(timeout=60_000)
            assert "workflowType=machine_learning" in page.url, page.url
        finally:
            browser.close()


def test_behind_basic_auth_only_users_get_in_and_they_share_the_experiment_and_the_model(
    server, tmp_path, monkeypatch
):
    """docs/team.md's authenticated set-up: MLflow's basic-auth app, default permission EDIT."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from tlpipe.core import tracking

    pg, _ = server
    admin = secrets.token_hex(12)

    def as_user(name: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    with basic_auth_server(pg, tmp_path / "auth", admin) as srv:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tlpipe")
        tracking.check_reachable(srv.url)  # /health asks for no credentials: stages start
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{srv.url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert anonymous.value.code == 401

        as_user("admin", admin)
        users = get_app_client("basic-auth", tracking_uri=srv.url)
        for name in ("ann", "bob"):
            users.create_user(username=name, password=f"{name}-{admin}")
        runs = {}
        for name in ("ann", "bob"):  # ann's stage creates the experiment; bob's logs into it
            as_user(name, f"{name}-{admin}")
            with tracking.stage_run("download", {"data.source": "demo"}) as run:
                tracking.log_metrics({"images": 32})
            runs[name] = run.info.run_id
        client = mlflow.MlflowClient(srv.url)
        experiment = client.get_experiment_by_name("tlpipe")
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
        logged = client.search_runs([experiment.experiment_id])
        assert {r.info.run_id for r in logged} == set(runs.values())
        # the registry is shared too: bob registers a version of ann's model and moves the alias,
        # as tlpipe promote does
        as_user("ann", f"ann-{admin}")
        client.create_registered_model("tlpipe-classifier")
        as_user("bob", f"bob-{admin}")
        version = client.create_model_version(
            "tlpipe-classifier", f"runs:/{runs['bob']}/classifier", run_id=runs["bob"]
        )
        client.set_registered_model_alias("tlpipe-classifier", "champion", version.version)
        assert client.get_model_version_by_alias("tlpipe-classifier", "champion").run_id == runs["bob"]

        as_user("bob", "a wrong password")
        with pytest.raises(MlflowException, match=r"401|nauthorized|redentials"):
            client.search_runs([experiment.experiment_id])
