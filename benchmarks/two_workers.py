"""Issue 20's two-worker benchmark: the fine-tune stage on one worker and on two, metrics and wall time side by side.

In a scratch copy of the repository, PneumoniaMNIST brought in as the README says (64 px, no augmented
copies, out-of-fold predictions off: the prepared stages are not what is measured), the stages up to
train-frozen run once. Then fine-tune runs twice from the same frozen model, both with the same global
``fine_tune.batch_size``:

- one worker: ``distribution: none``, ``dvc repro -s fine-tune``;
- two workers, as on two machines (README, "Training on several machines"): ``distribution: multi_worker``,
  the chief (worker 0) running ``dvc repro -s fine-tune`` and worker 1 the stage's command from dvc.yaml,
  each with its own ``TF_CONFIG`` on a free 127.0.0.1 port, here on the same CPU cores.

After each, ``dvc repro -s evaluate`` scores the model on the test split. Reported: each run's wall time
(the stage command, or the cluster from the first start to the last exit) and training time (the stage's
``train_seconds`` in MLflow), its best epoch and test metrics, how far the two models' weights are apart,
and how many fine-tune runs MLflow holds (two: the non-chief logs none). Not part of the test suite: about
8 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/two_workers.py --out benchmarks/results/two_workers.json

:func:`run_workers` starts the worker processes; tests/train/test_multi_worker.py uses it too.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench_repo import SHARED, bring_in, copy_repo, edit_params, environment, report_json

PORT_TAKEN = "Could not start gRPC server"  # TensorFlow's error when a worker's port was taken meanwhile


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held together while chosen, so never the same one)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster of local workers on ``ports`` (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


@dataclass
class WorkerRun:
    index: int
    returncode: int | None  # None: stopped (the timeout, or another worker failed)
    seconds: float  # from the cluster's start to this worker's exit
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def run_workers(
    commands: Sequence[Sequence[str]],
    cwd: Path,
    log_dir: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    worker_env: Callable[[int], Mapping[str, str]] | None = None,
    grace: float = 60.0,
    attempts: int = 3,
) -> list[WorkerRun]:
    """One process per command, worker ``i`` running ``commands[i]`` with its ``TF_CONFIG``; wait for all.

    Each runs in its own session and logs to ``log_dir/worker-i.log``. A worker that fails
    gives the others ``grace`` seconds to notice and exit, then they are stopped; so is every
    worker still running after ``timeout`` seconds (a hung collective fails, never hangs).
    A port taken between choosing it and the worker binding it starts the cluster afresh
    on new ports, up to ``attempts`` times.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        runs = _run_once(commands, cwd, log_dir, timeout, env, worker_env, grace)
        if not any(r.returncode not in (0, None) and PORT_TAKEN in r.output() for r in runs):
            return runs
    return runs


