"""Inputs of the report stage for the tests: metrics.json variants, curves, predictions, histories.

Shared by the test modules of tests/report; the fixtures themselves are in conftest.py.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from PIL import Image

from augmented_fixture import make_augmented
from tlpipe.core.config import parse_params
from tlpipe.report.stage import write_report

ODD = "<b>&fox|ü"  # folder names can hold all of these: escaped in HTML and Markdown, utf-8
CLASSES = ["cat", "dog", ODD]
METRICS = {
    "accuracy": 0.8125,
    "balanced_accuracy": 0.8222,
    "macro_precision": 0.8083,
    "macro_recall": 0.8222,
    "macro_f1": 0.7431,
    "weighted_f1": 0.7470,
    "top_2_accuracy": 0.9375,
    "roc_auc": 0.9012,
    "pr_auc": 0.8456,
    "log_loss": 0.4321,
    "brier": 0.2345,
    "ece": 0.0712,
    "n_test": 16,
    "per_class": {
        "cat": {"precision": 1.0, "recall": 0.6667, "f1": 0.8, "support": 6},
        "dog": {"precision": 0.625, "recall": 1.0, "f1": 0.7692, "support": 5},
        ODD: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5},
    },
    "confusion_matrix": [[4, 2, 0], [0, 5, 0], [0, 1, 4]],
    "ci": {
        "accuracy": {"low": 0.625, "high": 0.9375},
        "balanced_accuracy": {"low": 0.64, "high": 0.95},
        "macro_f1": {"low": 0.55, "high": 0.91},
        "roc_auc": {"low": 0.8, "high": 0.98},
        "pr_auc": None,  # undefined in every resample: shown without an interval
        "log_loss": {"low": 0.3, "high": 0.6},
        "brier": {"low": 0.15, "high": 0.31},
    },
    "ci_level": 0.95,
    "bootstrap_resamples": 1000,
}
BINARY = {
    "accuracy": 0.9,
    "balanced_accuracy": 0.875,
    "sensitivity": 0.95,
    "specificity": 0.8,
    "macro_f1": 0.88,
    "roc_auc": 0.93,
    "pr_auc": 0.94,
    "ece": 0.05,
    "n_test": 30,
    "per_class": {
        "normal": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 10},
        "pneumonia": {"precision": 0.9, "recall": 0.95, "f1": 0.92, "support": 20},
    },
    "confusion_matrix": [[8, 2], [1, 19]],
    "threshold": {
        "rule": "youden",
        "value": 0.3125,
        "chosen_on": "val",
        "n_val": 24,
        "val_sensitivity": 0.9,
        "val_specificity": 0.85,
    },
    "at_0.5": {"accuracy": 0.8667, "balanced_accuracy": 0.85, "sensitivity": 0.85, "specificity": 0.85},
    "ci": {
        "accuracy": {"low": 0.8, "high": 0.97},
        "sensitivity": {"low": 0.85, "high": 1.0},
        "specificity": {"low": 0.5, "high": 1.0},
    },
    "ci_level": 0.9,
    "bootstrap_resamples": 200,
}
HISTORY_FIELDS = ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
SECTIONS = {
    "headline": "Test metrics",
    "per-class": "Per class",
    "confusion": "Confusion matrix",
    "curves": "ROC, precision-recall and reliability",
    "training": "Training",
    "mistakes": "Most confident mistakes",
    "gradcam": "Grad-CAM",
    "dataset": "Dataset",
    "comparison": "Comparison with earlier models",
    "params": "Parameters",
}
FIGURES = ["confusion", "roc", "pr", "reliability", "training"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def write_history(path: Path, epochs: int) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HISTORY_FIELDS)
        writer.writerows([e, 0.5 + e / 20, 1.0 / e, 0.45 + e / 20, 1.1 / e] for e in range(1, epochs + 1))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])


def predictions(classes: list[str], per_class: int) -> list[list]:
    """Test rows as make_augmented lays them out: each class's first image predicted as the next class."""
    rows = []
    for i, label in enumerate(classes):
        for k in range(per_class):
            wrong = k == 0
            predicted = classes[(i + 1) % len(classes)] if wrong else label
            confidence = 0.9 - 0.1 * i if wrong else 0.6 + 0.05 * k
            probs = [(1 - confidence) / (len(classes) - 1)] * len(classes)
            probs[classes.index(predicted)] = confidence
            rows.append([f"test/{label}/{label}__{k:03d}.png", label, predicted, *probs])
    return rows


