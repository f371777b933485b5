"""The final model as an MLflow pyfunc that classifies raw image files.

``mlflow.pyfunc.load_model(uri).predict(df)`` and ``mlflow models serve -m uri``
take a DataFrame with a column ``image`` holding image files (PNG, JPEG, ...) as
base64 text (or bytes), decode and resize them exactly as ``tlpipe predict``
and the augment stage do, and answer one row per image through the decision the
evaluate stage fitted (``decision.json``): ``predicted``, the calibrated
``p_<class>`` and the model's own ``raw_p_<class>`` per class, the
``operating_point`` with its ``val_sensitivity`` and ``val_specificity``, the
guard's ``unfamiliar`` ("yes", "no"; "" for a model logged without ``guard.npz``)
with its score ``unfamiliarity``, and ``error`` (empty, or why that image could
not be read; its numbers are then NaN). One bad image never fails
the batch. A request to the scoring server::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]}}

It is logged as "models from code" (``pyfunc_model.py``), so nothing is
pickled: loading runs that file, which imports this module, and reads the
Keras model with Keras safe mode. The serving environment must therefore have
tlpipe installed (``pip install`` of this repository); no code is copied into
the model (no ``code_paths``), and the logged pip requirements list only
tlpipe's own dependencies.

The same model class serves a ``tlpipe export`` folder (:func:`log_exported_model`):
the exported network runs in place of Keras, decoding and decision unchanged.
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
from tlpipe.data.pixels import MAX_PIXELS, bytes_pixels
from tlpipe.model.decision import Decision, argmax_decision, load_decision
from tlpipe.model.guard import Guard, feature_model, guard_columns, load_guard
from tlpipe.model.inference import decide
from tlpipe.serve.exported import RUNTIMES, load_export

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


def classify_images(
    model,
    decision: Decision,
    images: Iterable[object],
    guard: Guard | None = None,
    max_pixels: int = MAX_PIXELS,
) -> pd.DataFrame:
    """One row per image: the decided class, calibrated and raw probabilities per class, the operating
    point, whether the guard finds it unfamiliar ("yes", "no"; "" without a guard) with its score, and the
    error, if any. With a guard, ``model`` is the classifier's feature model."""
    classes = decision.classes
    size = int(model.input_shape[1])
    errors: list[str] = []
    pixels: list[np.ndarray] = []
    for value in images:
        try:
            pixels.append(bytes_pixels(image_bytes(value), size, max_pixels))
            errors.append("")
        except Rejected as err:
            errors.append(str(err))
    ok = np.array([not e for e in errors], dtype=bool)
    calibrated = np.full((len(errors), len(classes)), np.nan)
    raw = calibrated.copy()
    labels = np.zeros(len(errors), dtype=np.int64)
    scores = np.full(len(errors), np.nan)
    if pixels:
        decided, found = decide(model, decision, np.stack(pixels), guard)
        calibrated[ok], raw[ok], labels[ok] = decided.probabilities, decided.raw, decided.labels
        if found is not None:
            scores[ok] = found
    flagged = ["" if guard is None or not good else guard_columns(guard, s)["unfamiliar"]
               for s, good in zip(scores, ok, strict=True)]  # fmt: skip
    return pd.DataFrame(
        {
            "predicted": [classes[k] if good else "" for k, good in zip(labels, ok, strict=True)],
            **{f"p_{c}": calibrated[:, k] for k, c in enumerate(classes)},
            **{f"raw_p_{c}": raw[:, k] for k, c in enumerate(classes)},
            **operating_columns(decision, len(errors)),
            "unfamiliar": flagged,
            "unfamiliarity": scores,
            "error": errors,
        }
    )


def operating_columns(decision: Decision, n: int) -> dict[str, list]:
    """The operating point's name and its val sensitivity and specificity, repeated per image."""
    return {k: [float("nan") if v is None else v] * n for k, v in decision.operating_fields().items()}


class RawImageClassifier(PythonModel):
    """The Keras model plus the pipeline's image decoding, as a pyfunc model."""

    def load_context(self, context) -> None:
        from tlpipe.model.storage import load_model  # Keras safe mode

        if "export" in context.artifacts:  # a tlpipe export folder: network, decision and guard in one
            exported = load_export(Path(context.artifacts["export"]))
            self.model, self.decision, self.guard = exported.model, exported.decision, exported.guard
            return
        self.model = load_model(Path(context.artifacts["keras_model"]))
        classes = [str(c) for c in read_json(Path(context.artifacts["classes"]))]
        # models logged before the decision travelled with them answer as they did: raw argmax
        saved = context.artifacts.get("decision")
        self.decision = load_decision(Path(saved)) if saved else argmax_decision(classes)
        guard = context.artifacts.get("guard")
        self.guard = load_guard(Path(guard)) if guard else None
        if self.guard is not None:
            self.model = feature_model(self.model)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return classify_images(self.model, self.decision, model_input[IMAGE_COLUMN], self.guard)


def signature(classes: list[str]):
    """Input: a string column ``image``; output: predicted, p_<class> and raw_p_<class> per class, the
    operating point and its val sensitivity and specificity, error."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [
        ColSpec("string", "predicted"),
        *(ColSpec("double", f"p_{c}") for c in classes),
        *(ColSpec("double", f"raw_p_{c}") for c in classes),
        ColSpec("string", "operating_point"),
        ColSpec("double", "val_sensitivity"),
        ColSpec("double", "val_specificity"),
        ColSpec("string", "unfamiliar"),
        ColSpec("double", "unfamiliarity"),
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([*outputs, ColSpec("string", "error")]),
    )


def serving_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """The model's requirements plus the decoders' (and ``extra`` packages), pinned to the installed versions.

    Given explicitly: MLflow would otherwise infer them in a subprocess that loads
    the model, about ten seconds.
    """
    from importlib.metadata import PackageNotFoundError, version

    from tlpipe.core.tracking import model_requirements

    pins = model_requirements()
    for package in (*DECODING_PACKAGES, *extra):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_raw_image_model(
    model_path: Path,
    classes_path: Path,
    example_image_bytes: bytes,
    name: str = "classifier",
    decision_path: Path | None = None,
    guard_path: Path | None = None,
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
        artifacts={
            "keras_model": str(model_path),
            "classes": str(classes_path),
            **({"decision": str(decision_path)} if decision_path else {}),
            **({"guard": str(guard_path)} if guard_path else {}),
        },
        signature=signature(classes),
        input_example=example,
        pip_requirements=serving_requirements(),
    )


def log_exported_model(export_dir: Path, example_image_bytes: bytes, name: str = "classifier"):
    """Log a ``tlpipe export`` folder as the raw-image pyfunc model in the active MLflow run.

    The folder travels whole as the model's one artifact, so the served model runs the exported network
    through the decision and guard exported with it, and answers with the same columns as the Keras one.
    """
    exported = load_export(Path(export_dir))  # refuses an incomplete folder before anything is logged
    classes = exported.decision.classes
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_bytes).decode("ascii")]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"export": str(export_dir)},
        signature=signature(classes),
        input_example=example,
        pip_requirements=serving_requirements((RUNTIMES[exported.manifest["format"]],)),
    )
