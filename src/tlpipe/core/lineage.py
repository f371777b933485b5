"""Lineage: which stage runs belong to one pipeline execution, and which run wrote each input.

DVC starts each stage as its own process, so the stages of one ``dvc repro`` share
nothing but their ancestor process. A stage run is nested under a *pipeline run* found
by an execution id: ``TLPIPE_EXECUTION_ID`` when set (``tlpipe retrain`` sets it),
otherwise the id of the ``dvc repro`` / ``dvc exp run`` process (or queue worker) the
stage runs under. An input is linked to the run that wrote it, found by its digest; a
producer outside this execution was cached by DVC and is named on the pipeline run.
Used by :mod:`tlpipe.core.tracking`, which opens the runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from tlpipe.core import constants as C
from tlpipe.core.files import json_digest

EXECUTION_ENV = "TLPIPE_EXECUTION_ID"
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC in a queued experiment


def param_value(value: object) -> object:
    """A param as MLflow logs it: None is written ``null``, as in params.yaml."""
    return "null" if value is None else value


def execution_id() -> str | None:
    """What groups this stage with the others of one pipeline execution, or None if nothing does."""
    return os.environ.get(EXECUTION_ENV) or dvc_ancestor()


def dvc_ancestor() -> str | None:
    """``dvc-<host>-<pid>-<start time>`` of the ``dvc repro``/``dvc exp run`` this process runs under."""
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None:
            if is_dvc_execution(process.cmdline()):
                return f"dvc-{socket.gethostname()}-{process.pid}-{process.create_time():.2f}"
            process = process.parent()
    except psutil.Error:  # an ancestor exited or is not ours to inspect: no grouping
        return None
    return None


def is_dvc_execution(cmdline: Sequence[str]) -> bool:
    """``dvc repro ...``, ``dvc exp run ...`` (or a queue worker's ``dvc exp exec-run``), also as
    ``python -m dvc`` or a path to dvc."""
    names = [Path(arg).name for arg in cmdline]
    if "dvc" not in names[:3]:
        return False
    rest = names[names.index("dvc") + 1 :]
    # `dvc exp exec-run`: how `dvc queue start`'s workers run each queued experiment
    return rest[:1] == ["repro"] or rest[:2] in (["exp", "run"], ["exp", "exec-run"])


def pipeline_run(client, experiment_id: str, execution: str, run_params: Mapping[str, object]) -> str:
    """The pipeline run of this execution: found by its tag, or created by the first stage that runs."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{C.EXECUTION_TAG}` = '{execution}' and tags.`{C.ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    git = git_state()
    params = {k: param_value(v) for k, v in run_params.items()}
    commit = git.get(C.GIT_COMMIT_TAG, "")[:7] or "no-git"
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(
        experiment_id,
        run_name=f"{os.environ.get(DVC_EXPERIMENT_ENV) or 'pipeline'} {commit}"
        f"{'+changes' if git.get(C.GIT_DIRTY_TAG) == 'true' else ''} {started}",
        tags={
            C.ROLE_TAG: "pipeline",
            C.EXECUTION_TAG: execution,
            **(
                {C.DVC_EXPERIMENT_TAG: os.environ[DVC_EXPERIMENT_ENV]}
                if os.environ.get(DVC_EXPERIMENT_ENV)
                else {}
            ),
            C.PARAMS_DIGEST_TAG: json_digest(params),
            **git,
        },
    )
    from mlflow.entities import Param

    # all params on the pipeline run: two executions compare side by side in the UI
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # the store's limit per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def git_state() -> dict[str, str]:
    """The commit and whether tracked files differ from it, as tags; empty outside a git work tree."""
    try:
        commit = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {C.GIT_COMMIT_TAG: commit, C.GIT_DIRTY_TAG: "true" if changed else "false"}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def git_tags(tags: Mapping[str, str]) -> dict[str, str]:
    # the pipeline run's: the tree as it was when the execution began, before stages rewrote dvc.lock
    return {k: v for k, v in tags.items() if k in (C.GIT_COMMIT_TAG, C.GIT_DIRTY_TAG)}


def link_producers(
    client, experiment_id: str, run_id: str, parent: str | None, inputs: Mapping[str, str]
) -> None:
    """Tag each input with the run that wrote it; a producer outside this execution was cached by DVC.

    The cached producers' own producers (and theirs) are cached too: all of them
    are named on the pipeline run.
    """
    cached = []
    for path, digest in inputs.items():
        producer = find_producer(client, experiment_id, path, digest)
        if producer is None:
            continue
        client.set_tag(run_id, C.INPUT_RUN_TAG_PREFIX + path, producer.info.run_id)
        if parent and producer.data.tags.get("mlflow.parentRunId") != parent:
            cached.append(producer)
    seen = set()
    while cached:
        producer = cached.pop()
        if producer.info.run_id in seen:
            continue
        seen.add(producer.info.run_id)
        client.set_tag(parent, C.CACHED_TAG_PREFIX + producer.data.tags[C.STAGE_TAG], producer.info.run_id)
        upstream = [v for k, v in producer.data.tags.items() if k.startswith(C.INPUT_RUN_TAG_PREFIX)]
        cached += [client.get_run(r) for r in upstream if r not in seen]


def find_producer(client, experiment_id: str, path: str, digest: str):
    """The latest finished run that wrote ``path`` with this digest, or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{C.OUTPUT_TAG_PREFIX}{path}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None
