"""Hash-pinned downloads: a file is used only when it matches its pinned hash.

It appears at its final path only then: a crash, a dropped connection or a wrong
file never leaves something that a later run could mistake for a finished download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
