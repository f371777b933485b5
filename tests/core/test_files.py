"""CSV/JSON hand-over files and the all-or-nothing output directory."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlpipe.core import files
from tlpipe.core.files import (
    MANIFEST_FIELDS,
    atomic_dir,
    read_csv,
    read_json,
    sha256_bytes,
    write_csv,
    write_json,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def test_sha256_bytes_matches_hashlib():
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_csv_round_trip_keeps_order_and_awkward_values(tmp_path):
    rows = [
        {"path": "images/a/x.png", "label": "a", "sha256": "0" * 64, "width": 3, "height": 4},
        {"path": 'odd, "quoted"\nname.png', "label": "café", "sha256": "f" * 64, "width": 10, "height": 1},
    ]
    path = tmp_path / "deep" / "er" / "manifest.csv"  # parents are created
    write_csv(path, rows, MANIFEST_FIELDS)
    back = read_csv(path)
    assert back == [{k: str(v) for k, v in row.items()} for row in rows]  # CSV gives strings back
    assert list(back[0]) == list(MANIFEST_FIELDS)
    assert path.read_bytes().startswith(b"path,label,sha256,width,height\n")
    assert b"\r\n" not in path.read_bytes().split(b'"')[0]  # unix line ends, stable bytes


def test_csv_with_no_rows_keeps_the_header(tmp_path):
    path = tmp_path / "rejected.csv"
    write_csv(path, [], ("path", "reason"))
    assert path.read_text() == "path,reason\n"
    assert read_csv(path) == []


def test_csv_rejects_a_row_with_unexpected_field(tmp_path):
    with pytest.raises(ValueError, match="fields not in fieldnames: 'oops'"):
        write_csv(tmp_path / "m.csv", [{"path": "x", "oops": 1}], ("path",))


def test_files_are_utf8_whatever_the_locale(tmp_path):
    """Class names come from folder names: a non-ASCII one must survive an ASCII locale."""
    code = (
        "import sys; from pathlib import Path; from tlpipe.core.files import write_csv, write_json\n"
        "d = Path(sys.argv[1])\n"
        "write_csv(d / 'm.csv', [{'label': 'caf\\u00e9'}], ['label'])\n"
        "write_json(d / 'c.json', ['caf\\u00e9'])\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.csv").read_bytes() == "label\ncafé\n".encode()
    assert read_csv(tmp_path / "m.csv") == [{"label": "café"}]
    assert read_json(tmp_path / "c.json") == ["café"]


def test_json_round_trip_keeps_key_order(tmp_path):
    data = {"classes": ["b", "a"], "counts": {"z": 1, "a": {"nested": [1.5, None, True]}}, "total": 3}
    path = tmp_path / "sub" / "summary.json"
    write_json(path, data)
    assert read_json(path) == data
    assert list(read_json(path)) == ["classes", "counts", "total"]
    assert list(read_json(path)["counts"]) == ["z", "a"]
    assert path.read_text().endswith("}\n")


@pytest.mark.parametrize("reader", [read_csv, read_json])
def test_reading_a_missing_file_names_it_and_what_to_run(tmp_path, reader):
    path = tmp_path / "data" / "raw" / "manifest.csv"
    with pytest.raises(FileNotFoundError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message
    assert "run the stage that produces it" in message


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_dir_replaces_old_output_on_success(tmp_path):
    final = tmp_path / "out"
    (final / "stale").mkdir(parents=True)
    (final / "stale" / "old.txt").write_text("old")
    with atomic_dir(final) as scratch:
        assert scratch != final and scratch.parent == final.parent
        assert (final / "stale" / "old.txt").exists()  # untouched while the block runs
        (scratch / "new.txt").write_text("new")
    assert _tree(final) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch left behind


def test_atomic_dir_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with atomic_dir(final) as scratch:
        (scratch / "f").write_bytes(b"1")
    assert _tree(final) == {"f": b"1"}


def test_atomic_dir_keeps_old_output_when_block_raises(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    before = _tree(final)

    with pytest.raises(RuntimeError, match="half-way"), atomic_dir(final) as scratch:
        (scratch / "partial.txt").write_text("half")
        (scratch / "sub").mkdir()
        raise RuntimeError("half-way")

    assert _tree(final) == before
    assert not scratch.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_leaves_nothing_when_first_run_fails(tmp_path):
    with pytest.raises(KeyError), atomic_dir(tmp_path / "out") as scratch:
        (scratch / "x").write_text("x")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_output_is_readable_like_any_new_directory(tmp_path):
    # tempfile.mkdtemp makes 0o700 folders; the finished output should follow the umask instead
    reference = tmp_path / "reference"
    reference.mkdir()
    with atomic_dir(tmp_path / "out") as scratch:
        (scratch / "x").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_atomic_dir_killed_while_discarding_the_old_output_leaves_the_whole_new_one(tmp_path, monkeypatch):
    """The old output is renamed away before it is deleted: never a half-deleted folder at ``final``."""
    final = tmp_path / "out"
    final.mkdir()
    for name in ("a", "b", "c"):
        (final / name).write_text("old")

    def killed_half_way(path, *args, **kwargs):
        next(Path(path).iterdir()).unlink()  # one file of the old output gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as scratch:
        for name in ("a", "b", "c"):
            (scratch / name).write_text("new")
    monkeypatch.undo()
    assert _tree(final) == {"a": b"new", "b": b"new", "c": b"new"}


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(proc.stdout)  # reaped by run(): no process has this id now (barring reuse)


def test_atomic_dir_sweeps_scratch_left_by_killed_runs_only(tmp_path):
    final = tmp_path / "raw"
    dead, alive = _dead_pid(), os.getppid()
    left_behind = [tmp_path / f".raw.{dead}-00aa11bb22cc", tmp_path / f".raw.{dead}-00aa11bb22cc.old"]
    kept = [
        tmp_path / f".raw.{alive}-00aa11bb22cc",
        tmp_path / f".rawer.{dead}-00aa11bb22cc",
        tmp_path / ".raw.x",
    ]
    for folder in left_behind + kept:
        folder.mkdir()
        (folder / "half.png").write_bytes(b"\x89PNG")
    with atomic_dir(final) as scratch:
        (scratch / "manifest.csv").write_text("path\n")
    assert not any(p.exists() for p in left_behind)
    assert all(p.exists() for p in kept)  # a live writer's scratch, another output's, a stranger's
    assert _tree(final) == {"manifest.csv": b"path\n"}


def test_writers_are_atomic_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"n": 1})
    before = path.read_bytes()

    def full_disk(self, rows):  # the disk fills half-way through the file
        self.writer.writerow(["half"])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        write_csv(tmp_path / "m.csv", [{"path": "x"}], ["path"])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "m.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no m.csv, no temporary file

    monkeypatch.setattr(Path, "write_text", _raising_after_half)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"n": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _raising_after_half(self, text, *args, **kwargs):
    with open(self, "w", encoding="utf-8") as fh:
        fh.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")
