"""``tlpipe retrain``: the scheduled retraining job, runnable the same way on a laptop and in CI.

In order: ``dvc pull`` from the configured remote, ``dvc repro``, the promotion gate
(``tlpipe promote``), ``dvc push``, and a Markdown summary (headline test metrics, the
promotion decision with both figures, where the report is) printed to stdout and appended
to ``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it. The first failing step stops the
job with a message naming it, its exit code and the last lines it printed.

Every command runs with this interpreter's tools (``python -m dvc``, and its ``bin`` folder
first on ``PATH`` for the stages' ``python``), so ``.venv/bin/tlpipe retrain`` works without
activating the venv, and with one ``TLPIPE_EXECUTION_ID``, so that MLflow groups every
stage's run and the promotion's under one parent run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.core.config import SUMMARY_METRICS
from tlpipe.core.errors import PipelineError
from tlpipe.core.lineage import EXECUTION_ENV

EXECUTION_ID_VARIABLE = EXECUTION_ENV  # groups the runs of one retrain under one pipeline run
METRICS = Path("results/evaluate/metrics.json")
PROMOTION = Path("results/promotion.json")
REPORT = Path("results/report/report.html")
TAIL_LINES = 20  # of a failed command's output, quoted in the error
# the summary's metric rows, in reading order, those present; the promotion metric is added to them
HEADLINE_METRICS = SUMMARY_METRICS
NO_REMOTE_HELP = (
    "add one with `dvc remote add -d NAME URL` (e.g. `dvc remote add -d storage s3://bucket/tlpipe`, "
    "or a directory: `dvc remote add -d local /srv/dvc-store`), or pass --no-remote to skip "
    "dvc pull and dvc push"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--remote", metavar="NAME", help="DVC remote to pull from and push to (default: the default remote)"
    )
    where.add_argument("--no-remote", action="store_true", help="a local run: skip dvc pull and dvc push")


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str] | None  # None: skipped


def run(args: argparse.Namespace) -> int:
    repo = Path.cwd()
    env = child_environment(os.environ, execution_id(os.environ))
    echo(f"retrain: execution {env[EXECUTION_ID_VARIABLE]} in {repo}")
    remote = None if args.no_remote else configured_remote(repo, env, args.remote)
    steps = retrain_steps(remote)
    total = len(steps) + 1  # and the summary
    try:
        for number, step in enumerate(steps, start=1):
            run_step(step, number, total, repo, env)
    except PipelineError as err:
        append_step_summary(env, failure_markdown(str(err), env[EXECUTION_ID_VARIABLE]))
        raise
    echo(progress_line(total, total, "summary"))
    summary = summary_markdown(repo, env)
    echo(summary)
    append_step_summary(env, summary)
    return 0


# ------------------------------------------------------------------ the steps


def dvc(*args: str) -> list[str]:
    # the dvc installed beside this interpreter, whether or not its venv is activated
    return [sys.executable, "-m", "dvc", *args]


def retrain_steps(remote: str | None) -> list[Step]:
    """The job's commands in order; without a remote, pull and push are listed as skipped."""

    def with_remote(command: str, *args: str) -> Step:
        if remote is None:
            return Step(f"dvc {command} (skipped: --no-remote)", None)
        return Step(f"dvc {command} (remote {remote})", dvc(command, *args, "--remote", remote))

    return [
        # --allow-missing: the first run against an empty remote (or a dvc.lock whose data was
        # never pushed) pulls what there is and leaves the rest to dvc repro
        with_remote("pull", "--allow-missing"),
        Step("dvc repro", dvc("repro")),
        Step("promotion gate", [sys.executable, "-m", "tlpipe", "promote", "--out", str(PROMOTION)]),
        with_remote("push"),
    ]


def echo(text: str) -> None:
    """A line of the job's own output, on stdout between the echoed output of its commands."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress_line(number: int, total: int, name: str, job: str = "retrain") -> str:
    return f"{job} [{number}/{total}] {name}"


def run_step(
    step: Step, number: int, total: int, repo: Path, env: Mapping[str, str], job: str = "retrain"
) -> None:
    echo(progress_line(number, total, step.name, job))
    if step.argv is None:
        return
    code, tail = stream_command(step.argv, repo, env)
    if code != 0:
        raise PipelineError(
            f"step {number}/{total} ({step.name}) failed: `{shlex.join(step.argv)}` exited with {code}; "
            "its last lines:\n" + "\n".join(tail)
        )


def stream_command(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> tuple[int, list[str]]:
    """Run a command, echoing its output as it comes (training takes minutes); keep the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
    return proc.returncode, list(tail)


# ------------------------------------------------------------------ environment and remote


def execution_id(environ: Mapping[str, str]) -> str:
    """The caller's id, else the GitHub Actions run's (with the attempt: a re-run is a new
    execution), else a fresh one."""
    if environ.get(EXECUTION_ID_VARIABLE):
        return environ[EXECUTION_ID_VARIABLE]
    if environ.get("GITHUB_RUN_ID"):
        return f"github-{environ['GITHUB_RUN_ID']}-{environ.get('GITHUB_RUN_ATTEMPT') or 1}"
    return uuid.uuid4().hex


