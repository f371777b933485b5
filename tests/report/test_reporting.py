"""Tests for the self-contained HTML report and the Markdown summary."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric
from PIL import Image

from augmented_fixture import make_augmented
from tlpipe.report import reporting
from tlpipe.core.config import Params, parse_params
from tlpipe.report.reporting import write_report

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


@pytest.fixture(autouse=True)
def experiment(mlflow_store, monkeypatch, tmp_path) -> str:
    """A fresh MLflow experiment per test: evaluate runs that other tests log stay out of the comparison."""
    name = f"report-{uuid.uuid4().hex[:12]}"
    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return experiment_id


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _history(path: Path, epochs: int) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HISTORY_FIELDS)
        writer.writerows([e, 0.5 + e / 20, 1.0 / e, 0.45 + e / 20, 1.1 / e] for e in range(1, epochs + 1))
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])


def _predictions(classes: list[str], per_class: int) -> list[list]:
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


def _evaluation(root: Path, metrics: dict, classes: list[str], curves: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    if curves:
        for name in ("cat", "dog"):
            _write_csv(root / "roc" / f"{name}.csv", ["fpr", "tpr"], [[0, 0], [0.25, 0.75], [1, 1]])
            _write_csv(root / "pr" / f"{name}.csv", ["recall", "precision"], [[0, 1], [0.5, 0.8], [1, 0.4]])
        _write_csv(
            root / "calibration.csv",
            ["bin", "confidence", "accuracy", "count"],
            [["0.5-0.6", 0.55, 0.5, 4], ["0.6-0.7", 0.66, 0.75, 8], ["0.9-1", 0.95, 0.9, 4]],
        )
    _write_csv(
        root / "predictions.csv",
        ["path", "label", "predicted", *[f"p_{c}" for c in classes]],
        _predictions(classes, 3),
    )
    return root


def _inputs(
    tmp_path: Path, fine: bool = True, curves: bool = True, metrics: dict = METRICS, images: bool = True
) -> dict:
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
    _write_csv(quarantine, ["path", "reason"], [["images/bad<1>.png", "cannot identify image file"]])
    return {
        "evaluation_dir": _evaluation(tmp_path / "evaluate", metrics, classes, curves),
        "frozen_history": _history(tmp_path / "frozen.csv", 3),
        "fine_history": _history(tmp_path / "fine.csv", 2) if fine else tmp_path / "no-fine.csv",
        "params": parse_params({"fine_tune": {"unfreeze_blocks": 7}, "augment": {"image_size": 48}}),
        "html_out": tmp_path / "out" / "report.html",
        "markdown_out": tmp_path / "out" / "summary.md",
        "augmented_dir": augmented,
        "split_summary": split_summary,
        "quarantine": quarantine,
    }


def _report(inputs: dict) -> tuple[str, list[str]]:
    write_report(**inputs)
    return (
        inputs["html_out"].read_text(encoding="utf-8"),
        inputs["markdown_out"].read_text(encoding="utf-8").splitlines(),
    )


def _images(page: str) -> list[tuple[str, Image.Image]]:
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


def _section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.DOTALL)
    assert match, anchor
    return match.group(1)


# ------------------------------------------------------------------ the HTML


def test_html_is_self_contained_with_png_figures(tmp_path: Path) -> None:
    page, _ = _report(_inputs(tmp_path))
    assert "://" not in page  # base64 has no ":", so this catches any URL with a scheme
    assert "url(" not in page and "@import" not in page
    images = _images(page)
    alts = [alt for alt, _ in images]
    assert all(alts.count(name) == 1 for name in FIGURES), alts
    assert all(img.format == "PNG" and img.size[0] > 100 for alt, img in images if alt in FIGURES)
    # three classes, the first test image of each predicted wrong: three thumbnails, no Grad-CAM (no model)
    assert sum(alt.startswith("test image ") for alt in alts) == 3


def test_html_has_every_section_linked_from_the_top(tmp_path: Path) -> None:
    page, _ = _report(_inputs(tmp_path))
    for anchor, title in SECTIONS.items():
        assert f'<a href="#{anchor}">{title}</a>' in page
        assert f'<section id="{anchor}"><h2>{title}</h2>' in page


def test_html_has_metrics_with_intervals_per_class_and_params(tmp_path: Path) -> None:
    page, _ = _report(_inputs(tmp_path))
    headline = _section(page, "headline")
    assert "<th>95% CI</th>" in headline
    assert "<td>accuracy</td><td>0.8125</td><td>[0.6250, 0.9375]</td>" in headline
    assert "<td>macro F1</td><td>0.7431</td><td>[0.5500, 0.9100]</td>" in headline
    assert "<td>ROC-AUC</td><td>0.9012</td><td>[0.8000, 0.9800]</td>" in headline
    assert "<td>PR-AUC</td><td>0.8456</td><td>-</td>" in headline
    assert "<td>top-2 accuracy</td><td>0.9375</td>" in headline
    assert "<td>calibration error (ECE)</td><td>0.0712</td>" in headline
    assert "<td>test images</td><td>16</td>" in headline
    assert "1000 resamples" in headline
    assert "sensitivity" not in headline  # three classes: no positive class
    per_class = _section(page, "per-class")
    assert "<tr><td>dog</td><td>0.625</td><td>1.000</td><td>0.769</td><td>5</td></tr>" in per_class
    assert "<td>&lt;b&gt;&amp;fox|ü</td>" in per_class and "<b>&fox" not in page
    assert "unfreeze_blocks: 7" in page and "image_size: 48" in page


def test_mistakes_gallery_shows_the_most_confident_first(tmp_path: Path) -> None:
    page, _ = _report(_inputs(tmp_path))
    gallery = _section(page, "mistakes")
    # cat's mistake was the most confident (0.9), then dog's (0.8), then the odd class's (0.7)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", gallery)
    assert captions == [
        "true <b>cat</b><br>predicted <b>dog</b><br>P(dog) = 0.900",
        "true <b>dog</b><br>predicted <b>&lt;b&gt;&amp;fox|ü</b><br>P(&lt;b&gt;&amp;fox|ü) = 0.800",
        "true <b>&lt;b&gt;&amp;fox|ü</b><br>predicted <b>cat</b><br>P(cat) = 0.700",
    ]
    thumbs = [img for alt, img in _images(gallery)]
    assert [img.size for img in thumbs] == [(24, 24)] * 3  # small images stay small: CSS scales them


def test_dataset_section_has_split_counts_and_quarantine(tmp_path: Path) -> None:
    page, _ = _report(_inputs(tmp_path))
    dataset = _section(page, "dataset")
    assert "<tr><th>class</th><th>train</th><th>val</th><th>test</th><th>total</th></tr>" in dataset
    assert "<tr><td>cat</td><td>20</td><td>4</td><td>3</td><td>27</td></tr>" in dataset
    assert "<tr><td>all</td><td>60</td><td>12</td><td>9</td><td>81</td></tr>" in dataset
    assert "2 duplicate images dropped" in dataset
    assert "Input files rejected by the download stage, so not used: 1." in dataset
    assert "<td>images/bad&lt;1&gt;.png</td><td>cannot identify image file</td>" in dataset


def test_missing_optional_inputs_hide_their_items(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, fine=False, curves=False)
    inputs.update(split_summary=tmp_path / "none.json", quarantine=tmp_path / "none.csv")
    page, _ = _report(inputs)
    alts = [alt for alt, _ in _images(page)]
    assert "training" in alts and "confusion" in alts  # training curves of the frozen phase alone
    assert not {"roc", "pr", "reliability"} & set(alts)
    assert "no curves found" in page and "no training history" not in page
    assert "No split summary found." in page and "No input files were quarantined." in page


def test_no_history_at_all_says_so(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    inputs["frozen_history"] = inputs["fine_history"] = tmp_path / "none.csv"
    page, _ = _report(inputs)
    assert "no training history" in page
    assert "training" not in [alt for alt, _ in _images(page)]


def test_metrics_of_an_older_evaluate_stage_still_render(tmp_path: Path) -> None:
    old = {
        k: METRICS[k] for k in ("accuracy", "macro_f1", "roc_auc", "n_test", "per_class", "confusion_matrix")
    }
    page, lines = _report(_inputs(tmp_path, metrics=old))
    assert "<td>accuracy</td><td>0.8125</td><td>-</td>" in page
    assert "balanced accuracy" not in page
    assert "| accuracy | 0.8125 | - |" in lines


def test_undefined_auc_is_shown_not_fatal(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    _, lines = _report(
        {**inputs, "evaluation_dir": _evaluation(tmp_path / "e2", {**METRICS, "roc_auc": None}, CLASSES)}
    )
    assert "| ROC-AUC | n/a | [0.8000, 0.9800] |" in lines


def test_two_classes_state_the_threshold_and_the_figures_at_half(tmp_path: Path) -> None:
    page, lines = _report(_inputs(tmp_path, metrics=BINARY))
    headline = _section(page, "headline")
    assert "<th>90% CI</th>" in headline
    assert "<td>sensitivity</td><td>0.9500</td><td>[0.8500, 1.0000]</td>" in headline
    assert "share of pneumonia images called pneumonia" in headline
    assert "share of normal images called normal" in headline
    rule = "An image is called pneumonia when P(pneumonia) &gt;= 0.3125, the cut-off chosen on the val split"
    assert rule in headline
    assert "<tr><th>metric</th><th>at 0.3125 (used)</th><th>at 0.5</th></tr>" in headline
    assert "<tr><td>sensitivity</td><td>0.9500</td><td>0.8500</td></tr>" in headline
    assert "| sensitivity | 0.9500 | [0.8500, 1.0000] |" in lines
    assert any(line.startswith("An image is called pneumonia when P(pneumonia) >= 0.3125") for line in lines)


def test_two_classes_list_the_val_chosen_operating_points(tmp_path: Path) -> None:
    youden = {**BINARY["threshold"], **{k: BINARY[k] for k in ("accuracy", "sensitivity", "specificity")}}
    strict = {
        "rule": "target_sensitivity",
        "value": 0.9375,
        "chosen_on": "val",
        "val_sensitivity": 0.9,
        "val_specificity": 1.0,
        "accuracy": 0.7,
        "sensitivity": 0.6,
        "specificity": 0.9,
    }
    fallback = {"rule": "target_sensitivity", "value": 0.5, "chosen_on": "fallback", "reason": "no val"}
    metrics = {**BINARY, "operating_points": {"youden": youden, "sensitivity_0.9": strict, "x": fallback}}
    headline = _section(_report(_inputs(tmp_path, metrics=metrics))[0], "headline")
    assert "Other operating points. Each cut-off is chosen on the val split" in headline
    assert "<th>cut-off chosen on val by</th><th>cut-off</th><th>val sensitivity</th>" in headline
    assert "<tr><td>Youden&#x27;s J</td><td>0.3125</td><td>0.9000</td><td>0.8500</td>" in headline
    row = "<tr><td>sensitivity &gt;= 0.9</td><td>0.9375</td><td>0.9000</td><td>1.0000</td><td>0.7000</td>"
    assert row + "<td>0.6000</td><td>0.9000</td></tr>" in headline
    assert "(not applicable: no val; 0.5 used)" in headline
    # without them (more classes, or no val split) there is no such table
    plain = _section(_report(_inputs(tmp_path / "plain", metrics=BINARY))[0], "headline")
    assert "Other operating points" not in plain


def test_class_names_with_dollars_are_plotted_as_written() -> None:
    classes = ["$\\frac{$", "a$b"]  # as mathtext the first would not even parse
    assert reporting.figure_to_data_uri(reporting.plot_confusion([[1, 2], [3, 4]], classes)).startswith(
        "data:"
    )
    curves = {c: [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 1.0, "tpr": 1.0}] for c in classes}
    assert reporting.figure_to_data_uri(reporting.plot_roc(curves)).startswith("data:")


# ------------------------------------------------------------------ the Markdown summary


def test_markdown_summary_is_short_and_has_the_headline_with_intervals(tmp_path: Path) -> None:
    _, lines = _report(_inputs(tmp_path))
    assert len(lines) < 40
    assert lines[0] == "# tlpipe report"
    table = lines[lines.index("| metric | value | 95% CI |") :]
    assert table[1] == "|---|---|---|"
    assert table[2:9] == [
        "| accuracy | 0.8125 | [0.6250, 0.9375] |",
        "| balanced accuracy | 0.8222 | [0.6400, 0.9500] |",
        "| macro F1 | 0.7431 | [0.5500, 0.9100] |",
        "| ROC-AUC | 0.9012 | [0.8000, 0.9800] |",
        "| PR-AUC | 0.8456 | - |",
        "| calibration error (ECE) | 0.0712 | - |",
        "| test images | 16 |  |",
    ]
    assert "| cat | 1.000 | 0.667 | 0.800 | 6 |" in lines
    assert "| <b>&fox\\|ü | 0.800 | 0.800 | 0.800 | 5 |" in lines  # one cell, not two
    assert any(line.startswith("Comparison: nothing to compare yet") for line in lines)


def test_markdown_summary_stays_short_with_many_classes(tmp_path: Path) -> None:
    classes = [f"class {i}" for i in range(30)]
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for c in classes}
    metrics = {**METRICS, "per_class": per_class, "confusion_matrix": np.eye(30, dtype=int).tolist()}
    _, lines = _report(_inputs(tmp_path, metrics=metrics, curves=False, images=False))
    assert len(lines) < 40
    assert "| class 0 | 0.500 | 0.500 | 0.500 | 3 |" not in lines  # left to the HTML
    assert "| accuracy | 0.8125 | [0.6250, 0.9375] |" in lines


# ------------------------------------------------------------------ Grad-CAM


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A two-class classifier on the default backbone at 32 px, and its augmented test images."""
    from tlpipe.train import training
    from tlpipe.model import storage

    root = tmp_path_factory.mktemp("tiny")
    augmented = make_augmented(root / "augmented", list(BINARY["per_class"]), {"test": 6}, size=32)
    backbone = training.build_backbone_model("efficientnet_lite0", "imagenet", 32)
    head = training.build_head(int(backbone.output_shape[-1]), 2, dropout=0.2)
    model_path = root / "model.keras"
    storage.save_model_atomically(training.assemble(backbone, head, 2, dropout=0.2), model_path)
    return augmented, model_path


