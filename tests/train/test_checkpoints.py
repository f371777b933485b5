"""Resumable training: checkpoint files, early stopping across restarts, and real kills."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from augmented_fixture import make_augmented
from tlpipe.core.config import TrainFrozenParams
from tlpipe.data.datasets import load_augmented
from tlpipe.train import checkpoints
from tlpipe.train.checkpoints import Checkpoint, ResumableEarlyStopping, TrainingState
from tlpipe.train.features import compute_features
from tlpipe.train.frozen import train_frozen
from tlpipe.train.head import build_backbone_model

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    return x, x @ np.array([[1.0], [-2.0], [0.5]], dtype="float32")


class _Interrupt(keras.callbacks.Callback):
    """Raises in the middle of an epoch, as a kill would stop it."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch
        self.current = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 2:
            raise KeyboardInterrupt


def _fit(model, ckpt: Checkpoint, state: TrainingState, epochs: int, extra=()) -> None:
    x, y = _data()
    model.fit(x, y, validation_data=(x, y), batch_size=8, epochs=epochs, initial_epoch=state.epochs_done,
              callbacks=[ResumableEarlyStopping(ckpt, state, patience=10), *extra], verbose=0)  # fmt: skip


def test_an_interrupted_fit_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, "fp")
    model, state = _tiny_model(), TrainingState("fp")
    with pytest.raises(KeyboardInterrupt):
        _fit(model, ckpt, state, 6, [_Interrupt(epoch=3)])  # dies mid-way through the 4th epoch
    saved = json.loads((tmp_path / checkpoints.STATE).read_text())
    assert saved["epochs_done"] == 3 and [r["epoch"] for r in saved["rows"]] == [1, 2, 3]

    resumed_model = _tiny_model()  # a new process: fresh weights, fresh optimizer
    resumed = ckpt.load_state()
    assert resumed is not None and resumed.epochs_done == 3
    assert ckpt.restore_last(resumed_model) is True  # weights and Adam's moments
    saved_weights = np.load(tmp_path / checkpoints.LAST_WEIGHTS)["arr_0"]
    np.testing.assert_array_equal(resumed_model.get_weights()[0], saved_weights)
    _fit(resumed_model, ckpt, resumed, 6)
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3, 4, 5, 6]
    # the losses kept falling across the restart: it continued, it did not start over
    losses = [r["loss"] for r in resumed.rows]
    assert losses[3] < losses[0] and losses[-1] < losses[2]
    assert int(resumed_model.optimizer.iterations.numpy()) == 6 * 8


def test_state_from_other_inputs_or_a_finished_run_is_discarded(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, "one")
    model, state = _tiny_model(), TrainingState("one")
    _fit(model, ckpt, state, 2)
    assert Checkpoint(tmp_path, "two").load_state() is None  # other params or data
    assert not (tmp_path / checkpoints.LAST_WEIGHTS).exists()

    ckpt = Checkpoint(tmp_path, "one")
    model, state = _tiny_model(), TrainingState("one")
    _fit(model, ckpt, state, 2)
    assert ckpt.load_state().epochs_done == 2
    ckpt.finish(state)
    assert json.loads((tmp_path / checkpoints.STATE).read_text())["complete"] is True
    assert not (tmp_path / checkpoints.BEST_WEIGHTS).exists()
    assert ckpt.load_state() is None  # a finished run is not resumed: a forced rerun trains afresh


def test_early_stopping_state_survives_a_restart(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, "fp")
    state = TrainingState("fp")
    stopper = ResumableEarlyStopping(ckpt, state, patience=2)
    stopper.set_model(_tiny_model())
    for epoch, val_loss in enumerate([1.0, 0.5, 0.7]):
        stopper.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    again = ResumableEarlyStopping(ckpt, ckpt.load_state(), patience=2)
    again.set_model(stopper.model)
    assert again.state.best_epoch == 2 and again.state.wait == 1
    again.on_epoch_end(3, {"loss": 1.0, "val_loss": 0.6})
    assert again.state.stopped_early and again.model.stop_training
    assert [r["val_loss"] for r in again.state.rows] == [1.0, 0.5, 0.7, 0.6]


def test_a_torn_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ckpt = Checkpoint(tmp_path, "fp")
    model, state = _tiny_model(), TrainingState("fp")
    _fit(model, ckpt, state, 1)
    before = (tmp_path / checkpoints.STATE).read_bytes()

    def torn(file, *arrays):  # the disk fills half-way through the next save
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", torn)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_epoch(model, state, improved=True)
    assert (tmp_path / checkpoints.STATE).read_bytes() == before
    monkeypatch.undo()
    assert ckpt.load_state().epochs_done == 1
    ckpt.restore_last(_tiny_model())  # still a readable archive