def child_environment(environ: Mapping[str, str], execution: str) -> dict[str, str]:
    env = dict(environ)
    env[EXECUTION_ID_VARIABLE] = execution
    # dvc.yaml's stage commands call `python`: it must be this venv's, activated or not
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), environ.get("PATH")]))
    return env


def dvc_remotes(repo: Path, env: Mapping[str, str]) -> tuple[list[str], str | None]:
    """The configured remotes' names and the default one, from every config level (project,
    local, global, system). Read from `dvc config --list`: `dvc remote list` wraps long URLs."""
    listed = subprocess.run(
        dvc("config", "--list"), cwd=repo, env=dict(env), capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        raise PipelineError(
            f"`dvc config --list` failed in {repo}: {(listed.stderr or listed.stdout).strip()}"
        )
    names, default = [], None
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("remote.") and key.endswith(".url"):
            names.append(key[len("remote.") : -len(".url")])
        elif key == "core.remote":
            default = value.strip()
    return names, default


def configured_remote(repo: Path, env: Mapping[str, str], requested: str | None) -> str:
    """The remote to pull from and push to, checked before anything runs: a job without one
    should fail in seconds, not after the training."""
    names, default = dvc_remotes(repo, env)
    if requested is not None:
        if requested not in names:
            raise PipelineError(
                f"DVC remote {requested!r} is not configured (configured: {', '.join(names) or 'none'}); "
                f"add it with `dvc remote add {requested} URL`"
            )
        return requested
    if not names:
        raise PipelineError(f"no DVC remote is configured in {repo}: {NO_REMOTE_HELP}")
    if default not in names:
        raise PipelineError(
            f"no default DVC remote among {', '.join(names)}: pass --remote NAME, or make one the "
            "default with `dvc remote default NAME`"
        )
    return default


# ------------------------------------------------------------------ the summary


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{what} not found at {path}")
    return json.loads(path.read_text())


def summary_markdown(repo: Path, env: Mapping[str, str]) -> str:
    metrics = read_json_file(repo / METRICS, "the evaluation's metrics")
    decision = read_json_file(repo / PROMOTION, "the promotion decision")
    parts = [
        "## tlpipe retraining",
        f"Execution `{env[EXECUTION_ID_VARIABLE]}`.",
        "### Test metrics",
        metrics_table(metrics, extra=decision.get("metric")),
        decision_markdown(decision),
        report_line(repo, in_github_actions=env.get("GITHUB_ACTIONS") == "true"),
    ]
    return "\n\n".join(parts) + "\n"


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def metrics_table(metrics: Mapping[str, Any], extra: str | None = None) -> str:
    """Headline test metrics with their confidence intervals, then the test set's size."""
    keys = [k for k in HEADLINE_METRICS if k in metrics]
    if extra and extra in metrics and extra not in keys:
        keys.append(extra)  # a promotion metric that is not a headline one (log_loss, ece, ...)
    intervals = metrics.get("ci") or {}
    level = metrics.get("ci_level")
    ci_header = f"{level * 100:g}% CI" if isinstance(level, (int, float)) else "CI"
    rows = [f"| metric | value | {ci_header} |", "|---|---|---|"]
    for key in keys:
        interval = intervals.get(key)
        ci = f"[{interval['low']:.4f}, {interval['high']:.4f}]" if interval else "-"
        rows.append(f"| {key} | {_number(metrics[key])} | {ci} |")
    if "n_test" in metrics:
        rows.append(f"| test images | {metrics['n_test']} | |")
    return "\n".join(rows)


def _version_and_value(entry: Mapping[str, object] | None) -> tuple[str, str]:
    if not entry:
        return "none", "-"
    return str(entry.get("version", "?")), _number(entry.get("value"))


def decision_markdown(decision: Mapping[str, Any]) -> str:
    metric = decision.get("metric", "?")
    better = "higher" if decision.get("higher_is_better", True) else "lower"
    challenger_version, challenger_value = _version_and_value(decision.get("challenger"))
    champion_version, champion_value = _version_and_value(decision.get("champion"))
    basis = (
        f"Model `{decision.get('model_name', '?')}`, decided on test `{metric}` "
        f"({better} is better, margin {decision.get('margin', 0)})."
    )
    lines = [
        f"### Promotion: **{decision.get('decision', '?')}**",
        basis,
        "",
        f"| | version | {metric} |",
        "|---|---|---|",
        f"| challenger (this run) | {challenger_version} | {challenger_value} |",
        f"| champion before this run | {champion_version} | {champion_value} |",
    ]
    if decision.get("reason"):
        lines += ["", str(decision["reason"])]
    return "\n".join(lines)


def report_line(repo: Path, in_github_actions: bool = False) -> str:
    if not (repo / REPORT).is_file():
        return f"No report: `{REPORT}` is missing."
    where = f"The full report is `{REPORT}`"
    if in_github_actions:
        where += " (uploaded as this workflow run's artifact)"
    return where + "."


def failure_markdown(message: str, execution: str) -> str:
    quoted = message.replace("```", "'''")  # a fence in the command's output would end the block
    return f"## tlpipe retraining failed\n\nExecution `{execution}`.\n\n```\n{quoted}\n```\n"


def append_step_summary(env: Mapping[str, str], markdown: str) -> None:
    path = env.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(markdown)
