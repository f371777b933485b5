"""Tests for the raw-image pyfunc model: logged as code, loaded by MLflow, served over HTTP."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from serving_models import CLASSES, SIZE, b64, log_in_store, write_pixel_sensitive_model

from augmented_fixture import make_augmented
from tlpipe.core.config import EvaluateParams
from tlpipe.core.constants import LOGGED_MODEL_TAG
from tlpipe.data.pixels import load_pixels
from tlpipe.evaluate.stage import evaluate
from tlpipe.model import storage

ANSWER_COLUMNS = [
    "predicted",
    *(f"p_{c}" for c in CLASSES),
    *(f"raw_p_{c}" for c in CLASSES),
    "operating_point",
    "val_sensitivity",
    "val_specificity",
    "unfamiliar",
    "unfamiliarity",
    "error",
]
SERVER_START_S = 180


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A keras model whose output depends on every pixel, its classes, and two real image files."""
    root = tmp_path_factory.mktemp("serving")
    write_pixel_sensitive_model(root)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "xray.png")
    Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)).save(root / "xray.jpg", quality=90)
    return {"model": root / "model.keras", "classes": root / "classes.json",
            "png": root / "xray.png", "jpg": root / "xray.jpg"}  # fmt: skip


@pytest.fixture(scope="module")
def model_uri(files, mlflow_store) -> str:
    return log_in_store(mlflow_store, files["model"], files["classes"], files["png"])


def _keras_probabilities(files, path: Path) -> np.ndarray:
    model = keras.models.load_model(files["model"])
    return model.predict(load_pixels(path, SIZE)[None], verbose=0)[0].astype(np.float64)


def test_pyfunc_classifies_image_bytes_like_the_keras_model_on_pipeline_pixels(files, model_uri):
    model = mlflow.pyfunc.load_model(model_uri)
    png, jpg = files["png"].read_bytes(), files["jpg"].read_bytes()
    images = [b64(png), b64(jpg), "not base64 at all!", b64(b"GIF89a, but truncated")]
    out = model.predict(pd.DataFrame({"image": images}))

    assert list(out.columns) == ANSWER_COLUMNS
    probs = out[[f"p_{c}" for c in CLASSES]].to_numpy()
    # logged without a decision (as models were before decisions travelled with them): raw and argmax
    np.testing.assert_array_equal(probs, out[[f"raw_p_{c}" for c in CLASSES]].to_numpy())
    assert set(out["operating_point"]) == {"argmax"}
    for row, path in ((0, files["png"]), (1, files["jpg"])):
        expected = _keras_probabilities(files, path)
        np.testing.assert_allclose(probs[row], expected, atol=1e-5)
        assert out["predicted"][row] == CLASSES[int(expected.argmax())]
        assert out["error"][row] == ""
    assert out["error"][2].startswith("not base64")
    assert out["error"][3].startswith("cannot decode image")
    assert list(out["predicted"][2:]) == ["", ""]
    assert np.isnan(probs[2:]).all()


def test_pyfunc_takes_raw_bytes_and_data_urls_too(files, model_uri):
    model = mlflow.pyfunc.load_model(model_uri)
    png = files["png"].read_bytes()
    out = model.predict(pd.DataFrame({"image": [png, "data:image/png;base64," + b64(png)]}))
    assert list(out["error"]) == ["", ""]
    probs = out[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    np.testing.assert_allclose(probs[0], _keras_probabilities(files, files["png"]), atol=1e-5)
    assert out.iloc[0].equals(out.iloc[1].rename(0))


def test_model_is_logged_as_code_with_signature_example_and_pinned_requirements(model_uri):
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    pyfunc = mlflow.models.Model.load(local).flavors["python_function"]
    assert "model_code_path" in pyfunc and "python_model" not in pyfunc  # nothing pickled
    assert not list(local.rglob("*.pkl"))
    signature = mlflow.models.Model.load(local).signature
    assert signature.inputs.to_dict() == [{"type": "string", "name": "image", "required": True}]
    assert signature.outputs.input_names() == ANSWER_COLUMNS
    requirements = (local / "requirements.txt").read_text().split()
    for package in ("keras", "numpy", "pillow", "opencv-python-headless", "albumentations"):
        assert any(r.startswith(f"{package}==") for r in requirements), requirements
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]


def test_evaluate_logs_the_raw_image_model_and_tags_its_id(tmp_path):
    data = make_augmented(tmp_path / "aug", ["red", "green", "blue"], {"test": 2})
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    storage.save_model_atomically(keras.Model(inputs, outputs), tmp_path / "m.keras")
    evaluate(
        data,
        tmp_path / "m.keras",
        EvaluateParams(decision_data="val", bootstrap_resamples=0),
        tmp_path / "out",
    )

    run = mlflow.last_active_run()
    assert run.data.tags["tlpipe.stage"] == "evaluate"
    model = mlflow.pyfunc.load_model(f"models:/{run.data.tags[LOGGED_MODEL_TAG]}")
    expected = list(csv.DictReader(io.StringIO((tmp_path / "out" / "predictions.csv").read_text())))
    images = [b64((data / row["path"]).read_bytes()) for row in expected]
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out["predicted"]) == [row["predicted"] for row in expected]
    columns = ["p_red", "p_green", "p_blue"]
    np.testing.assert_allclose(out[columns].to_numpy(), [[float(r[c]) for c in columns] for r in expected],
                               atol=1e-5)  # fmt: skip


# ---- mlflow models serve ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} in {SERVER_START_S} s:\n{log.read_text()[-5000:]}")


def _stop(server: subprocess.Popen) -> bool:
    """Stop the server's process group (mlflow and the uvicorn it starts); True once none is left."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            server.poll()  # reaps the group leader, which would otherwise linger as a zombie
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
    return False


def test_mlflow_models_serve_answers_an_uploaded_image(files, model_uri, tmp_path):
    port = _free_port()
    # the scoring server is started as `uvicorn` from PATH: the venv's, as in an activated venv
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir(), start_new_session=True,
        )  # fmt: skip
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64(files["jpg"].read_bytes())]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (answer,) = json.loads(response.read())["predictions"]
    finally:
        stopped = _stop(server)
    assert stopped, "a server process outlived the test"
    expected = _keras_probabilities(files, files["jpg"])
    assert answer["error"] == ""
    assert answer["predicted"] == CLASSES[int(expected.argmax())]
    probs = [answer[f"p_{c}"] for c in CLASSES]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_models_logged_before_the_subpackages_still_find_their_class():
    # the code file saved with such a model runs exactly this import when MLflow loads it
    namespace: dict[str, object] = {}
    exec("from tlpipe.serving import RawImageClassifier", namespace)
    from tlpipe.serve.pyfunc import RawImageClassifier

    assert namespace["RawImageClassifier"] is RawImageClassifier
