"""Reading and writing the CSV manifests and JSON files that stages hand each other."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST_FIELDS = ("path", "label", "sha256", "width", "height")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(value: object) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def path_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted).

    Independent of where the folder lies, so the same data copied elsewhere has
    the same digest.
    """
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode() + b"\0" + _file_sha256(file).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_csv(path: Path, rows: Iterable[dict], fields: Iterable[str]) -> None:
    def write(tmp: Path) -> None:
        # utf-8 always: labels are folder names, and the locale's encoding may not hold them
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(path), write)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that produces it first")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_json(path: Path, data: object) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:  # JSON: the caller knows the shape it wrote
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that produces it first")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary name beside ``path``, then rename it into place.

    A kill leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # a half-written file on a full disk only takes more space
        if err.filename is None:  # a failed write() names no file: say which one it was
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` only if the block succeeds.

    A stage killed half-way then leaves either the old output or none, never a
    half-written folder that a later stage could mistake for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(final)
    # a plain mkdir (not tempfile.mkdtemp, which makes it 0o700) so the output gets the umask's mode;
    # the pid in the name tells a later run whether its owner is still at work
    scratch = final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(6)}"
    scratch.mkdir()
    try:
        yield scratch
        _swap_in(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def _swap_in(scratch: Path, final: Path) -> None:
    """Two renames, so that ``final`` is at every moment the whole old output, the whole new one, or absent.

    Deleting the old output in place would leave it half-deleted if the stage were killed meanwhile.
    """
    if not final.exists():
        os.replace(scratch, final)
        return
    old = scratch.with_name(f"{scratch.name}.old")
    os.replace(final, old)
    try:
        os.replace(scratch, final)
    except BaseException:
        os.replace(old, final)
        raise
    _remove(old)


def remove_stale_scratch(final: Path) -> None:
    """Delete the scratch folders of earlier runs killed before they could (SIGKILL, a lost machine).

    Only those whose process is gone: a run still at work keeps its own.
    """
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe only on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-[0-9a-f]+(\.old)?")
    for path in final.parent.glob(f".{glob.escape(final.name)}.*"):
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
