"""Reading and writing the CSV manifests and JSON files that stages hand each other."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
    path.parent.mkdir(parents=True, exist_ok=True)
    # utf-8 always: labels are folder names, and the locale's encoding may not hold them
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that produces it first")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> object:
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
    write(tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` only if the block succeeds.

    A stage killed half-way then leaves either the old output or none, never a
    half-written folder that a later stage could mistake for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not tempfile.mkdtemp, which makes it 0o700) so the output gets the umask's mode
    scratch = final.parent / f".{final.name}.{secrets.token_hex(6)}"
    scratch.mkdir()
    try:
        yield scratch
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
