"""Tests for the shared stage-script entry point."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tlpipe.core.config import Params
from tlpipe.core.errors import PipelineError
from tlpipe.stage_runner import stage_main

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, text: str = "fine_tune:\n  epochs: 3\n") -> str:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return str(path)


def _error_lines(stderr: str, stage: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{stage}: error: ")]


def _run_script(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """A real stage script, as DVC runs it: exit status and output."""
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    command = [sys.executable, str(REPO / "stages" / script), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=environment, timeout=120)


def _never(params, args):  # pragma: no cover - must not be reached
    raise AssertionError("the stage ran despite bad input")


def test_runs_the_stage_with_validated_params_and_path_args(tmp_path: Path) -> None:
    seen = []
    argv = ["--params", _params(tmp_path), "--model-in", "m/in.keras", "--out", "o"]
    assert stage_main("fine-tune", ["model-in"], ["out"], lambda p, a: seen.append((p, a)), argv) == 0
    [(params, args)] = seen
    assert isinstance(params, Params) and params.fine_tune.epochs == 3
    assert args.model_in == Path("m/in.keras") and args.out == Path("o")


def test_invalid_params_exit_1_with_one_line_naming_the_key(tmp_path: Path, capsys) -> None:
    argv = ["--params", _params(tmp_path, "train_frozen:\n  epochs: 0\n"), "--out", "o"]
    assert stage_main("train-frozen", [], ["out"], _never, argv) == 1
    err = capsys.readouterr().err
    [line] = _error_lines(err, "train-frozen")
    assert "params.yaml" in line
    assert "train_frozen.epochs" in err and "greater than or equal to 1" in err
    assert "Traceback" not in err


def test_unknown_key_is_named(tmp_path: Path, capsys) -> None:
    argv = ["--params", _params(tmp_path, "evaluate:\n  batchsize: 8\n"), "--out", "o"]
    assert stage_main("evaluate", [], ["out"], _never, argv) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err, "evaluate")) == 1
    assert "evaluate.batchsize: unknown key" in err and "batch_size" in err


def test_missing_params_file_exits_1(tmp_path: Path, capsys) -> None:
    argv = ["--params", str(tmp_path / "nope.yaml"), "--out", "o"]
    assert stage_main("split", [], ["out"], _never, argv) == 1
    [line] = _error_lines(capsys.readouterr().err, "split")
    assert "nope.yaml: no such file" in line


def test_missing_path_argument_exits_via_argparse(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        stage_main("evaluate", ["data", "model"], [], _never, ["--params", _params(tmp_path), "--data", "d"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: stages/evaluate.py" in err and "--model" in err and "required" in err


@pytest.mark.parametrize(
    "error", [PipelineError("manifest.csv has no 'test' images"), FileNotFoundError("x.csv: not found")]
)
def test_user_errors_from_the_stage_are_one_line(tmp_path: Path, capsys, error: Exception) -> None:
    def run(params, args):
        raise error

    assert stage_main("fine-tune", [], ["out"], run, ["--params", _params(tmp_path), "--out", "o"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"fine-tune: error: {error}\n"
    assert captured.out == ""


def test_other_exceptions_are_bugs_and_propagate(tmp_path: Path) -> None:
    def run(params, args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        stage_main("report", [], ["out"], run, ["--params", _params(tmp_path), "--out", "o"])


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/d/x.csv"),
            "No space left on device: /d/x.csv (free",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/raw"), "Permission denied: /ro/raw (check"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/x"), "Read-only file system: /mnt/x (the file"),
    ],
    ids=["disk-full", "permissions", "read-only"],
)
def test_os_errors_of_the_machine_are_one_line_with_the_path(tmp_path: Path, capsys, error, line) -> None:
    def run(params, args):
        raise error

    assert stage_main("augment", [], ["out"], run, ["--params", _params(tmp_path), "--out", "o"]) == 1
    assert capsys.readouterr().err.startswith(f"augment: error: {line}")


def test_other_os_errors_are_bugs_and_propagate(tmp_path: Path) -> None:
    def run(params, args):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        stage_main("augment", [], ["out"], run, ["--params", _params(tmp_path), "--out", "o"])


def test_sigterm_is_caught_only_while_the_stage_runs(tmp_path: Path) -> None:
    """Raised as an exception inside the stage (so clean-up runs); the caller's handler is put back."""
    before = signal.getsignal(signal.SIGTERM)
    during = []
    argv = ["--params", _params(tmp_path), "--out", "o"]
    assert (
        stage_main("split", [], ["out"], lambda p, a: during.append(signal.getsignal(signal.SIGTERM)), argv)
        == 0
    )
    assert callable(during[0]) and during[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_stage_script_prints_no_traceback(tmp_path: Path) -> None:
    """The real script end to end: exit status and stderr as DVC shows them."""
    bad = _params(tmp_path, "evaluate:\n  batch_size: -1\n")
    args = ["--params", bad, "--data", "d", "--model", "m", "--out", str(tmp_path / "o"),
            "--decision", str(tmp_path / "decision.json"), "--guard", str(tmp_path / "guard.npz"),
            "--oof", str(tmp_path / "oof.csv")]  # fmt: skip
    result = _run_script("evaluate.py", args, TF_CPP_MIN_LOG_LEVEL="3")
    assert result.returncode == 1
    assert len(_error_lines(result.stderr, "evaluate")) == 1
    assert "evaluate.batch_size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "decision.json").exists()


def test_unreachable_tracking_server_fails_before_any_output(tmp_path: Path) -> None:
    """The real download stage with MLFLOW_TRACKING_URI pointing nowhere: one line, exit 1, nothing written."""
    args = ["--params", _params(tmp_path), "--out", str(tmp_path / "raw")]
    result = _run_script("download.py", args, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert result.returncode == 1
    lines = _error_lines(result.stderr, "download")
    assert len(lines) == 1 and "http://127.0.0.1:9 is unreachable" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw").exists()
