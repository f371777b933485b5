"""``tlpipe predict``: classify image files with a trained model, as a CSV.

Each image goes through the same steps as the pipeline's test images: decoded
with EXIF orientation, converted to RGB, resized to the model's input size with
the augment stage's interpolation, then fed as raw 0..255 pixels (the model
holds its own preprocessing). A file that cannot be read gets a row with the
reason instead of stopping the run.

The model is a local ``.keras`` file (class names from ``--classes``) or an
MLflow model URI such as ``models:/tlpipe-classifier@champion``: the raw-image
pyfunc model that the evaluate stage logs (:mod:`tlpipe.serve.pyfunc`), which is
sent the files' bytes and names its classes itself; or a folder written by
``tlpipe export`` (:mod:`tlpipe.serve.exported`), run like the ``.keras`` file
with its own decision and guard.
"""

from __future__ import annotations

import argparse
import base64
import csv
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from tlpipe.core.dicom import HEAD_BYTES, is_dicom, is_dicom_file
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_json
from tlpipe.core.images import IMAGE_EXTENSIONS, Rejected
from tlpipe.data.pixels import load_pixels
from tlpipe.model.decision import (
    DECISION_FILE,
    OPERATING_COLUMNS,
    Decision,
    argmax_decision,
    decision_path,
    load_decision,
)
from tlpipe.model.guard import GUARD_COLUMNS, Guard, feature_model, guard_columns, guard_path, load_guard
from tlpipe.serve.exported import is_export, load_export

BATCH = 32
DEFAULT_MODEL = "models/model.keras"
DEFAULT_CLASSES = Path("data/augmented/classes.json")

Loaded = TypeVar("Loaded")  # what a file is read into: pixels, or its bytes for a served model
logger = logging.getLogger(__name__)


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and the image files under the given folders (sorted, recursively): those with
    an image extension, and DICOM files whatever their name (``scan``, ``x.IMA``)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and _looks_like_image(p))
        else:
            found.append(path)  # named explicitly: a missing or odd file is reported, not skipped
    return found


def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        return is_dicom_file(path)
    except OSError:
        return False  # unreadable and without an image extension: not one of the folder's images


def _batched_rows(
    files: Sequence[Path],
    load: Callable[[Path], Loaded],
    classify: Callable[[list[tuple[Path, Loaded]]], Iterator[dict]],
    progress: bool,
) -> Iterator[dict]:
    """Rows in the files' order: loaded one by one, classified BATCH at a time, unreadable ones with the reason."""
    pending: list[tuple[Path, Loaded | Rejected]] = []
    with tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr) as bar:
        for path in files:
            try:
                pending.append((path, load(path)))
            except Rejected as err:
                pending.append((path, err))
            bar.update(1)
            if len(pending) == BATCH:
                yield from _flush(pending, classify)
                pending = []
        yield from _flush(pending, classify)


def _flush(
    pending: list[tuple[Path, Loaded | Rejected]],
    classify: Callable[[list[tuple[Path, Loaded]]], Iterator[dict]],
) -> Iterator[dict]:
    readable = [(path, item) for path, item in pending if not isinstance(item, Rejected)]
    classified = classify(readable) if readable else iter(())
    for path, item in pending:
        if isinstance(item, Rejected):
            yield {"path": str(path), "predicted": "", "error": str(item)}
        else:
            yield next(classified)


def output_fields(classes: list[str]) -> list[str]:
    """The CSV's columns: what the served model answers, with the file's path first."""
    return [
        "path",
        "predicted",
        *(f"p_{c}" for c in classes),
        *(f"raw_p_{c}" for c in classes),
        *OPERATING_COLUMNS,
        *GUARD_COLUMNS,
        "error",
    ]


