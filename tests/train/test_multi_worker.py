"""Two-worker training (``distribution: multi_worker``) on two local CPU processes, against one worker.

Both workers run both training phases' stage functions with the same output paths, as two workers
sharing a machine would; each records every file it opens for writing (a Python audit hook: every
write tlpipe, Keras's saving, NumPy and MLflow make goes through Python). The one-worker reference
trains the same phases with ``distribution: none`` and the same global batch size.

Tolerance. With the global batch split evenly (8 images: 4 per worker), each worker's loss is the
mean over its half and the all-reduced gradient is the mean of the two halves' means: in exact
arithmetic the one-worker gradient. Only the float32 rounding of that sum differs (a relative 1e-7
per step), so losses must agree to a relative 1e-5 and weights to 1e-5 absolute; measured: 1.4e-7
apart after both phases. Training moves the weights by more than 1e-3, and a sharding or shuffling
mistake (each worker seeing other batches than the one-worker run: measured at 2e-3 before the fix
in ``devices.fix_keras_for_multi_worker``) fails by orders of magnitude. Dropout is off: each worker
draws its own dropout mask for its half, so with dropout the two runs are equally good draws of the
same training, not the same numbers. The run is short on purpose: rounding differences grow with every
step (README, "Training on several machines"), until a long run is another, equally good, training.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
from phase_fixtures import load

import tlpipe
from augmented_fixture import make_augmented
from tlpipe.core import tracking
from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.core.errors import PipelineError
from tlpipe.train.checkpoints import LAST_WEIGHTS, Checkpoint, TrainingState
from tlpipe.train.fine_tune import fine_tune
from tlpipe.train.frozen import train_frozen
from tlpipe.train.workers import Worker, outputs_of, start_state, this_worker
from two_workers import run_workers

TIMEOUT_S = 300  # both phases on both workers take 60-130 s on 2 busy cores; a hung collective fails here
RTOL, ATOL = 1e-5, 1e-5

# the outputs both phases write, as the stage scripts name them (relative to the run's folder)
OUTPUTS = {"frozen": "frozen.keras", "frozen_history": "frozen/history.csv", "oof": "frozen/oof.csv",
           "frozen_checkpoints": "ckpt-frozen", "model": "model.keras", "history": "fine/history.csv",
           "checkpoints": "ckpt-fine"}  # fmt: skip

WORKER = textwrap.dedent(
    """
    import json, os, sys

    writes, recording = [], True
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def where(path, dir_fd=None):
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):  # relative to an open folder (shutil.rmtree's)
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    def record(event, args):
        if not recording:
            return
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE):
                writes.append(where(path))
        elif event in ("os.rename", "os.replace"):
            writes.append(where(args[1], args[3]))
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            writes.append(where(args[0], args[-1]))
        elif event == "os.truncate":
            writes.append(where(args[0]))
        elif event == "sqlite3.connect":
            writes.append("sqlite3:" + where(args[0]))

    sys.addaudithook(record)
    from pathlib import Path

    from tlpipe.core.config import FineTuneParams, TrainFrozenParams
    from tlpipe.train.fine_tune import fine_tune
    from tlpipe.train.frozen import train_frozen

    config = json.loads(Path(sys.argv[1]).read_text())
    out, o = Path(config["out"]), config["outputs"]
    frozen = train_frozen(
        Path(config["data"]), TrainFrozenParams(**config["frozen"]), out / o["frozen"],
        out / o["frozen_history"], out / o["frozen_checkpoints"], out / o["oof"],
    )
    fine = fine_tune(
        Path(config["data"]), Path(config["model_in"]), FineTuneParams(**config["fine"]), out / o["model"],
        out / o["history"], out / o["checkpoints"],
    )
    recording = False
    Path(config["report"]).write_text(json.dumps({"frozen": frozen, "fine": fine, "writes": writes}))
    """
)


def both_phases(
    root: Path, out: Path, model_in: Path, frozen: TrainFrozenParams, fine: FineTuneParams
) -> None:
    o = {k: out / v for k, v in OUTPUTS.items()}
    train_frozen(root, frozen, o["frozen"], o["frozen_history"], o["frozen_checkpoints"], o["oof"])
    fine_tune(root, model_in, fine, o["model"], o["history"], o["checkpoints"])


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def losses(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        return np.array([[float(row["loss"]), float(row["val_loss"])] for row in csv.DictReader(fh)])


def under(path: str, folder: Path) -> bool:
    return Path(path.removeprefix("sqlite3:")).is_relative_to(folder)


def cluster(task: str, index: int, chief: bool = False) -> dict[str, str]:
    spec = {"worker": ["h1:1", "h2:1"], **({"chief": ["h0:1"]} if chief else {})}
    return {"TF_CONFIG": json.dumps({"cluster": spec, "task": {"type": task, "index": index}})}


def test_the_chief_is_the_chief_task_or_else_worker_0() -> None:
    assert this_worker("multi_worker", {}) == Worker()  # no TF_CONFIG: a cluster of one
    assert this_worker("none", cluster("worker", 1)) == Worker()  # TF_CONFIG only counts for multi_worker
    assert this_worker("multi_worker", cluster("worker", 0)) == Worker("worker", 0, 2, True)
    assert this_worker("multi_worker", cluster("worker", 1)) == Worker("worker", 1, 2, False)
    assert this_worker("multi_worker", cluster("chief", 0, chief=True)) == Worker("chief", 0, 3, True)
    assert not this_worker("multi_worker", cluster("worker", 0, chief=True)).is_chief
    with pytest.raises(PipelineError, match="TF_CONFIG is not a cluster spec"):
        this_worker("multi_worker", {"TF_CONFIG": '{"cluster": {}}'})


def test_only_the_chief_writes_where_it_is_told(tmp_path: Path) -> None:
    with outputs_of(Worker()) as own:
        assert own(tmp_path / "model.keras") == tmp_path / "model.keras"
    with outputs_of(Worker("worker", 1, 2, False)) as own:
        model, history = own(tmp_path / "model.keras"), own(tmp_path / "a" / "history.csv")
        assert (model.name, history.name) == ("model.keras", "history.csv")
        assert not model.is_relative_to(tmp_path) and model.parent != history.parent
        model.parent.mkdir(parents=True)
        model.write_text("scratch")
    assert not model.parent.parent.exists()  # the scratch folder is gone


def test_several_workers_start_afresh_one_resumes(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, "key")
    checkpoint.save_state(TrainingState("key", epochs_done=3))
    (tmp_path / LAST_WEIGHTS).write_bytes(b"")  # what the state points at
    assert start_state(checkpoint, Worker()).epochs_done == 3
    # the others have no checkpoint: resuming alone would leave the workers at different epochs
    assert start_state(checkpoint, Worker("worker", 0, 2, True)).epochs_done == 0
    assert checkpoint.load_state() is None


def test_a_stage_run_not_logged_touches_no_store(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.stage_run("fine-tune", {"fine_tune.epochs": 1}, log=False) as run:
        assert run is None
        tracking.log_metrics({"best_val_loss": 0.5})
        tracking.log_keras_model(None, "model", None)
    assert not (tmp_path / "never.db").exists()
    assert mlflow.active_run() is None


@pytest.mark.slow  # two worker processes train real models
def test_two_workers_train_as_one_worker_and_only_the_chief_writes(tmp_path: Path) -> None:
    # 16 train and 8 val images, batch 8: every global batch splits 4 + 4
    root = make_augmented(tmp_path / "augmented", ["red", "green"], {"train": 8, "val": 4})
    frozen = TrainFrozenParams(
        epochs=2, batch_size=8, learning_rate=0.01, patience=5, dropout=0.0, oof_folds=2
    )
    fine = FineTuneParams(unfreeze_blocks=2, epochs=2, batch_size=8, learning_rate=1e-3, patience=5)
    one = tmp_path / "one"
    both_phases(root, one, one / OUTPUTS["frozen"], frozen, fine)

    # two workers: the same phases and paths, fine-tuning from the same frozen model, their own MLflow store
    out, store = tmp_path / "two", tmp_path / "mlflow"
    uri = f"sqlite:///{store}/mlflow.db"
    store.mkdir()
    mlflow.MlflowClient(uri).create_experiment(
        "tlpipe-tests", artifact_location=(store / "artifacts").as_uri()
    )
    config = {
        "data": str(root), "out": str(out), "model_in": str(one / OUTPUTS["frozen"]), "outputs": OUTPUTS,
        "frozen": frozen.model_copy(update={"distribution": "multi_worker"}).model_dump(),
        "fine": fine.model_copy(update={"distribution": "multi_worker"}).model_dump(),
    }  # fmt: skip
    scratch = [tmp_path / f"tmp-{i}" for i in range(2)]
    for i, folder in enumerate(scratch):
        folder.mkdir()
        (tmp_path / f"worker-{i}.json").write_text(
            json.dumps({**config, "report": str(tmp_path / f"report-{i}.json")})
        )
    (tmp_path / "worker.py").write_text(WORKER)
    env = {
        **os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tlpipe-tests",
        "PYTHONPATH": str(Path(tlpipe.__file__).parents[1]),
    }  # fmt: skip
    runs = run_workers(
        [[sys.executable, str(tmp_path / "worker.py"), str(tmp_path / f"worker-{i}.json")] for i in range(2)],
        tmp_path, tmp_path / "logs", TIMEOUT_S, env, lambda i: {"TMPDIR": str(scratch[i])},
    )  # fmt: skip
    for run in runs:
        assert run.returncode == 0, f"worker {run.index} ({run.returncode}):\n{run.output()[-6000:]}"
    chief, other = (json.loads((tmp_path / f"report-{i}.json").read_text()) for i in range(2))

    # the chief wrote the outputs (the hook sees Keras's saves) and the one MLflow store
    assert {str(out / OUTPUTS["model"]), str(out / OUTPUTS["frozen"])} <= set(chief["writes"])
    assert files_under(out) == files_under(one)
    # the other worker wrote only into its scratch folder (its model and history among it), then removed it
    elsewhere = [p for p in other["writes"] if under(p, tmp_path) and not under(p, scratch[1])]
    assert elsewhere == []
    assert not any(p.startswith("sqlite3:") for p in other["writes"])
    assert {"model.keras", "history.csv"} <= {Path(p).name for p in other["writes"]}
    assert list(scratch[1].iterdir()) == []
    runs_logged = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("tlpipe-tests").experiment_id]
    )
    assert sorted(r.data.tags["tlpipe.stage"] for r in runs_logged) == ["fine-tune", "train-frozen"]
    assert {r.info.status for r in runs_logged} == {"FINISHED"}

    # the same training as one worker: the same epochs, losses and weights, within float32 rounding
    for history in ("frozen_history", "history"):
        np.testing.assert_allclose(losses(out / OUTPUTS[history]), losses(one / OUTPUTS[history]), rtol=RTOL)
    assert chief["fine"]["best_epoch"] == other["fine"]["best_epoch"]
    for model in ("frozen", "model"):
        for a, b in zip(
            load(out / OUTPUTS[model]).get_weights(), load(one / OUTPUTS[model]).get_weights(), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(
            load(one / OUTPUTS["model"]).get_weights(),
            load(one / OUTPUTS["frozen"]).get_weights(),
            strict=True,
        )
    ]
    assert max(moved) > 100 * ATOL  # the agreement is not that of weights training left alone
