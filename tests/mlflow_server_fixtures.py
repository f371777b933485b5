"""A shared MLflow server as a team runs one, started for a test: ``mlflow server`` on PostgreSQL.

PostgreSQL is Debian's ``postgresql`` package (``.ci/run`` installs it), run from
``/usr/lib/postgresql/<version>/bin`` with a fresh cluster in a temporary folder: it listens on
127.0.0.1 only, on a free port, and asks for a password (scram-sha-256), as docs/team.md sets up.
``initdb`` and ``postgres`` refuse to run as root, so as root they run as the ``postgres`` user
the package creates. The MLflow server proxies artifacts (``--artifacts-destination``) to a
folder of the test's, so clients need no access to the artifact store.

Where PostgreSQL is missing the tests skip, saying why; in CI (``CI=true``) they fail instead:
there ``.ci/run`` must have installed it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout: one folder per major version
PG_USER = "postgres"  # the system user Debian's package creates; the cluster runs as it under root
DB_NAME = DB_USER = "mlflow"
AUTH_INI = """[mlflow]
default_permission = EDIT
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""  # docs/team.md's basic_auth.ini
START_TIMEOUT_S = 120  # the MLflow server creates its tables on first start: a minute on busy cores
INSTALL_HINT = "Debian: apt-get install postgresql; .ci/run installs it"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's folder, else wherever ``pg_config`` says."""

    def major(path: Path) -> int:
        found = re.search(r"/(\d+)/bin$", path.as_posix())
        return int(found.group(1)) if found else 0

    found = sorted((Path(p) for p in glob.glob(PG_BIN_GLOB) if _has_server(Path(p))), key=major)
    if found:
        return found[-1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if bindir.returncode == 0 and _has_server(Path(bindir.stdout.strip())):
            return Path(bindir.stdout.strip())
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and _has_server(Path(initdb).parent) else None


def _has_server(bindir: Path) -> bool:
    programs = ("initdb", "pg_ctl", "postgres", "createdb", "pg_dump", "pg_restore")
    return all((bindir / name).is_file() for name in programs)


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: the ``postgres`` user under root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


def unavailable() -> str | None:
    """Why PostgreSQL cannot be started here, or None when it can."""
    if postgres_bin() is None:
        return f"PostgreSQL is not installed: no initdb/pg_ctl in {PG_BIN_GLOB} nor on PATH ({INSTALL_HINT})"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as ({INSTALL_HINT})"
    try:
        import psycopg  # noqa: F401  # SQLAlchemy 2.1's driver for postgresql:// (psycopg 3)
    except ImportError:
        return "psycopg (3) is not installed: pip install -e '.[server]'"
    return None


def require_postgres() -> None:
    """Skip the test where PostgreSQL is missing; fail it in CI, where it must be there."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the MLflow-server tests, but {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str  # the mlflow user's; the server gets it as PGPASSWORD, not in its command line
    bindir: Path
    root: Path  # data/, postgres.log

    def uri(self, database: str = DB_NAME, with_password: bool = False) -> str:
        """``postgresql://mlflow@127.0.0.1:PORT/DATABASE``, what ``mlflow server`` takes (the password from
        libpq's PGPASSWORD or ~/.pgpass); with the password, for the test's own connections."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{DB_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def client(self, name: str, *args: str) -> None:
        """A PostgreSQL client program (createdb, pg_dump, ...) as the mlflow user, over TCP with the password."""
        env = {**os.environ, "PGPASSWORD": self.password}
        _pg(self.bindir, name, "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, *args,
            cwd=self.root, env=env)  # fmt: skip

    def create_database(self, name: str) -> str:
        """A new database owned by the mlflow user; its URI."""
        self.client("createdb", name)
        return self.uri(name)


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:PORT: what users set MLFLOW_TRACKING_URI to
    artifacts: Path  # --artifacts-destination
    log: Path


def _pg(bindir: Path, name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    owner = _run_as()
    proc = subprocess.run(
        [str(bindir / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=START_TIMEOUT_S,
        **({"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster with a database and a user (password auth), stopped and removed after."""
    require_postgres()
    bindir = postgres_bin()
    assert bindir is not None
    owner = _run_as()
    # not under pytest's tmp_path: its root is private to root, and the postgres user must reach it
    root = Path(tempfile.mkdtemp(prefix="tlpipe-pg-"))
    if owner:
        os.chown(root, *owner)
    password = secrets.token_hex(16)
    (root / "password").write_text(password + "\n")
    if owner:
        os.chown(root / "password", *owner)
    data, log, port = root / "data", root / "postgres.log", free_port()
    started = False
    try:
        _pg(bindir, "initdb", "-D", str(data), "-U", DB_USER, f"--pwfile={root / 'password'}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            cwd=root)  # fmt: skip
        # fsync off: a throw-away cluster need not survive a power cut, and busy disks slow every commit
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
        _pg(bindir, "pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start",
            cwd=root)  # fmt: skip
        started = True
        server = Postgres(port, password, bindir, root)
        server.create_database(DB_NAME)
        yield server
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _pg(bindir, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _mlflow_command() -> list[str]:
    beside = Path(sys.executable).parent / "mlflow"  # the venv's, activated or not
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "mlflow"]


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without MLflow's variables (the tests' own store must not leak into the server),
    plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | (extra or {})


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts: Path,
    log: Path,
    env: dict[str, str] | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts, ready (``/health`` answers), stopped after.

    ``env`` adds to its environment (PGPASSWORD, the basic-auth app's settings), ``options`` to its
    command line (``--app-name basic-auth``).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        *_mlflow_command(), "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts.as_uri(),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # a team's server keeps the default 4; the tests' cores are few
        *options,
    ]  # fmt: skip
    with open(log, "wb") as out:
        # its own session: the server starts uvicorn workers, all stopped with it as one group
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server_environment(env),
                                cwd=artifacts.parent, start_new_session=True)  # fmt: skip
    try:
        _wait_healthy(url, proc, log)
        yield MlflowServer(url, artifacts, log)
    finally:
        _stop(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer {url}/health in {START_TIMEOUT_S} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _tail(log: Path, chars: int = 5000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


@contextlib.contextmanager
def basic_auth_server(pg: Postgres, tmp: Path, admin_password: str) -> Iterator[MlflowServer]:
    """docs/team.md's server behind MLflow's basic-auth app: users and permissions in their own database."""
    tmp.mkdir(parents=True, exist_ok=True)
    ini = tmp / "basic_auth.ini"
    ini.write_text(AUTH_INI.format(database_uri=pg.create_database("mlflow_auth")))
    env = {
        "PGPASSWORD": pg.password,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # read on the first start only
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),  # CSRF protection of the UI's forms
    }
    with mlflow_server(pg.create_database("mlflow_team"), tmp / "artifacts", tmp / "server.log", env=env,
                       options=("--app-name", "basic-auth")) as server:  # fmt: skip
        yield server
