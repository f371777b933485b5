"""The team server's set-up stays what docs/team.md says and CI runs: fast checks, no server started.

tests/ops/test_mlflow_server.py runs the server itself.
"""

from __future__ import annotations

import re

import pytest

import mlflow_server_fixtures as fixtures
from pipeline_helpers import REPO

TEAM_DOC = (REPO / "docs" / "team.md").read_text()


def test_without_postgresql_a_developer_skips_and_ci_fails(monkeypatch) -> None:
    monkeypatch.setattr(fixtures, "unavailable", lambda: "PostgreSQL is not installed")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        fixtures.require_postgres()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the MLflow-server tests"):
        fixtures.require_postgres()


def test_ci_installs_postgresql_before_the_tests() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "apt-get install -y -qq --no-install-recommends postgresql" in script
    calls = [
        line.strip() for line in script.splitlines() if line.strip() in ("install_postgresql", "make test")
    ]
    assert calls == ["install_postgresql", "make test"]


def test_the_docs_basic_auth_ini_is_the_one_the_test_runs() -> None:
    (ini,) = re.findall(r"```ini\n(.*?)```", TEAM_DOC, re.DOTALL)
    settings = [
        line.strip() for line in ini.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    expected = fixtures.AUTH_INI.format(database_uri="postgresql://mlflow@127.0.0.1:5432/mlflow_auth")
    assert settings == expected.strip().splitlines()


def test_the_docs_server_command_has_the_options_the_test_uses() -> None:
    for option in ("--backend-store-uri postgresql://mlflow@", "--artifacts-destination", "--host 127.0.0.1",
                   "--app-name basic-auth", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY", "pg_dump --format=custom", "pg_restore --no-owner"):  # fmt: skip
        assert option in TEAM_DOC, option


def test_the_server_extra_brings_the_driver_and_the_auth_app() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "psycopg[binary]" in project["optional-dependencies"]["server"]
    assert "mlflow[auth]" in project["optional-dependencies"]["server"]
    assert not any("psycopg" in d for d in project["dependencies"])  # users reach the server over HTTP
    pinned = {line.partition("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines()}
    assert {"psycopg", "psycopg-binary", "flask-wtf", "wtforms"} <= pinned
