"""Test-split metrics with scikit-learn, written as DVC metrics and plots."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from tlpipe import tracking
from tlpipe.config import EvaluateParams, section_dict
from tlpipe.manifest import atomic_dir, write_csv, write_json


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Headline and per-class metrics from true labels and class probabilities."""
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = np.unique(y_true)
    if len(present) < len(classes):
        # undefined: a one-vs-rest AUC needs positives and negatives of every class;
        # None becomes JSON null (NaN is not valid JSON for strict readers)
        auc = None
    elif len(classes) == 2:
        auc = roc_auc_score(y_true, probs[:, 1])
    else:
        auc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": None if auc is None else float(auc),
        "n_test": len(y_true),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def roc_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, list[dict]]:
    """One-vs-rest ROC curve points per class (just the positive class for two classes)."""
    chosen = [1] if len(classes) == 2 else range(len(classes))
    curves = {}
    for i in chosen:
        positives = y_true == i
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        curves[classes[i]] = [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)]
    return curves


def predict_probabilities(model, data, batch_size: int) -> np.ndarray:
    from tlpipe.datasets import image_dataset
    from tlpipe.training import class_probabilities

    return class_probabilities(model.predict(image_dataset(data, batch_size, with_labels=False), verbose=0))


def metric_key(name: str) -> str:
    """A class name as part of an MLflow metric name, which allows only ``\\w``, ``-``, ``.`` and space.

    Class names are folder names ("c++", "pepper (red)"): logged as they are, MLflow
    would reject them and fail the stage after its outputs were written.
    """
    return re.sub(r"[^\w\-. ]", "_", name)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Scalar metrics as flat names, for MLflow."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for cls, values in metrics["per_class"].items():
        for name, value in values.items():
            flat[f"{metric_key(cls)}.{name}"] = value
    return flat


def evaluate(augmented_dir: Path, model_path: Path, params: EvaluateParams, out_dir: Path) -> dict:
    """The evaluate stage: metrics.json, confusion/ROC plot data and per-image predictions."""
    from tlpipe.datasets import load_augmented
    from tlpipe.training import load_model

    data = load_augmented(augmented_dir)
    test = data.split("test")
    model = load_model(model_path)
    with tracking.stage_run("evaluate", section_dict(params, "evaluate")):
        probs = predict_probabilities(model, test, params.batch_size)
        metrics = classification_metrics(test.labels, probs, data.classes)
        names = data.classes
        with atomic_dir(Path(out_dir)) as scratch:
            write_json(scratch / "metrics.json", metrics)
            write_csv(
                scratch / "confusion.csv",
                (
                    {"actual": names[t], "predicted": names[p]}
                    for t, p in zip(test.labels, probs.argmax(axis=1))
                ),
                ("actual", "predicted"),
            )
            for cls, points in roc_points(test.labels, probs, names).items():
                write_csv(scratch / "roc" / f"{cls}.csv", points, ("fpr", "tpr"))
            write_csv(
                scratch / "predictions.csv",
                (
                    {
                        "path": p,
                        "label": names[t],
                        "predicted": names[row.argmax()],
                        **{f"p_{c}": float(v) for c, v in zip(names, row)},
                    }
                    for p, t, row in zip(test.rel_paths, test.labels, probs)
                ),
                ("path", "label", "predicted", *[f"p_{c}" for c in names]),
            )
        tracking.log_metrics(flat_metrics(metrics))
        tracking.log_artifact(str(Path(out_dir) / "metrics.json"))
    auc = metrics["roc_auc"]
    auc_text = "n/a (a class is missing from the test split)" if auc is None else f"{auc:.4f}"
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"ROC-AUC {auc_text} on {metrics['n_test']} images"
    )
    return metrics
