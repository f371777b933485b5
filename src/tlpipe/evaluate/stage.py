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
from tlpipe.evaluate.decide import CALIBRATION_METRICS, calibrate_oof, calibration_document, fit_decision
from tlpipe.evaluate.document import evaluation_metrics
from tlpipe.evaluate.metrics import calibration_table, pr_points, roc_points
from tlpipe.evaluate.rules import compare_rules
from tlpipe.evaluate.shift import shift_document
from tlpipe.evaluate.thresholds import operating_points
from tlpipe.model.guard import GUARD_COLUMNS, Guard, guard_columns

if TYPE_CHECKING:
    from tlpipe.data.datasets import SplitData
    from tlpipe.model.decision import Decided
    from tlpipe.model.oof_file import OutOfFold

logger = logging.getLogger(__name__)

# settings echoed in metrics.json for readers of that file; MLflow has them as params already
_NOT_LOGGED = ("ci_level", "bootstrap_resamples", "confusion_matrix")
# what MLflow gets of each operating point (metrics.json has them whole)
OPERATING_POINT_LOGGED = (
    "value",
    "val_sensitivity",
    "val_specificity",
    "oof_sensitivity",
    "oof_specificity",
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
        elif key == "shift":
            flat |= {
                f"shift.{k}": float(value[k])
                for k in ("scores_ks_statistic", "largest_prior_gap", "test_unlike_val")
            }
        elif key == "calibration":
            flat["calibration.temperature"] = value["temperature"]
            for phase in ("before", "after"):
                flat |= {f"calibration.{phase}.{k}": value[phase][k] for k in CALIBRATION_METRICS}
        elif key == "decision_rules":
            for rule, figures in value.items():
                flat |= {f"{key}.{rule}.{k}": v for k, v in figures.items() if _is_number(v)}
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


def prediction_fields(names: list[str]) -> tuple[str, ...]:
    probabilities = (*[f"p_{c}" for c in names], *[f"raw_p_{c}" for c in names])
    return ("path", "label", "predicted", *probabilities, *GUARD_COLUMNS)


def prediction_rows(
    data: SplitData, decided: Decided, names: list[str], scores: np.ndarray | None, guard: Guard | None
) -> Iterator[dict]:
    """predictions.csv rows: each image's path, label, decided class, calibrated and raw probabilities,
    and whether the guard finds it unfamiliar (blank without a guard)."""
    rows = zip(data.rel_paths, data.labels, decided.labels, decided.probabilities, decided.raw, strict=True)
    for k, (path, label, pred, probs, raw) in enumerate(rows):
        yield {
            "path": path,
            "label": names[label],
            "predicted": names[pred],
            **{f"p_{c}": float(v) for c, v in zip(names, probs, strict=True)},
            **{f"raw_p_{c}": float(v) for c, v in zip(names, raw, strict=True)},
            **({} if scores is None or guard is None else guard_columns(guard, float(scores[k]))),
        }


def write_outputs(
    scratch: Path,
    test: SplitData,
    decided: Decided,
    metrics: dict,
    names: list[str],
    bins: int,
    scores: np.ndarray | None = None,
    guard: Guard | None = None,
) -> None:
    """metrics.json, predictions, and the confusion, ROC, PR and calibration plot data."""
    probs, y_pred = decided.probabilities, decided.labels
    write_json(scratch / "metrics.json", metrics)
    rows = prediction_rows(test, decided, names, scores, guard)
    write_csv(scratch / "predictions.csv", rows, prediction_fields(names))
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
    # the reliability diagram after calibration, and before it (the model's own probabilities)
    for name, table in (("calibration.csv", probs), ("calibration_raw.csv", decided.raw)):
        write_csv(
            scratch / name,
            calibration_table(test.labels, table, bins),
            ("bin", "confidence", "accuracy", "count"),
        )


def out_of_fold(path: Path | None, classes: list[str], required: bool) -> OutOfFold | None:
    """train-frozen's out-of-fold predictions: an error when the decision needs them and they are not
    there; otherwise None when absent or empty (they then only fill the rule comparison)."""
    from tlpipe.core.errors import PipelineError
    from tlpipe.model.oof_file import read_out_of_fold

    if path is None:
        if required:
            raise PipelineError(
                "evaluate.decision_data: oof needs train-frozen's out-of-fold predictions (--oof FILE)"
            )
        return None
    try:
        return read_out_of_fold(Path(path), classes)
    except (PipelineError, FileNotFoundError):
        if required:
            raise
        return None


def evaluate(
    augmented_dir: Path,
    model_path: Path,
    params: EvaluateParams,
    out_dir: Path,
    backbone_weights: str = "imagenet",
    decision_out: Path | None = None,
    guard_out: Path | None = None,
    oof_path: Path | None = None,
) -> dict:
    """The evaluate stage: the decision fitted by ``params.decision_data`` (on val, or on train-frozen's
    out-of-fold predictions ``oof_path``), saved to ``decision_out`` (default beside the model), then
    metrics.json, plot data and per-image predictions for the test split.

    ``backbone_weights`` (train_frozen.weights) tags the MLflow run as ``tlpipe.weights``,
    so a report can tell a from-scratch baseline (``none``) from a transfer run.
    """
    # imported here: MLflow, TensorFlow and Keras load only when the stage runs
    import mlflow

    from tlpipe.data.datasets import load_augmented
    from tlpipe.evaluate.guarding import guard_for, scored
    from tlpipe.model.decision import decision_path, save_decision
    from tlpipe.model.guard import feature_model, guard_path, save_guard
    from tlpipe.model.storage import load_model
    from tlpipe.serve.pyfunc import log_raw_image_model

    decision_out = decision_path(model_path) if decision_out is None else decision_out
    guard_out = guard_path(model_path) if guard_out is None else guard_out
    data = load_augmented(augmented_dir)
    names = data.classes
    test = data.split("test")
    # val fits the calibration and, for two classes, the threshold; a two-class rule other than fixed
    # cannot do without it (load_augmented then says the split is missing)
    has_val = "val" in data.splits and bool(data.splits["val"].paths)
    needs_val = len(names) == 2 and params.threshold != "fixed"
    val = data.split("val") if has_val or needs_val else None
    model = feature_model(load_model(model_path))  # the class probabilities and the pooled features
    run_params = {**section_dict(params, "evaluate"), "train_frozen.weights": backbone_weights}
    # the model's digest: how `tlpipe promote` finds the run that evaluated it
    run_tags = {C.WEIGHTS_TAG: backbone_weights, C.MODEL_DIGEST_TAG: path_digest(model_path)}
    with tracking.stage_run("evaluate", run_params, tags=run_tags):
        raw_val, val_features = (None, None) if val is None else scored(model, val, params.batch_size)
        oof = out_of_fold(oof_path, names, required=params.decision_data == "oof")
        y_val, val_paths = (None, None) if val is None else (val.labels, val.rel_paths)
        decision, threshold = fit_decision(params, names, y_val, raw_val, oof, val_paths)
        if threshold is not None and threshold["chosen_on"] == "fallback":
            logger.warning("evaluate: warning: threshold 0.5 used: %s", threshold["reason"])
        # the test split is scored only now, through the decision as predict and the served model apply it
        raw_test, test_features = scored(model, test, params.batch_size)
        decided = decision.apply(raw_test)
        probs = decided.probabilities
        guard, metrics_guard, test_scores = guard_for(model, data, val_features, test_features, params)
        calibrated_val = None if val is None or raw_val is None else decision.calibrate(raw_val)
        operating = None
        if len(names) == 2 and decision.chosen_on == "oof" and oof is not None:
            calibrated_oof = calibrate_oof(params, names, oof)[1][:, 1]
            operating = operating_points(params, oof.labels, calibrated_oof, test.labels, probs[:, 1], "oof")
        elif len(names) == 2 and val is not None and calibrated_val is not None:
            operating = operating_points(params, val.labels, calibrated_val[:, 1], test.labels, probs[:, 1])
        metrics = evaluation_metrics(test.labels, probs, names, params, threshold, operating)
        n_val = 0 if val is None else len(val.labels)
        metrics["calibration"] = calibration_document(
            decision,
            n_val,
            test.labels,
            decided.raw,
            metrics,
            params,
            params.decision_data,
            None if oof is None else len(oof.labels),
        )
        if val is not None and raw_val is not None:
            metrics["decision_rules"] = compare_rules(
                params, names, (val.labels, raw_val, val.rel_paths), oof, test.labels, raw_test, decision
            )
        metrics["guard"] = metrics_guard
        if val is not None and calibrated_val is not None:
            metrics["shift"] = shift_document(calibrated_val, val.labels, probs, names)
        with atomic_dir(Path(out_dir)) as scratch:
            write_outputs(scratch, test, decided, metrics, names, params.calibration_bins, test_scores, guard)
        save_decision(decision, Path(decision_out))
        if guard is None:
            Path(guard_out).unlink(missing_ok=True)  # a stale guard must not judge this model's inputs
        else:
            save_guard(guard, Path(guard_out))
        tracking.log_metrics(flat_metrics(metrics))
        tracking.log_pipeline_metrics(flat_metrics(metrics))
        tracking.log_artifact(str(Path(out_dir) / "metrics.json"))
        # the same model taking image files, with its decision: what `mlflow models serve` and the registry get
        served = log_raw_image_model(
            model_path,
            Path(augmented_dir) / "classes.json",
            Path(test.paths[0]).read_bytes(),
            decision_path=Path(decision_out),
            guard_path=None if guard is None else Path(guard_out),
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
