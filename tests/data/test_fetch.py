"""fetch: hash-pinned fetching over file:// and a local http server, never leaving a partial file."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from archive_fixtures import make_zip, sha256_of

from tlpipe.core.errors import PipelineError
from tlpipe.data import fetch as fetching
from tlpipe.data.fetch import fetch

FILES = {"cats/a.txt": b"meow" * 100, "dogs/b.txt": b"woof" * 50}


# ------------------------------------------------------------------ fetch: file://


def test_wrong_sha256_is_refused_and_leaves_nothing(tmp_path):
    archive = make_zip(tmp_path / "data.zip", FILES)
    wrong = "0" * 64
    dest = tmp_path / "dl" / "data.zip"
    with pytest.raises(PipelineError) as err:
        fetch(archive.as_uri(), dest, sha256=wrong, progress=False)
    message = str(err.value)
    assert wrong in message and sha256_of(archive) in message and archive.as_uri() in message
    assert not dest.exists()
    assert list((tmp_path / "dl").iterdir()) == []  # the .part is gone too


def test_md5_alone_pins_a_download(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"x" * 5000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    assert fetch(src.as_uri(), tmp_path / "copy.bin", md5=md5, progress=False).read_bytes() == b"x" * 5000
    with pytest.raises(PipelineError, match=f"md5 expected {'f' * 32}, got {md5}"):
        fetch(src.as_uri(), tmp_path / "other.bin", md5="f" * 32, progress=False)
    assert not (tmp_path / "other.bin").exists()


def test_both_hashes_must_match(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    with pytest.raises(PipelineError, match="sha256 expected"):
        fetch(src.as_uri(), tmp_path / "dl.bin", sha256="a" * 64, md5=md5, progress=False)
    assert not (tmp_path / "dl.bin").exists()


def test_a_hash_is_required(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"payload")
    with pytest.raises(PipelineError, match="a download must be pinned by its hash"):
        fetch(src.as_uri(), tmp_path / "dl.bin", progress=False)
    with pytest.raises(PipelineError, match="64 hex digits"):
        fetch(src.as_uri(), tmp_path / "dl.bin", sha256="abc", progress=False)


@pytest.mark.parametrize("url", ["ftp://example.org/data.zip", "s3://bucket/data.zip", "data.zip"])
def test_unsupported_scheme(tmp_path, url):
    with pytest.raises(PipelineError, match=r"allowed: http://, https://, file://"):
        fetch(url, tmp_path / "dl.zip", sha256="0" * 64, progress=False)


def test_missing_file_url_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.zip"
    with pytest.raises(PipelineError, match="no such file") as err:
        fetch(missing.as_uri(), tmp_path / "dl.zip", sha256="0" * 64, progress=False)
    assert str(missing) in str(err.value)
    assert not (tmp_path / "dl.zip").exists() and not (tmp_path / "dl.zip.part").exists()


def test_existing_verified_dest_is_kept_and_a_stale_one_replaced(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"good bytes")
    digest = hashlib.sha256(b"good bytes").hexdigest()
    dest = tmp_path / "dl.bin"
    dest.write_bytes(b"stale")
    assert fetch(src.as_uri(), dest, sha256=digest, progress=False).read_bytes() == b"good bytes"
    src.unlink()  # a verified dest no longer needs the source
    assert fetch(src.as_uri(), dest, sha256=digest, progress=False).read_bytes() == b"good bytes"


def test_a_file_url_onto_itself_with_a_wrong_hash_keeps_the_file(tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(b"user data")
    with pytest.raises(PipelineError, match="hash mismatch"):
        fetch(src.as_uri(), src, sha256="0" * 64, progress=False)
    assert src.read_bytes() == b"user data"
    assert list(tmp_path.iterdir()) == [src]


def test_interrupted_copy_leaves_no_part(tmp_path, monkeypatch):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"y" * (3 * fetching.CHUNK_BYTES))
    monkeypatch.setattr(fetching, "CHUNK_BYTES", 1024)
    calls = {"n": 0}
    real_read = fetching._read_chunk

    def flaky_read(stream, url):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_read(stream, url)

    monkeypatch.setattr(fetching, "_read_chunk", flaky_read)
    with pytest.raises(KeyboardInterrupt):
        fetch(src.as_uri(), tmp_path / "dl" / "blob.bin", sha256="0" * 64, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


# ------------------------------------------------------------- fetch: http://


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(handler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    # a proxy from the environment would otherwise be asked for 127.0.0.1
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_http_download_with_progress(tmp_path, capsys):
    www = tmp_path / "www"
    www.mkdir()
    payload = bytes(range(256)) * 4000  # ~1 MB: more than one chunk
    (www / "data.bin").write_bytes(payload)
    with serve(functools.partial(_QuietFiles, directory=str(www))) as base:
        dest = fetch(f"{base}/data.bin", tmp_path / "dl.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    err = capsys.readouterr().err
    assert "dl.bin" in err and "100%" in err  # the bar knew the total from Content-Length


def test_http_error_status(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietFiles, directory=str(www))
    with serve(handler) as base, pytest.raises(PipelineError, match="HTTP 404"):
        fetch(f"{base}/missing.zip", tmp_path / "dl.zip", sha256="0" * 64, progress=False)
    assert not (tmp_path / "dl.zip").exists() and not (tmp_path / "dl.zip.part").exists()


class _ShortBody(http.server.BaseHTTPRequestHandler):
    """Promises 200 000 bytes, sends half of them and closes the connection."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "200000")
        self.end_headers()
        self.wfile.write(b"z" * 100_000)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_http_connection_dropped_half_way(tmp_path):
    dest = tmp_path / "dl.bin"
    digest = hashlib.sha256(b"z" * 200_000).hexdigest()  # the hash of the full body: only length fails
    with serve(_ShortBody) as base, pytest.raises(PipelineError, match="ended after 100000 of 200000 bytes"):
        fetch(f"{base}/data.bin", dest, sha256=digest, progress=False)
    assert list(tmp_path.iterdir()) == []


_release = threading.Event()


class _Stall(http.server.BaseHTTPRequestHandler):
    """Sends the headers and a little data, then goes silent."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"s" * 10)
        self.wfile.flush()
        _release.wait(10)

    def log_message(self, *args) -> None:
        pass


def test_http_stall_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(fetching, "TIMEOUT_S", 0.3)
    _release.clear()
    try:
        with serve(_Stall) as base, pytest.raises(PipelineError, match="interrupted"):
            fetch(f"{base}/data.bin", tmp_path / "dl.bin", sha256="0" * 64, progress=False)
    finally:
        _release.set()
    assert list(tmp_path.iterdir()) == []
