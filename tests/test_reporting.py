"""Tests for the self-contained HTML report and the Markdown summary."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import mlflow
from PIL import Image

from tlpipe.config import Params, parse_params
from tlpipe.reporting import write_report

ODD = "<b>&fox|ü"  # folder names can hold all of these: escaped in HTML and Markdown, utf-8
CLASSES = ["cat", "dog", ODD]
METRICS = {
    "accuracy": 0.8125,
    "macro_f1": 0.7431,
    "roc_auc": 0.9012,
    "n_test": 16,
    "per_class": {
        "cat": {"precision": 1.0, "recall": 0.6667, "f1": 0.8, "support": 6},
        "dog": {"precision": 0.625, "recall": 1.0, "f1": 0.7692, "support": 5},
        ODD: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5},
    },
    "confusion_matrix": [[4, 2, 0], [0, 5, 0], [0, 1, 4]],
}
HISTORY_FIELDS = ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]


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


def _inputs(tmp_path: Path, fine: bool = True, roc: bool = True) -> dict:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    roc_dir = tmp_path / "roc"
    if roc:
        roc_dir.mkdir()
        for name in ("cat", "dog"):
            (roc_dir / f"{name}.csv").write_text("fpr,tpr\n0.0,0.0\n0.25,0.75\n1.0,1.0\n")
    return {
        "metrics_path": metrics,
        "roc_dir": roc_dir,
        "frozen_history": _history(tmp_path / "frozen.csv", 3),
        "fine_history": _history(tmp_path / "fine.csv", 2) if fine else tmp_path / "no-fine.csv",
        "params": parse_params({"fine_tune": {"unfreeze_blocks": 7}, "augment": {"image_size": 48}}),
        "html_out": tmp_path / "out" / "report.html",
        "markdown_out": tmp_path / "out" / "summary.md",
    }


def _images(page: str) -> list[Image.Image]:
    parser = _Tags()
    parser.feed(page)
    images = []
    for tag, attrs in parser.tags:
        assert "href" not in attrs, (tag, attrs)
        assert tag not in ("link", "script", "iframe", "object")
        if "src" in attrs:
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            png = base64.b64decode(attrs["src"][len(prefix) :], validate=True)
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            images.append(Image.open(io.BytesIO(png)))
    return images


def test_html_is_self_contained_with_png_figures(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    write_report(**inputs)
    page = inputs["html_out"].read_text(encoding="utf-8")
    assert "://" not in page  # base64 has no ":", so this catches any URL with a scheme
    assert "url(" not in page and "@import" not in page
    images = _images(page)
    assert len(images) == 3  # training curves, confusion matrix, ROC
    assert all(img.format == "PNG" and img.size[0] > 100 for img in images)


def test_html_has_metrics_per_class_and_params(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    write_report(**inputs)
    page = inputs["html_out"].read_text(encoding="utf-8")
    for cell in ("<td>accuracy</td><td>0.8125</td>", "<td>macro F1</td><td>0.7431</td>"):
        assert cell in page
    assert "<td>ROC-AUC</td><td>0.9012</td>" in page and "<td>test images</td><td>16</td>" in page
    assert "<tr><td>dog</td><td>0.625</td><td>1.000</td><td>0.769</td><td>5</td></tr>" in page
    assert "<td>&lt;b&gt;&amp;fox|ü</td>" in page and "<b>" not in page
    assert "unfreeze_blocks: 7" in page and "image_size: 48" in page


def test_markdown_summary_has_the_headline_table(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    write_report(**inputs)
    lines = inputs["markdown_out"].read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# tlpipe report"
    table = lines[lines.index("| metric | value |") :]
    assert table[1] == "|---|---|"
    assert table[2:6] == [
        "| accuracy | 0.8125 |",
        "| macro F1 | 0.7431 |",
        "| ROC-AUC | 0.9012 |",
        "| test images | 16 |",
    ]
    assert "| cat | 1.000 | 0.667 | 0.800 | 6 |" in lines
    assert "| <b>&fox\\|ü | 0.800 | 0.800 | 0.800 | 5 |" in lines  # one cell, not two


def test_missing_fine_tune_history_and_roc_are_handled(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, fine=False, roc=False)
    write_report(**inputs)
    page = inputs["html_out"].read_text(encoding="utf-8")
    assert len(_images(page)) == 2  # training curves (frozen only) and confusion matrix
    assert "no training history" not in page


def test_no_history_at_all_says_so(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    inputs["frozen_history"] = inputs["fine_history"] = tmp_path / "none.csv"
    write_report(**inputs)
    page = inputs["html_out"].read_text(encoding="utf-8")
    assert "no training history" in page
    assert len(_images(page)) == 2  # confusion matrix and ROC


def test_undefined_auc_is_shown_not_fatal(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    inputs["metrics_path"].write_text(json.dumps({**METRICS, "roc_auc": None}))
    write_report(**inputs)
    assert "| ROC-AUC | n/a |" in inputs["markdown_out"].read_text(encoding="utf-8")


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
