"""``tlpipe pr-report``: what a pull request changes in the pipeline's results, as a job summary.

In order: ``dvc pull`` of what the remote already holds (so unchanged stages are not
rerun), ``dvc repro`` (reruns exactly what the branch changed), ``dvc params diff`` and
``dvc metrics diff`` against the base revision, and the report's own summary
(``results/report/summary.md``). The Markdown goes to stdout and is appended to
``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it, as ``tlpipe retrain``'s does; the
workflow (.github/workflows/pr-report.yml) runs this command and nothing else, so a
reviewer gets the same summary on a laptop.

The base's params and metrics are read from git (``metrics.json`` is committed with
``dvc.lock``), so the base revision must be fetched: in a workflow, ``actions/checkout``
with ``fetch-depth: 0``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tlpipe.core.errors import PipelineError
from tlpipe.ops.retrain import (
    EXECUTION_ID_VARIABLE,
    Step,
    append_step_summary,
    child_environment,
    configured_remote,
    dvc,
    echo,
    execution_id,
    failure_markdown,
    progress_line,
    run_step,
)

JOB = "pr-report"
REPORT_SUMMARY = Path("results/report/summary.md")
DEFAULT_BASE = "main"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="the git revision to compare with (default: origin/$GITHUB_BASE_REF in a pull request's "
        f"workflow, else {DEFAULT_BASE})",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--remote", metavar="NAME", help="DVC remote to pull from (default: the default remote)"
    )
    where.add_argument(
        "--no-remote", action="store_true", help="skip dvc pull: every changed stage reruns here"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the summary to this file")


def base_revision(requested: str | None, environ: Mapping[str, str]) -> str:
    """The revision to compare with: the caller's, the pull request's target branch, or main."""
    if requested:
        return requested
    target = environ.get("GITHUB_BASE_REF")
    return f"origin/{target}" if target else DEFAULT_BASE


def report_steps(remote: str | None) -> list[Step]:
    pull = (
        Step("dvc pull (skipped: --no-remote)", None)
        if remote is None
        else Step(f"dvc pull (remote {remote})", dvc("pull", "--allow-missing", "--remote", remote))
    )
    return [pull, Step("dvc repro", dvc("repro"))]


def run(args: argparse.Namespace) -> int:
    repo = Path.cwd()
    env = child_environment(os.environ, execution_id(os.environ))
    base = base_revision(args.base, os.environ)
    check_revision(repo, base)
    remote = None if args.no_remote else configured_remote(repo, env, args.remote)
    steps = report_steps(remote)
    total = len(steps) + 1  # and the comparison
    try:
        for number, step in enumerate(steps, start=1):
            run_step(step, number, total, repo, env, job=JOB)
        echo(progress_line(total, total, f"compare with {base}", JOB))
        summary = summary_markdown(
            base,
            captured(dvc("params", "diff", base, "--md"), repo, env),
            captured(dvc("metrics", "diff", base, "--md"), repo, env),
            _read(repo / REPORT_SUMMARY),
        )
    except PipelineError as err:
        append_step_summary(env, failure_markdown(str(err), env[EXECUTION_ID_VARIABLE]))
        raise
    echo(summary)
    append_step_summary(env, summary)
    if args.out is not None:
        args.out.write_text(summary, encoding="utf-8")
    return 0


def check_revision(repo: Path, revision: str) -> None:
    """Refuse a base git cannot find before anything runs, saying how to fetch it."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise PipelineError(
            f"base revision {revision!r} not found in {repo}: fetch it (in a workflow, actions/checkout "
            "with fetch-depth: 0) or pass --base REV"
        )


def captured(argv: list[str], repo: Path, env: Mapping[str, str]) -> str:
    done = subprocess.run(argv, cwd=repo, env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`{' '.join(argv[2:])}` exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def summary_markdown(base: str, params_diff: str, metrics_diff: str, report: str | None) -> str:
    """The job summary: params and metrics changed against ``base``, then the report's summary."""
    parts = [
        "## tlpipe: what this change does to the pipeline",
        f"Compared with `{base}`.",
        "### Params changed",
        params_diff or "No params changed.",
        "### Metrics changed",
        metrics_diff or "No metric changed.",
        "### This branch's report",
        _demote_headings(report) if report else f"No report: `{REPORT_SUMMARY}` is missing.",
    ]
    return "\n\n".join(parts) + "\n"


def _demote_headings(markdown: str) -> str:
    # the report's own headings sit under this summary's "###"
    return "\n".join("###" + line if line.startswith("#") else line for line in markdown.splitlines())
