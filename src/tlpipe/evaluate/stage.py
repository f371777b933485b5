"""The evaluate stage: test-split metrics.json, plot data and predictions, logged to MLflow.

For two classes the decision threshold is chosen on the val split (see
:mod:`tlpipe.evaluate.thresholds`); the test split is only measured.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlpipe.core import constants as C
from tlpipe.core import tracking
from tlpipe.core.config import EvaluateParams, section_dict
from tlpipe.core.files import atomic_dir, path_digest, write_csv, write_json
from tlpipe.evaluate.document import evaluation_metrics
from tlpipe.evaluate.metrics import calibration_table, pr_points, roc_points
from tlpipe.evaluate.thresholds import choose_threshold, operating_points, predicted_labels

if TYPE_CHECKING:
    import keras

    from tlpipe.data.datasets import SplitData

logger = logging.getLogger(__name__)

# settings echoed in metrics.json for readers of that file; MLflow has them as params already
_NOT_LOGGED = ("ci_level", "bootstrap_resamples", "confusion_matrix")
# what MLflow gets of each operating point (metrics.json has them whole)
OPERATING_POINT_LOGGED = (
    "value",
    "val_sensitivity",
    "val_specificity",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
)


# ------------------------------------------------------------------ MLflow


def metric_key(name: str) -> str:
    """A class name as part of an MLflow metric name, which allows only ``\\w``, ``-``, ``.`` and space.

    Class names are folder names ("c++", "pepper (red)"): logged as they are, MLflow
    would reject them and fail the stage after its outputs were written.
    """
    return re.sub(r"[^\w\-. ]", "_", name)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Scalar metrics as flat dotted names (``at_0.5.accuracy``, ``ci.roc_auc.low``), for MLflow.

    Undefined metrics (None) and text (the threshold rule) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key in _NOT_LOGGED:
            continue
        if key == "per_class":
            for cls, values in value.items():
                for name, number in values.items():
                    flat[f"{metric_key(cls)}.{name}"] = number
        elif key == "ci":
            for name, interval in value.items():
                if interval is not None:
                    flat[f"ci.{name}.low"], flat[f"ci.{name}.high"] = interval["low"], interval["high"]
        elif key == "operating_points":
            for name, point in value.items():
                logged = (k for k in OPERATING_POINT_LOGGED if _is_number(point.get(k)))
                flat |= {f"{key}.{name}.{k}": point[k] for k in logged}
        elif isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items() if _is_number(v)}
        elif _is_number(value):
            flat[key] = value
    return flat


# ------------------------------------------------------------------ the stage


def predict_probabilities(model: keras.Model, data: SplitData, batch_size: int) -> np.ndarray:
    """The (n, n_classes) class probabilities of a split's images, in manifest order."""
    # imported here: TensorFlow loads only when the stage runs, not when the metrics are imported
    from tlpipe.data.datasets import image_dataset
    from tlpipe.model.inference import probabilities

    return probabilities(model, image_dataset(data, batch_size, with_labels=False))


def prediction_rows(
    data: SplitData, probs: np.ndarray, y_pred: np.ndarray, names: list[str]
) -> Iterator[dict]:
    """predictions.csv rows: each image's path, label, predicted class and class probabilities."""
    for path, label, pred, row in zip(data.rel_paths, data.labels, y_pred, probs, strict=True):
        yield {
            "path": path,
            "label": names[label],
            "predicted": names[pred],
            **{f"p_{c}": float(v) for c, v in zip(names, row, strict=True)},
        }


def write_outputs(
    scratch: Path,
    test: SplitData,
    probs: np.ndarray,
    y_pred: np.ndarray,
    metrics: dict,
    names: list[str],
    bins: int,
) -> None:
    """metrics.json, predictions, and the confusion, ROC, PR and calibration plot data."""
    write_json(scratch / "metrics.json", metrics)
    write_csv(
        scratch / "predictions.csv",
        prediction_rows(test, probs, y_pred, names),
        ("path", "label", "predicted", *[f"p_{c}" for c in names]),
    )
    write_csv(
        scratch / "confusion.csv",
        ({"actual": names[t], "predicted": names[p]} for t, p in zip(test.labels, y_pred, strict=True)),
        ("actual", "predicted"),
    )
    # the folders exist even when no curve can be drawn: DVC expects every declared output
    for folder, curves, fields in (
        ("roc", roc_points(test.labels, probs, names), ("fpr", "tpr")),
        ("pr", pr_points(test.labels, probs, names), ("recall", "precision")),
    ):
        (scratch / folder).mkdir()
        for cls, points in curves.items():
            write_csv(scratch / folder / f"{cls}.csv", points, fields)
    write_csv(
        scratch / "calibration.csv",
        calibration_table(test.labels, probs, bins),
        ("bin", "confidence", "accuracy", "count"),
    )