def write_evaluation(root: Path, metrics: dict, classes: list[str], curves: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    if curves:
        for name in ("cat", "dog"):
            write_csv(root / "roc" / f"{name}.csv", ["fpr", "tpr"], [[0, 0], [0.25, 0.75], [1, 1]])
            write_csv(root / "pr" / f"{name}.csv", ["recall", "precision"], [[0, 1], [0.5, 0.8], [1, 0.4]])
        write_csv(
            root / "calibration.csv",
            ["bin", "confidence", "accuracy", "count"],
            [["0.5-0.6", 0.55, 0.5, 4], ["0.6-0.7", 0.66, 0.75, 8], ["0.9-1", 0.95, 0.9, 4]],
        )
    write_csv(
        root / "predictions.csv",
        ["path", "label", "predicted", *[f"p_{c}" for c in classes]],
        predictions(classes, 3),
    )
    return root


def make_inputs(
    tmp_path: Path, fine: bool = True, curves: bool = True, metrics: dict = METRICS, images: bool = True
) -> dict:
    """write_report's keyword arguments, every input written under ``tmp_path``."""
    classes = list(metrics["per_class"])
    augmented = make_augmented(tmp_path / "augmented", classes, {"test": 3}, size=24) if images else None
    split_summary = tmp_path / "summary.json"
    counts = {
        "train": {c: 20 for c in classes},
        "val": {c: 4 for c in classes},
        "test": {c: 3 for c in classes},
    }
    split_summary.write_text(
        json.dumps(
            {
                "classes": classes,
                "counts": counts,
                "totals": {s: sum(v.values()) for s, v in counts.items()},
                "total": 27 * len(classes),
                "rows_in": 27 * len(classes) + 2,
                "duplicates": {"sets": 2, "conflicting_sets": 1, "dropped": 2},
                "grouped_by": "none",
                "imbalance_ratio": 1.0,
            }
        )
    )
    quarantine = tmp_path / "quarantine.csv"
    write_csv(quarantine, ["path", "reason"], [["images/bad<1>.png", "cannot identify image file"]])
    return {
        "evaluation_dir": write_evaluation(tmp_path / "evaluate", metrics, classes, curves),
        "frozen_history": write_history(tmp_path / "frozen.csv", 3),
        "fine_history": write_history(tmp_path / "fine.csv", 2) if fine else tmp_path / "no-fine.csv",
        "params": parse_params({"fine_tune": {"unfreeze_blocks": 7}, "augment": {"image_size": 48}}),
        "html_out": tmp_path / "out" / "report.html",
        "markdown_out": tmp_path / "out" / "summary.md",
        "augmented_dir": augmented,
        "split_summary": split_summary,
        "quarantine": quarantine,
    }


def full_inputs(tmp_path: Path, tiny_model: tuple[Path, Path]) -> dict:
    """Every input of the stage: the two-class metrics, six test images per class, the tiny model."""
    augmented, model_path = tiny_model
    inputs = make_inputs(tmp_path, metrics=BINARY)
    classes = list(BINARY["per_class"])
    write_csv(
        inputs["evaluation_dir"] / "predictions.csv",
        ["path", "label", "predicted", *[f"p_{c}" for c in classes]],
        predictions(classes, 6),
    )
    return {**inputs, "augmented_dir": augmented, "model_path": model_path}


def report(inputs: dict) -> tuple[str, list[str]]:
    """Run the stage; the HTML page and the lines of the Markdown summary."""
    write_report(**inputs)
    return (
        inputs["html_out"].read_text(encoding="utf-8"),
        inputs["markdown_out"].read_text(encoding="utf-8").splitlines(),
    )


def images_in(page: str) -> list[tuple[str, Image.Image]]:
    """Every <img> as (alt, decoded PNG), checking that nothing points outside the page."""
    parser = _Tags()
    parser.feed(page)
    images = []
    for tag, attrs in parser.tags:
        assert tag not in ("link", "script", "iframe", "object", "embed", "base")
        assert attrs.get("href", "#").startswith("#"), (tag, attrs)  # in-page anchors only
        if "src" in attrs:
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            png = base64.b64decode(attrs["src"][len(prefix) :], validate=True)
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            images.append((attrs.get("alt", ""), Image.open(io.BytesIO(png))))
    return images


def section_of(page: str, anchor: str) -> str:
    """The markup inside one <section> of the page."""
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.DOTALL)
    assert match, anchor
    return match.group(1)


def log_evaluate_run(experiment_id: str, metrics: dict[str, float], weights: str | None) -> str:
    """An earlier evaluate run in MLflow, as the evaluate stage logs one; its run id."""
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    tags = {"tlpipe.stage": "evaluate", **({"tlpipe.weights": weights} if weights else {})}
    run = client.create_run(experiment_id, tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