def _full_inputs(tmp_path: Path, tiny_model: tuple[Path, Path]) -> dict:
    """Every input of the stage: the two-class metrics, six test images per class, the tiny model."""
    augmented, model_path = tiny_model
    inputs = _inputs(tmp_path, metrics=BINARY)
    classes = list(BINARY["per_class"])
    _write_csv(
        inputs["evaluation_dir"] / "predictions.csv",
        ["path", "label", "predicted", *[f"p_{c}" for c in classes]],
        _predictions(classes, 6),
    )
    return {**inputs, "augmented_dir": augmented, "model_path": model_path}


def test_gradcam_section_shows_overlays_of_correct_and_wrong_images(tmp_path: Path, tiny_model) -> None:
    inputs = _full_inputs(tmp_path, tiny_model)
    page, _ = _report(inputs)
    section = _section(page, "gradcam")
    # the most confident correct image of each class in turn (4), then the two mistakes
    assert section.count('<div class="cam correct">') == 4 and section.count('<div class="cam wrong">') == 2
    images = _images(section)
    originals = [img for alt, img in images if alt.startswith("test image ")]
    overlays = [img for alt, img in images if alt.startswith("Grad-CAM for ")]
    empty = section.count(">no evidence<")
    # one map per correct image, two (predicted and true class) per mistake; an empty map shows no image
    assert len(originals) == 6 and len(overlays) + empty == 4 + 2 * 2
    assert overlays and all(img.size == (32, 32) and img.mode == "RGB" for img in overlays)
    assert len({img.tobytes() for img in overlays}) > 1


