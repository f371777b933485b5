"""Unpacking dataset archives without trusting them.

Unpacking checks every member itself (path, type, count, bytes actually written)
instead of relying on ``tarfile``/``zipfile`` defaults, because an archive from
the internet may be hostile (path traversal, links, zip bombs) or merely broken.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tlpipe.core.errors import PipelineError

CHUNK_BYTES = 1 << 20  # how much of a member is read and written at a time
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip


@dataclass
class _Budget:
    """What an archive may still use; every member and every written chunk is charged."""

    archive: Path
    max_bytes: int
    max_members: int
    members: int = 0
    written: int = 0

    def charge_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise _refused(self.archive, name, f"more than max_members={self.max_members} members")

    def charge_bytes(self, name: str, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise _refused(
                self.archive,
                name,
                f"the extracted bytes exceed max_bytes={self.max_bytes} (possible zip bomb)",
            )


def extract_archive(archive: Path, dest: Path, *, max_bytes: int, max_members: int) -> Path:
    """Unpack a .zip, .tar, .tar.gz or .tgz (recognised by content) into ``dest``.

    Absolute paths, ``..`` components, links, devices and fifos are refused, and so
    is an archive past ``max_members`` members or ``max_bytes`` extracted bytes
    (counted as written, not taken from headers). On any refusal or error nothing
    stays: members go to a scratch folder that becomes ``dest`` only at the end.
    ``dest`` must not exist yet, or be an empty folder.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise PipelineError(f"{archive}: no such archive")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PipelineError(f"{dest}: already exists and is not an empty folder; extract into a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = dest.parent / f".{dest.name}.extracting-{secrets.token_hex(6)}"
    scratch.mkdir()
    try:
        budget = _Budget(archive, max_bytes=max_bytes, max_members=max_members)
        if _is_zip(archive):
            _extract_zip(archive, scratch, budget)
        else:
            _extract_tar(archive, scratch, budget)
        if dest.exists():
            dest.rmdir()  # empty (checked above); rename onto a folder is not portable
        os.replace(scratch, dest)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return dest


def _is_zip(archive: Path) -> bool:
    with open(archive, "rb") as fh:
        return fh.read(4) in _ZIP_MAGIC


def _refused(archive: Path, member: str, reason: str) -> PipelineError:
    return PipelineError(
        f"{archive}: refused member {member!r}: {reason}; nothing was extracted (partial output removed)"
    )


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The member's path components, or a refusal when it could land outside the folder."""
    # a backslash is a separator for Windows tools that wrote the archive and for a Windows
    # extractor, so "..\\x" and "\\x" are treated as the traversals they would be there
    text = name.replace("\\", "/")
    if text.startswith("/"):
        raise _refused(archive, name, "absolute path")
    if _WINDOWS_DRIVE.match(text):
        raise _refused(archive, name, "absolute path (Windows drive)")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refused(archive, name, "'..' in the path (path traversal)")
    return parts


def _target(root: Path, parts: tuple[str, ...], archive: Path, name: str) -> Path:
    target = root.joinpath(*parts)
    # redundant while no link is ever created, and cheap: keep it should that change
    if not target.resolve().is_relative_to(root.resolve()):
        raise _refused(archive, name, "resolves outside the destination")
    return target


def _write_member(stream: IO[bytes], target: Path, budget: _Budget, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := stream.read(CHUNK_BYTES):
            budget.charge_bytes(name, len(chunk))  # before the write: never more than max_bytes on disk
            out.write(chunk)


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise PipelineError(f"{archive}: not a readable zip archive: {err}") from None
    with zf, _member_errors(archive) as current:
        infos = zf.infolist()
        # the central directory lists every member: refuse before writing anything
        if len(infos) > budget.max_members:
            reason = f"more than max_members={budget.max_members} members"
            raise _refused(archive, infos[budget.max_members].filename, reason)
        for info in infos:
            current.member = info.filename
            _extract_zip_member(zf, info, root, budget)


def _extract_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, budget: _Budget) -> None:
    archive = budget.archive
    budget.charge_member(info.filename)
    parts = _member_parts(archive, info.filename)
    _check_zip_type(archive, info)
    target = _target(root, parts, archive, info.filename)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    if not parts:
        raise _refused(archive, info.filename, "empty file name")
    with zf.open(info) as stream:
        _write_member(stream, target, budget, info.filename)


@dataclass
class _Current:
    member: str = "(archive header)"


@contextmanager
def _member_errors(archive: Path) -> Iterator[_Current]:
    """Turn a library error while unpacking into a PipelineError naming the member.

    The caller keeps the yielded ``member`` up to date as it goes.
    """
    current = _Current()
    try:
        yield current
    except PipelineError:
        raise
    except Exception as err:  # bad CRC, truncated gzip, encryption, disk full...: all one message
        raise PipelineError(
            f"{archive}: cannot extract {current.member!r}: {type(err).__name__}: {err}; "
            "nothing was extracted (partial output removed)"
        ) from None


def _check_zip_type(archive: Path, info: zipfile.ZipInfo) -> None:
    # Unix zip tools keep st_mode in the high 16 bits; 0 means "not recorded" (plain file or folder)
    kind = stat.S_IFMT(info.external_attr >> 16)
    reasons = {
        stat.S_IFLNK: "symlink",
        stat.S_IFCHR: "device",
        stat.S_IFBLK: "device",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
    }
    if kind in reasons:
        raise _refused(archive, info.filename, f"{reasons[kind]} members are not allowed")


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as err:
        raise PipelineError(f"{archive}: not a .zip, .tar, .tar.gz or .tgz archive ({err})") from None
    with tf, _member_errors(archive) as current:
        for member in tf:  # one header at a time: a limit stops the reading at once
            current.member = member.name
            _extract_tar_member(tf, member, root, budget)


def _extract_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, root: Path, budget: _Budget) -> None:
    archive = budget.archive
    budget.charge_member(member.name)
    parts = _member_parts(archive, member.name)
    _check_tar_type(archive, member)
    target = _target(root, parts, archive, member.name)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    if not parts:
        raise _refused(archive, member.name, "empty file name")
    # a tar header's size is exactly what extractfile yields, so a member that cannot fit is
    # refused before any of it is written; the count while writing still applies
    if budget.written + member.size > budget.max_bytes:
        budget.charge_bytes(member.name, member.size)
    stream = tf.extractfile(member)
    if stream is None:
        raise _refused(archive, member.name, "has no data")
    with stream:
        _write_member(stream, target, budget, member.name)


def _check_tar_type(archive: Path, member: tarfile.TarInfo) -> None:
    if member.isreg() or member.isdir():
        return
    if member.issym():
        reason = f"symlink (to {member.linkname!r})"
    elif member.islnk():
        reason = f"hardlink (to {member.linkname!r})"
    elif member.ischr() or member.isblk():
        reason = "device"
    elif member.isfifo():
        reason = "fifo"
    else:
        reason = f"unsupported member type {member.type!r}"
    raise _refused(archive, member.name, f"{reason} members are not allowed")
