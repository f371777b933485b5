"""Tests for MLflow bookkeeping: the reachability check stages run before any work."""

from __future__ import annotations

import http.server
import threading

import pytest

from tlpipe import tracking
from tlpipe.errors import PipelineError


def test_local_stores_need_no_server() -> None:
    tracking.check_reachable("sqlite:///mlflow.db")
    tracking.check_reachable("file:///tmp/mlruns")


def test_unreachable_server_is_named_with_what_to_do() -> None:
    with pytest.raises(PipelineError) as err:
        tracking.check_reachable("http://127.0.0.1:9", timeout=2)
    message = str(err.value)
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in message
    assert "--host 127.0.0.1" in message and "MLFLOW_TRACKING_URI" in message


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # the http.server API names it
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_answers_health_passes() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
