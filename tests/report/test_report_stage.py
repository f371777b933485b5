"""The report stage end to end: a self-contained page, optional inputs, MLflow bookkeeping."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from report_cases import FIGURES, images_in, make_inputs, report

from tlpipe.core.config import Params
from tlpipe.report.stage import write_report


def test_html_is_self_contained_with_png_figures(tmp_path: Path) -> None:
    page, _ = report(make_inputs(tmp_path))
    assert "://" not in page  # base64 has no ":", so this catches any URL with a scheme
    assert "url(" not in page and "@import" not in page
    images = images_in(page)
    alts = [alt for alt, _ in images]
    assert all(alts.count(name) == 1 for name in FIGURES), alts
    assert all(img.format == "PNG" and img.size[0] > 100 for alt, img in images if alt in FIGURES)
    # three classes, the first test image of each predicted wrong: three thumbnails, no Grad-CAM (no model)
    assert sum(alt.startswith("test image ") for alt in alts) == 3


def test_missing_optional_inputs_hide_their_items(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, fine=False, curves=False)
    inputs.update(split_summary=tmp_path / "none.json", quarantine=tmp_path / "none.csv")
    page, _ = report(inputs)
    alts = [alt for alt, _ in images_in(page)]
    assert "training" in alts and "confusion" in alts  # training curves of the frozen phase alone
    assert not {"roc", "pr", "reliability"} & set(alts)
    assert "no curves found" in page and "no training history" not in page
    assert "No split summary found." in page and "No input files were quarantined." in page


def test_no_history_at_all_says_so(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    inputs["frozen_history"] = inputs["fine_history"] = tmp_path / "none.csv"
    page, _ = report(inputs)
    assert "no training history" in page
    assert "training" not in [alt for alt, _ in images_in(page)]


def test_report_logs_params_metrics_and_artifacts(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    write_report(**inputs)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(mlflow.last_active_run().info.run_id)
    assert run.data.tags["tlpipe.stage"] == "report"
    assert run.data.metrics == {"accuracy": 0.8125, "macro_f1": 0.7431}
    assert run.data.params["fine_tune.unfreeze_blocks"] == "7"
    assert run.data.params["data.demo.seed"] == str(Params().data.demo.seed)
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert artifacts == ["model_card.md", "report.html", "summary.md"]


def test_the_stage_logs_where_it_wrote_the_report(tmp_path: Path, caplog) -> None:
    inputs = make_inputs(tmp_path)
    with caplog.at_level(logging.INFO, logger="tlpipe.report"):
        write_report(**inputs)
    card = inputs["markdown_out"].with_name("model_card.md")
    assert f"report: wrote {inputs['html_out']}, {inputs['markdown_out']} and {card}" in caplog.messages