def evaluate(
    augmented_dir: Path,
    model_path: Path,
    params: EvaluateParams,
    out_dir: Path,
    backbone_weights: str = "imagenet",
) -> dict:
    """The evaluate stage: metrics.json, plot data and per-image predictions for the test split.

    ``backbone_weights`` (train_frozen.weights) tags the MLflow run as ``tlpipe.weights``,
    so a report can tell a from-scratch baseline (``none``) from a transfer run.
    """
    # imported here: MLflow, TensorFlow and Keras load only when the stage runs
    import mlflow

    from tlpipe.data.datasets import load_augmented
    from tlpipe.model.storage import load_model
    from tlpipe.serve.pyfunc import log_raw_image_model

    data = load_augmented(augmented_dir)
    names = data.classes
    test = data.split("test")
    # only two classes have a threshold to choose; a rule other than fixed needs val, the operating
    # points use it when it is there
    has_val = "val" in data.splits and bool(data.splits["val"].paths)
    val = data.split("val") if len(names) == 2 and (params.threshold != "fixed" or has_val) else None
    model = load_model(model_path)
    run_params = {**section_dict(params, "evaluate"), "train_frozen.weights": backbone_weights}
    # the model's digest: how `tlpipe promote` finds the run that evaluated it
    run_tags = {C.WEIGHTS_TAG: backbone_weights, C.MODEL_DIGEST_TAG: path_digest(model_path)}
    with tracking.stage_run("evaluate", run_params, tags=run_tags):
        probs = predict_probabilities(model, test, params.batch_size)
        threshold = operating = None
        if len(names) == 2:
            p_val = None if val is None else predict_probabilities(model, val, params.batch_size)[:, 1]
            threshold = choose_threshold(params, None if val is None else val.labels, p_val)
            if threshold["chosen_on"] == "fallback":
                logger.warning("evaluate: warning: threshold 0.5 used: %s", threshold["reason"])
            if val is not None and p_val is not None:
                operating = operating_points(params, val.labels, p_val, test.labels, probs[:, 1])
        metrics = evaluation_metrics(test.labels, probs, names, params, threshold, operating)
        y_pred = predicted_labels(probs, None if threshold is None else threshold["value"])
        with atomic_dir(Path(out_dir)) as scratch:
            write_outputs(scratch, test, probs, y_pred, metrics, names, params.calibration_bins)
        tracking.log_metrics(flat_metrics(metrics))
        tracking.log_pipeline_metrics(flat_metrics(metrics))
        tracking.log_artifact(str(Path(out_dir) / "metrics.json"))
        # the same model taking image files: what `mlflow models serve` and the registry get
        served = log_raw_image_model(
            model_path, Path(augmented_dir) / "classes.json", Path(test.paths[0]).read_bytes()
        )
        mlflow.set_tag(C.LOGGED_MODEL_TAG, served.model_id)
    logger.info(summary_line(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    """The one line the stage logs: headline test metrics with their intervals, and the threshold."""

    def show(name: str) -> str:
        value = metrics.get(name)
        if value is None:
            return "n/a"
        interval = metrics["ci"].get(name)
        return f"{value:.4f}" + (
            "" if interval is None else f" [{interval['low']:.4f}, {interval['high']:.4f}]"
        )

    parts = [f"accuracy {show('accuracy')}", f"macro F1 {show('macro_f1')}", f"ROC-AUC {show('roc_auc')}"]
    if "threshold" in metrics:
        parts += [f"sensitivity {show('sensitivity')}", f"specificity {show('specificity')}"]
        parts.append(f"at threshold {metrics['threshold']['value']:.4f} ({metrics['threshold']['rule']})")
    return f"evaluate: test {', '.join(parts)} on {metrics['n_test']} images"