def predict_rows(
    model, files: Sequence[Path], decision: Decision, progress: bool, guard: Guard | None = None
) -> Iterator[dict]:
    """One CSV row per file with a Keras model, through its decision: the decided class, calibrated and
    raw probabilities, the operating point, and with a guard whether the image is unfamiliar; or the
    reason the file could not be read. With a guard, ``model`` is the classifier's feature model."""
    size = int(model.input_shape[1])
    classes = decision.classes

    def classify(batch: list[tuple[Path, np.ndarray]]) -> Iterator[dict]:
        from tlpipe.model.inference import decide  # TensorFlow: only once there is something to classify

        decided, scores = decide(model, decision, np.stack([pixels for _, pixels in batch]), guard)
        operating = _operating(decision)
        answers = zip(batch, decided.labels, decided.probabilities, decided.raw, strict=True)
        for k, ((path, _), label, probs, raw) in enumerate(answers):
            yield {
                "path": str(path),
                "predicted": classes[int(label)],
                "error": "",
                **{f"p_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
                **{f"raw_p_{c}": float(p) for c, p in zip(classes, raw, strict=True)},
                **operating,
                **({} if guard is None or scores is None else guard_columns(guard, float(scores[k]))),
            }

    return _batched_rows(files, lambda path: load_pixels(path, size), classify, progress)


# ---- models logged to MLflow ----------------------------------------------------------------


def is_mlflow_model(model: str | Path) -> bool:
    """A model URI (``models:/...``, ``runs:/...``, ...) or a local MLflow model folder."""
    text = str(model)
    # two or more letters before ":/" so that a Windows drive ("C:/...") stays a path
    return bool(re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text)) or (Path(text) / "MLmodel").is_file()


