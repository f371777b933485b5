"""Fetching and unpacking dataset archives without trusting them.

A download is used only when it matches its pinned hash, and it appears at its
final path only then: a crash, a dropped connection or a wrong file never leaves
something that a later run could mistake for a finished download.

Unpacking checks every member itself (path, type, count, bytes actually written)
instead of relying on ``tarfile``/``zipfile`` defaults, because an archive from
the internet may be hostile (path traversal, links, zip bombs) or merely broken.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from tqdm import tqdm

from tlpipe.core.errors import PipelineError

ALLOWED_SCHEMES = ("http", "https", "file")
CHUNK_BYTES = 1 << 20
# per blocking socket operation, not for the whole transfer: a stalled server fails
# the stage instead of hanging it, while a slow but steady one still finishes
TIMEOUT_S = 60.0
_HEX_DIGITS = {"sha256": 64, "md5": 32}
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip

# ------------------------------------------------------------------- fetching


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` (http, https or file) to ``dest``, verified against its hash(es).

    Bytes go to ``dest.part`` and are hashed while they stream; ``dest`` appears
    (atomically) only when every given hash matches. A ``dest`` that already holds
    the pinned content is kept as it is, so a re-run does not download again.
    """
    expected = _expected_hashes(url, sha256=sha256, md5=md5)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in ALLOWED_SCHEMES)
        raise PipelineError(f"{url}: unsupported URL scheme {scheme!r}; allowed: {allowed}")
    dest = Path(dest)
    if dest.is_file():
        if _file_hashes(dest, expected) == expected:
            return dest
        if not _is_the_source(url, scheme, dest):
            dest.unlink()  # not the pinned content: never let it pass for the download
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _open_url(url, scheme) as (stream, total):
            actual = _stream_to_file(stream, part, total, expected, url=url, progress=progress)
        _check_hashes(url, expected, actual)
        os.replace(part, dest)
    except OSError as err:  # reading errors are already PipelineErrors: this is the local disk
        part.unlink(missing_ok=True)
        raise PipelineError(f"{url}: cannot write {part}: {err}") from None
    except BaseException:  # KeyboardInterrupt too: a half download must not stay behind
        part.unlink(missing_ok=True)
        raise
    return dest


def _expected_hashes(url: str, *, sha256: str | None, md5: str | None) -> dict[str, str]:
    expected = {name: value.strip().lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if not expected:
        raise PipelineError(f"{url}: a download must be pinned by its hash (give sha256 or md5)")
    for name, value in expected.items():
        digits = _HEX_DIGITS[name]
        if not re.fullmatch(f"[0-9a-f]{{{digits}}}", value):
            raise PipelineError(f"{url}: {name} must be {digits} hex digits, got {value!r}")
    return expected


def _hashers(names: dict[str, str]) -> dict[str, hashlib._Hash]:
    # usedforsecurity=False: MD5 is an integrity check here, and FIPS systems refuse it otherwise
    return {name: hashlib.new(name, usedforsecurity=False) for name in names}


def _file_hashes(path: Path, expected: dict[str, str]) -> dict[str, str]:
    hashers = _hashers(expected)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _check_hashes(url: str, expected: dict[str, str], actual: dict[str, str]) -> None:
    wrong = [
        f"{name} expected {want}, got {actual[name]}"
        for name, want in expected.items()
        if actual[name] != want
    ]
    if wrong:
        raise PipelineError(
            f"{url}: hash mismatch ({'; '.join(wrong)}); the download was discarded. "
            "The file changed upstream or the transfer was corrupted: check the pinned hash."
        )


@contextmanager
def _open_url(url: str, scheme: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield a readable stream and its size in bytes (None when the server does not say)."""
    if scheme == "file":
        path = _file_url_path(url)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the yield
        except FileNotFoundError:
            raise PipelineError(f"{url}: no such file: {path}") from None
        except OSError as err:
            raise PipelineError(f"{url}: cannot read {path}: {err}") from None
        with fh:
            yield fh, os.fstat(fh.fileno()).st_size
        return
    request = urllib.request.Request(url, headers={"User-Agent": "tlpipe"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise PipelineError(f"{url}: the server answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise PipelineError(f"{url}: cannot connect: {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise PipelineError(f"{url}: cannot connect: {err}") from None
    with response:
        yield response, _content_length(response)


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise PipelineError(f"{url}: a file:// URL must name a local path (file:///path/to/file)")
    return Path(urllib.request.url2pathname(parts.path))


def _is_the_source(url: str, scheme: str, dest: Path) -> bool:
    """Whether a file:// URL names ``dest`` itself, which must then never be deleted."""
    if scheme != "file":
        return False
    try:
        return _file_url_path(url).samefile(dest)
    except (OSError, PipelineError):
        return False


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream_to_file(
    stream: BinaryIO, part: Path, total: int | None, expected: dict[str, str], *, url: str, progress: bool
) -> dict[str, str]:
    """Copy the stream to ``part`` in chunks, hashing as it goes; return the hex digests."""
    hashers = _hashers(expected)
    written = 0
    bar = tqdm(
        total=total,
        desc=part.name.removesuffix(".part"),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
    )
    with bar, open(part, "wb") as out:
        while chunk := _read_chunk(stream, url):
            out.write(chunk)
            for h in hashers.values():
                h.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    # http.client's read(n) returns b"" when the connection closes early instead of raising,
    # so a truncated body is only visible by counting
    if total is not None and written != total:
        raise PipelineError(f"{url}: the transfer ended after {written} of {total} bytes; try again")
    return {name: h.hexdigest() for name, h in hashers.items()}


def _read_chunk(stream: BinaryIO, url: str) -> bytes:
    try:
        return stream.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as err:
        raise PipelineError(f"{url}: the download was interrupted: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------ unpacking


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


def _write_member(stream: BinaryIO, target: Path, budget: _Budget, name: str) -> None:
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
    except Exception as err:  # noqa: BLE001 - bad CRC, truncated gzip, encryption, disk full...
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
