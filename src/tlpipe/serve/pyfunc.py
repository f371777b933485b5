"""The final model as an MLflow pyfunc that classifies raw image files.

``mlflow.pyfunc.load_model(uri).predict(df)`` and ``mlflow models serve -m uri``
take a DataFrame with a column ``image`` holding image files (PNG, JPEG, ...) as
base64 text (or bytes), decode and resize them exactly as ``tlpipe predict``
and the augment stage do, and answer one row per image: ``predicted``, one
``p_<class>`` probability per class and ``error`` (empty, or why that image
could not be read; its probabilities are then NaN). One bad image never fails
the batch. A request to the scoring server::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]}}

It is logged as "models from code" (``pyfunc_model.py``), so nothing is
pickled: loading runs that file, which imports this module, and reads the
Keras model with Keras safe mode. The serving environment must therefore have
tlpipe installed (``pip install`` of this repository); no code is copied into
the model (no ``code_paths``), and the logged pip requirements list only
tlpipe's own dependencies.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tlpipe.core.files import read_json
from tlpipe.core.images import Rejected
from tlpipe.data.pixels import bytes_pixels
from tlpipe.model.inference import probabilities

IMAGE_COLUMN = "image"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# what decoding needs besides the model's own requirements (tracking.model_requirements)
DECODING_PACKAGES = ("pillow", "pydicom", "opencv-python-headless", "albumentations", "pandas")


def image_bytes(value: object) -> bytes:
    """An image file's bytes from base64 text (a browser's ``data:`` URL too) or bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, str):
        raise Rejected(f"expected base64 text, got {type(value).__name__}")
    text = "".join(value.split())  # base64 tools wrap lines
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Rejected(f"not base64: {err}") from None


def classify_images(model, classes: list[str], images: Iterable[object]) -> pd.DataFrame:
    """One row per image: predicted class, a probability per class and the error, if any."""
    size = int(model.input_shape[1])
    errors: list[str] = []
    pixels: list[np.ndarray] = []
    for value in images:
        try:
            pixels.append(bytes_pixels(image_bytes(value), size))
            errors.append("")
        except Rejected as err:
            errors.append(str(err))
    ok = np.array([not e for e in errors], dtype=bool)
    table = np.full((len(errors), len(classes)), np.nan)
    if pixels:
        table[ok] = probabilities(model, np.stack(pixels), len(classes))
    predicted = [classes[int(row.argmax())] if good else "" for row, good in zip(table, ok, strict=True)]
    return pd.DataFrame(
        {"predicted": predicted, **{f"p_{c}": table[:, k] for k, c in enumerate(classes)}, "error": errors}
    )


class RawImageClassifier(PythonModel):
    """The Keras model plus the pipeline's image decoding, as a pyfunc model."""

    def load_context(self, context) -> None:
        from tlpipe.model.storage import load_model  # Keras safe mode

        self.model = load_model(Path(context.artifacts["keras_model"]))
        self.classes = [str(c) for c in read_json(Path(context.artifacts["classes"]))]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return classify_images(self.model, self.classes, model_input[IMAGE_COLUMN])


def signature(classes: list[str]):
    """Input: a string column ``image``; output: predicted, p_<class> per class, error."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "predicted"), *(ColSpec("double", f"p_{c}") for c in classes)]
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([*outputs, ColSpec("string", "error")]),
    )


def serving_requirements() -> list[str]:
    """The model's requirements plus the decoders', pinned to the installed versions.

    Given explicitly: MLflow would otherwise infer them in a subprocess that loads
    the model, about ten seconds.
    """
    from importlib.metadata import PackageNotFoundError, version

    from tlpipe.core.tracking import model_requirements

    pins = model_requirements()
    for package in DECODING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_raw_image_model(
    model_path: Path, classes_path: Path, example_image_bytes: bytes, name: str = "classifier"
):
    """Log the raw-image pyfunc model in the active MLflow run; returns its ModelInfo.

    ``example_image_bytes`` (an image file's bytes) becomes the input example,
    which MLflow also runs through the logged model once, so a model that
    cannot serve fails here rather than at deployment.
    """
    classes = [str(c) for c in read_json(classes_path)]
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_bytes).decode("ascii")]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"keras_model": str(model_path), "classes": str(classes_path)},
        signature=signature(classes),
        input_example=example,
        pip_requirements=serving_requirements(),
    )