def test_an_empty_map_says_no_evidence() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    assert ">no evidence<" in reporting._cam_figure(
        image, "dog", np.zeros((8, 8), np.float32), "evidence for"
    )
    assert "<img" in reporting._cam_figure(image, "dog", np.ones((8, 8), np.float32), "evidence for")


def test_without_a_model_the_gradcam_section_says_why(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    page, _ = _report({**inputs, "model_path": tmp_path / "missing.keras"})
    assert "Grad-CAM could not be computed" in _section(page, "gradcam")


# ------------------------------------------------------------------ comparison with earlier runs


def _log_evaluate_run(experiment_id: str, metrics: dict[str, float], weights: str | None) -> str:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    tags = {"tlpipe.stage": "evaluate", **({"tlpipe.weights": weights} if weights else {})}
    run = client.create_run(experiment_id, tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_comparison_says_nothing_to_compare_without_runs(tmp_path: Path) -> None:
    page, lines = _report(_inputs(tmp_path))
    section = _section(page, "comparison")
    assert "Nothing to compare yet: no earlier evaluate run in MLflow." in section
    assert "<img" not in section
    assert "Comparison: nothing to compare yet (no earlier evaluate run in MLflow)." in lines


def test_comparison_ignores_untagged_runs_and_this_model(tmp_path: Path, experiment: str) -> None:
    _log_evaluate_run(experiment, {"accuracy": 0.5, "roc_auc": 0.7, "n_test": 16}, None)
    this = {k: METRICS[k] for k in ("accuracy", "macro_f1", "roc_auc", "log_loss", "n_test")}
    _log_evaluate_run(experiment, this, "imagenet")  # this model's own evaluate run
    page, _ = _report(_inputs(tmp_path))
    assert "Nothing to compare yet: no earlier evaluate run tagged tlpipe.weights" in page


def test_comparison_shows_the_baseline_and_the_best_earlier_pretrained_run(
    tmp_path: Path, experiment: str
) -> None:
    figures = {"accuracy": 0.6, "balanced_accuracy": 0.6, "macro_f1": 0.55, "n_test": 16}
    _log_evaluate_run(
        experiment, {**figures, "roc_auc": 0.7, "ci.roc_auc.low": 0.6, "ci.roc_auc.high": 0.8}, "none"
    )
    _log_evaluate_run(experiment, {**figures, "roc_auc": 0.65}, "none")
    best = _log_evaluate_run(experiment, {**figures, "accuracy": 0.75, "roc_auc": 0.88}, "imagenet")
    _log_evaluate_run(experiment, {**figures, "roc_auc": 0.8}, "imagenet")
    page, lines = _report(_inputs(tmp_path))
    section = _section(page, "comparison")
    header = "<th>metric</th><th>this model (imagenet)</th><th>from-scratch baseline</th><th>previous best pretrained</th>"
    assert header in section
    assert (
        "<td>ROC-AUC</td><td>0.9012 [0.8000, 0.9800]</td><td>0.7000 [0.6000, 0.8000]</td><td>0.8800</td>"
        in section
    )
    assert "<td>accuracy</td><td>0.8125 [0.6250, 0.9375]</td><td>0.6000</td><td>0.7500</td>" in section
    assert f"MLflow run {best[:8]}" in section
    assert [alt for alt, _ in _images(section)] == ["comparison"]
    line = "ROC-AUC vs from-scratch baseline 0.7000 (this model +0.2012); previous best pretrained 0.8800 (this model +0.0212)."
    assert line in lines


def test_comparison_never_fails_the_report(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "no-such-scheme://nowhere")
    comparison = reporting.find_comparison(METRICS)
    assert comparison.columns == [] and comparison.reason.startswith("MLflow could not be queried")


# ------------------------------------------------------------------ MLflow bookkeeping of the stage


def test_report_logs_params_metrics_and_artifacts(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    write_report(**inputs)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(mlflow.last_active_run().info.run_id)
    assert run.data.tags["tlpipe.stage"] == "report"
    assert run.data.metrics == {"accuracy": 0.8125, "macro_f1": 0.7431}
    assert run.data.params["fine_tune.unfreeze_blocks"] == "7"
    assert run.data.params["data.demo.seed"] == str(Params().data.demo.seed)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["report.html", "summary.md"]


# ------------------------------------------------------------------ as a person sees it

# Debian's name, Ubuntu's and Google's (GitHub's runners ship Google Chrome)
CHROMIUM = next(
    filter(
        None, map(shutil.which, ("chromium", "google-chrome", "google-chrome-stable", "chromium-browser"))
    ),
    None,
)
WINDOW = (1280, 2000)


def _screenshot(page: Path, out: Path, profile: Path) -> subprocess.CompletedProcess:
    """Chromium renders the page offline: every proxied request and every host lookup fails."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI containers run as root, where the sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # a container's small /dev/shm otherwise crashes the renderer
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.resolve().as_uri(),
    ]
    # HOME too: Chromium also writes caches under it
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path, tiny_model) -> None:
    inputs = _full_inputs(tmp_path, tiny_model)
    page, _ = _report(inputs)
    assert not re.search(r"https?:", page, re.IGNORECASE)  # nothing for the browser to fetch
    shot = tmp_path / "screenshot.png"
    started = time.monotonic()
    proc = _screenshot(inputs["html_out"], shot, tmp_path / "chromium-profile")
    print(f"screenshot: {shot} ({time.monotonic() - started:.1f} s)")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    pixels = np.asarray(image).reshape(-1, 3).astype(np.int16)
    colours = len(np.unique(pixels, axis=0))
    inked = (pixels.min(axis=1) < 200).mean()  # text, table borders, figures
    coloured = (np.ptp(pixels, axis=1) > 60).mean()  # saturated: only the figures and images are
    assert colours > 500, colours
    assert inked > 0.03, inked
    assert coloured > 0.01, coloured
