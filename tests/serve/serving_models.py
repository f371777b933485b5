"""A model for serving tests: its output depends on every input pixel, so any decoding difference shows."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import keras

from tlpipe.model import storage

CLASSES = ["normal", "pneumonia", "covid"]
SIZE = 32


def write_pixel_sensitive_model(root: Path) -> tuple[Path, Path]:
    """``model.keras`` and ``classes.json`` in ``root``."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    # flatten, not pooling: a resize, orientation or pixel mapping that differs shows in the output
    hidden = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(hidden))
    storage.save_model_atomically(model, root / "model.keras")
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root / "model.keras", root / "classes.json"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def log_in_store(store: str, model: Path, classes: Path, example: Path) -> str:
    """The raw-image model logged in the tests' store, as ``models:/<model id>``.

    For module-scoped fixtures, which run before conftest's per-test environment.
    """
    import mlflow
    import pytest

    from tlpipe.serve.pyfunc import log_raw_image_model

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "tlpipe-tests")
        mlflow.set_tracking_uri(store)
        mlflow.set_experiment("tlpipe-tests")
        with mlflow.start_run():
            info = log_raw_image_model(model, classes, example.read_bytes())
    return f"models:/{info.model_id}"