def _run_once(commands, cwd, log_dir, timeout, env, worker_env, grace) -> list[WorkerRun]:
    ports = free_ports(len(commands))
    start = time.perf_counter()
    procs, logs, ended = [], [], {}
    for i, argv in enumerate(commands):
        full_env = {
            **(env or os.environ),
            **(worker_env(i) if worker_env else {}),
            "TF_CONFIG": tf_config(ports, i),
        }
        logs.append(log_dir / f"worker-{i}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    deadline = start + timeout
    while len(ended) < len(procs) and time.perf_counter() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.perf_counter() - start
                if p.returncode != 0:  # the others have this long to notice
                    deadline = min(deadline, time.perf_counter() + grace)
        time.sleep(0.2)
    stopped_at = round(time.perf_counter() - start, 1)
    for i, p in enumerate(procs):
        if i not in ended:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.killpg(p.pid, signal.SIGKILL)  # its session: the worker and anything it started
            p.wait()
    return [
        WorkerRun(i, p.returncode, round(ended[i], 1), logs[i]) if i in ended
        else WorkerRun(i, None, stopped_at, logs[i])
        for i, p in enumerate(procs)
    ]  # fmt: skip


# ------------------------------------------------------------ the benchmark

RECIPE = [  # recipes/pneumoniamnist.yaml, with the prepared stages kept short
    "data.source=medmnist",
    "data.medmnist.name=pneumoniamnist",
    "data.medmnist.size=28",
    "data.channels=grayscale",
    "augment.image_size=64",
    "augment.copies=0",
    "train_frozen.oof_folds=0",
    "evaluate.decision_data=val",
    "fine_tune.epochs=2",
]


def _dvc(repo: Path, env: Mapping[str, str], *args: str, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dict(env), stdout=out,
                       stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return round(time.perf_counter() - start, 1)


def _stage_command(repo: Path, stage: str) -> list[str]:
    """The stage's command as dvc.yaml resolves it, run with this interpreter."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        cmd = dvc_repo.stage.collect(stage)[0].cmd
    argv = cmd.split()
    assert argv[0] == "python", cmd
    return [sys.executable, *argv[1:]]


def _fine_tune_runs(env: Mapping[str, str]) -> list:
    """The MLflow store's fine-tune runs, latest first."""
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(env.get("MLFLOW_EXPERIMENT_NAME") or "tlpipe")
    return client.search_runs([experiment.experiment_id], filter_string="tags.`tlpipe.stage` = 'fine-tune'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip


def _result(repo: Path, label: str, wall: float, env: Mapping[str, str], log: Path) -> dict:
    with open(repo / "results/fine_tune/history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    evaluate_s = _dvc(repo, env, "repro", "-s", "evaluate", log=log)
    metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
    run = _fine_tune_runs(env)[0]
    kept = log.parent / label
    kept.mkdir(parents=True, exist_ok=True)
    for rel in ("models/model.keras", "results/fine_tune/history.csv", "results/evaluate/metrics.json"):
        (kept / Path(rel).name).write_bytes((repo / rel).read_bytes())
    return {
        "fine_tune_wall_s": wall,
        "train_s": round(run.data.metrics["train_seconds"], 1),
        "epochs_run": len(rows),
        "best_epoch": int(best["epoch"]),
        "best_val_loss": round(float(best["val_loss"]), 6),
        "best_val_accuracy": round(float(best["val_accuracy"]), 4),
        "history": [{k: round(float(v), 6) for k, v in row.items()} for row in rows],
        "test_accuracy": metrics["accuracy"],
        "test_roc_auc": metrics["roc_auc"],
        "test_macro_f1": metrics["macro_f1"],
        "n_test": metrics["n_test"],
        "evaluate_wall_s": evaluate_s,
    }


def _weights_apart(a: Path, b: Path) -> dict:
    import keras
    import numpy as np

    pairs = zip(
        keras.models.load_model(a).get_weights(), keras.models.load_model(b).get_weights(), strict=True
    )
    diffs = [(float(np.max(np.abs(x - y))), float(np.max(np.abs(x)))) for x, y in pairs if x.size]
    return {"max_abs": max(d for d, _ in diffs), "max_abs_weight": max(w for _, w in diffs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--npz", type=Path, default=SHARED / "pneumoniamnist.npz")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the two workers may take")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.npz.is_file():
        print(f"no PneumoniaMNIST file at {args.npz} (pass --npz)", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tlpipe-two-workers-"))
    log = log_dir / "dvc.log"
    with tempfile.TemporaryDirectory(prefix="tlpipe-two-workers-repo-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        env = {**environment(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
        npz = bring_in(repo, args.npz, args.npz.name)
        edit_params(repo, [*RECIPE, f"data.medmnist.path={npz}", *args.set])
        prepared = {
            s: _dvc(repo, env, "repro", "-s", s, log=log)
            for s in ("download", "split", "augment", "train-frozen")
        }
        print(f"prepared: {prepared}", file=sys.stderr, flush=True)

        edit_params(repo, ["fine_tune.distribution=none"])
        one = _result(repo, "one_worker", _dvc(repo, env, "repro", "-s", "fine-tune", log=log), env, log)
        print(f"one worker: {one['fine_tune_wall_s']} s", file=sys.stderr, flush=True)

        edit_params(repo, ["fine_tune.distribution=multi_worker"])
        chief = [sys.executable, "-m", "dvc", "repro", "-s", "fine-tune"]
        runs = run_workers([chief, _stage_command(repo, "fine-tune")], repo, log_dir, args.timeout, env)
        if any(r.returncode != 0 for r in runs):
            print(f"a worker failed: logs in {log_dir}", file=sys.stderr)
            return 1
        two = _result(repo, "two_workers", max(r.seconds for r in runs), env, log)
        two["worker_wall_s"] = [r.seconds for r in runs]
        print(f"two workers: {two['fine_tune_wall_s']} s", file=sys.stderr, flush=True)

        params = yaml.safe_load((repo / "params.yaml").read_text())
        result = {
            "dataset": args.npz.name,
            "cpus": os.cpu_count(),
            "global_batch_size": params["fine_tune"]["batch_size"],
            "fine_tune": {k: v for k, v in params["fine_tune"].items() if k != "distribution"},
            # the frozen model's head dropout, which fine-tune trains with: each worker draws its own masks
            "train_frozen_dropout": params["train_frozen"]["dropout"],
            "prepared_stages_wall_s": prepared,
            "one_worker": one,
            "two_workers": two,
            "weights_apart": _weights_apart(
                log_dir / "one_worker/model.keras", log_dir / "two_workers/model.keras"
            ),
            "mlflow_fine_tune_runs": len(_fine_tune_runs(env)),  # one per run: the non-chief logs none
            "logs": str(log_dir),
        }
    report_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