def load_logged_model(uri: str):
    """The pyfunc model behind ``uri``, from the tracking store tlpipe uses; PipelineError if absent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlpipe.core.tracking import tracking_uri

    store = tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as err:
        reason = str(getattr(err, "message", err)).strip().splitlines()[0]
        raise PipelineError(f"cannot load model {uri} (MLflow tracking URI {store}): {reason}") from None


def logged_classes(model, uri: str) -> list[str]:
    """The class names a raw-image model declares in its output signature (``p_<class>`` columns)."""
    schema = model.metadata.get_output_schema()
    names = schema.input_names() if schema is not None else []
    classes = [str(n)[2:] for n in names if str(n).startswith("p_")]
    if "predicted" not in names or not classes:
        raise PipelineError(
            f"{uri} is not a raw-image classifier (its output signature has no predicted and "
            "p_<class> columns); log one with tlpipe.serve.pyfunc.log_raw_image_model"
        )
    return classes


def file_bytes(path: Path) -> bytes:
    """A file's bytes for a logged model, with the checks a local model's decoding makes first."""
    if not path.is_file():
        raise Rejected("no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Rejected(f"cannot read file: {err.strerror or err}") from None
    suffix = path.suffix.lower()
    if suffix and suffix not in IMAGE_EXTENSIONS and not is_dicom(data[:HEAD_BYTES]):
        raise Rejected(f"not an image extension ({suffix})")
    return data


def _operating(decision: Decision) -> dict[str, object]:
    return {k: "" if v is None else v for k, v in decision.operating_fields().items()}


def logged_model_rows(model, files: Sequence[Path], classes: list[str], progress: bool) -> Iterator[dict]:
    """One CSV row per file with a logged raw-image model, which is sent each batch's bytes; a model
    logged before decisions travelled with models has no raw or operating-point columns."""
    import pandas as pd

    from tlpipe.serve.pyfunc import IMAGE_COLUMN

    def classify(batch: list[tuple[Path, bytes]]) -> Iterator[dict]:
        images = [base64.b64encode(data).decode("ascii") for _, data in batch]
        out = model.predict(pd.DataFrame({IMAGE_COLUMN: images}))
        for (path, _), row in zip(batch, out.to_dict("records"), strict=True):
            error = str(row.get("error") or "")
            numbers = [f"p_{c}" for c in classes] + [f"raw_p_{c}" for c in classes]
            scores = {} if error else {k: float(row[k]) for k in numbers if k in row}
            extra = (*OPERATING_COLUMNS, *GUARD_COLUMNS)
            operating = {} if error else {k: _blank_nan(row[k]) for k in extra if k in row}
            yield {
                "path": str(path),
                "predicted": "" if error else row["predicted"],
                "error": error,
                **scores,
                **operating,
            }

    return _batched_rows(files, file_bytes, classify, progress)


# ---- the command ----------------------------------------------------------------------------


def _blank_nan(value: object) -> object:
    return "" if isinstance(value, float) and value != value else value


def local_decision(model: Path, classes: list[str], decision_file: Path | None) -> Decision:
    """The decision saved beside a ``.keras`` model (or at ``decision_file``), checked against its classes.

    A model without one answers with its raw probabilities and the argmax, and the log says so.
    """
    path = decision_file or decision_path(model)
    if decision_file is None and not path.is_file():
        logger.warning(
            "tlpipe predict: no %s beside %s: raw probabilities and the most probable class, "
            "not the calibrated decision evaluate measured", DECISION_FILE, model,
        )  # fmt: skip
        return argmax_decision(classes)
    decision = load_decision(path)
    if decision.classes != list(classes):
        raise PipelineError(f"{path} is for classes {decision.classes}, the model's are {classes}")
    return decision


def predict(
    model: str | Path,
    paths: Sequence[str],
    classes_path: Path | None,
    out,
    decision_file: Path | None = None,
) -> tuple[int, int]:
    """Write the CSV to ``out``; returns (classified, unreadable).

    ``model`` is a ``.keras`` file (``classes_path`` names its classes; default
    data/augmented/classes.json; its decision is ``decision_file``, default the
    ``decision.json`` beside it), a ``tlpipe export`` folder or an MLflow model URI,
    which carry both (``classes_path`` and ``decision_file`` must be None).
    """
    carries_own = is_mlflow_model(model) or is_export(model)
    if carries_own and (classes_path is not None or decision_file is not None):
        raise PipelineError(f"--classes and --decision are for a .keras model; {model} carries its own")
    files = image_files(paths)
    if not files:
        raise PipelineError(f"no image files in {', '.join(map(str, paths))}")
    progress = any(Path(p).is_dir() for p in paths)
    if is_mlflow_model(model):
        loaded = load_logged_model(str(model))
        classes = logged_classes(loaded, str(model))
        rows = logged_model_rows(loaded, files, classes, progress)
    elif is_export(model):
        exported = load_export(Path(model))
        classes = exported.decision.classes
        rows = predict_rows(exported.model, files, exported.decision, progress, exported.guard)
    else:
        from tlpipe.model.storage import load_model

        classes = read_json(classes_path or DEFAULT_CLASSES)
        decision = local_decision(Path(model), classes, decision_file)
        keras_model = load_model(Path(model))
        guard_file = guard_path(Path(model))
        guard = load_guard(guard_file) if guard_file.is_file() else None
        if guard is not None:
            keras_model = feature_model(keras_model)
        rows = predict_rows(keras_model, files, decision, progress, guard)
    writer = csv.DictWriter(out, fieldnames=output_fields(classes), lineterminator="\n")
    writer.writeheader()
    done = failed = 0
    for row in rows:
        writer.writerow(row)
        failed += bool(row["error"])
        done += not row["error"]
    return done, failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a .keras file (default: {DEFAULT_MODEL}), a folder written by tlpipe export, or an MLflow "
        "model URI, e.g. models:/tlpipe-classifier@champion, models:/NAME/3, models:/m-..., runs:/RUN_ID/classifier",
    )
    parser.add_argument(
        "--classes",
        type=Path,
        default=None,
        help=f"class names of a .keras model (default: {DEFAULT_CLASSES}); not for an export or a model URI",
    )
    parser.add_argument(
        "--decision",
        type=Path,
        default=None,
        help="the calibration and decision rule of a .keras model (default: decision.json beside it, "
        "written by the evaluate stage); not for an export or a model URI",
    )
    parser.add_argument("--out", type=Path, default=None, help="CSV file (default: standard output)")


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        done, failed = predict(args.model, args.paths, args.classes, sys.stdout, args.decision)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as fh:
            done, failed = predict(args.model, args.paths, args.classes, fh, args.decision)
    note = f"; {failed} unreadable (see the error column)" if failed else ""
    logger.info("tlpipe predict: %d images classified%s", done, note)
    return 0