# --------------------------------------------------------------- real kills


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> Path:
    return make_augmented(tmp_path_factory.mktemp("kill") / "augmented", ["a", "b"], {"train": 24, "val": 6})


def _params_file(tmp_path: Path, section: str, values: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({section: values}))
    return path


def _start(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"stages/{script}", *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, f"stages/{script}", *args]
    return subprocess.run(command, cwd=REPO, text=True, capture_output=True, timeout=600, check=False)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240, signum: int = signal.SIGKILL) -> str:
    """Kill at the point ``ready`` turns true; the stage's output."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the stage never reached the kill point"
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    return proc.communicate(timeout=120)[0]


def _json_value(path: Path, key: str) -> int:
    try:
        return int(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError):
        return 0


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def frozen_model(augmented: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frozen")
    params = TrainFrozenParams(epochs=2, batch_size=8)
    train_frozen(augmented, params, out / "frozen.keras", out / "h.csv", out / "ckpt")
    return out / "frozen.keras"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_fine_tune_killed_mid_epoch_resumes_and_finishes(augmented, frozen_model, tmp_path, signum) -> None:
    values = {"unfreeze_blocks": 2, "epochs": 3, "batch_size": 4, "learning_rate": 1e-3, "patience": 10}
    params = _params_file(tmp_path, "fine_tune", values)
    ckpt = tmp_path / "ckpt"
    args = ["--params", str(params), "--data", str(augmented), "--model-in", str(frozen_model),
            "--model", str(tmp_path / "model.keras"), "--history", str(tmp_path / "h.csv"),
            "--checkpoints", str(ckpt)]  # fmt: skip
    proc = _start("fine_tune.py", args)
    # the first epoch has ended and checkpointed: the kill lands inside a later one
    output = _kill_when(
        proc, lambda: _json_value(ckpt / checkpoints.STATE, "epochs_done") >= 1, signum=signum
    )
    if signum == signal.SIGTERM:  # caught: the stage unwinds (finally blocks run), says so, exits 128 + 15
        assert proc.returncode == 143 and "fine-tune: terminated (SIGTERM)" in output, output
    done = _json_value(ckpt / checkpoints.STATE, "epochs_done")
    assert 1 <= done < 3
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "h.csv").exists()

    rerun = _run("fine_tune.py", args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after epoch {done} " in rerun.stdout
    assert f"Epoch {done + 1}/3" in rerun.stdout and "Epoch 1/3" not in rerun.stdout
    assert [int(r["epoch"]) for r in _rows(tmp_path / "h.csv")] == [1, 2, 3]
    model = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 1)
    assert json.loads((ckpt / checkpoints.STATE).read_text())["complete"] is True


def test_train_frozen_killed_while_caching_features_resumes_the_cache(augmented, tmp_path) -> None:
    values = {"epochs": 3, "batch_size": 2, "patience": 10}
    params = _params_file(tmp_path, "train_frozen", values)
    ckpt = tmp_path / "ckpt"
    args = ["--params", str(params), "--data", str(augmented), "--model", str(tmp_path / "frozen.keras"),
            "--history", str(tmp_path / "h.csv"), "--oof", str(tmp_path / "oof.csv"),
            "--checkpoints", str(ckpt)]  # fmt: skip
    progress = ckpt / "features" / "train.json"
    proc = _start("train_frozen.py", args)
    _kill_when(proc, lambda: _json_value(progress, "rows") >= 4)
    done = _json_value(progress, "rows")
    assert 4 <= done < 48 and not (tmp_path / "frozen.keras").exists()

    rerun = _run("train_frozen.py", args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"train.npy: {done} of 48 images already done" in rerun.stdout
    assert [int(r["epoch"]) for r in _rows(tmp_path / "h.csv")] == [1, 2, 3]
    # the resumed cache equals one computed in a single go
    backbone = build_backbone_model("efficientnet_lite0", "imagenet", 32)
    whole = compute_features(backbone, load_augmented(augmented).split("train"), 8,
                                      tmp_path / "whole.npy", "k")  # fmt: skip
    # batches of 2 and of 8 take different CPU kernels: a few features differ by ~4e-6 on some machines,
    # while a cache resumed at the wrong row would be off by the features' own size (~0.1-1)
    np.testing.assert_allclose(np.load(ckpt / "features" / "train.npy"), whole, rtol=1e-5, atol=2e-5)
