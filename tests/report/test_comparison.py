"""The comparison with earlier models: the best baseline and pretrained evaluate runs in MLflow."""

from __future__ import annotations

from pathlib import Path

from report_cases import METRICS, images_in, log_evaluate_run, make_inputs, report, section_of

from tlpipe.report import comparison


def test_comparison_says_nothing_to_compare_without_runs(tmp_path: Path) -> None:
    page, lines = report(make_inputs(tmp_path))
    section = section_of(page, "comparison")
    assert "Nothing to compare yet: no earlier evaluate run in MLflow." in section
    assert "<img" not in section
    assert "Comparison: nothing to compare yet (no earlier evaluate run in MLflow)." in lines


def test_comparison_ignores_untagged_runs_and_this_model(tmp_path: Path, experiment: str) -> None:
    log_evaluate_run(experiment, {"accuracy": 0.5, "roc_auc": 0.7, "n_test": 16}, None)
    this = {k: METRICS[k] for k in ("accuracy", "macro_f1", "roc_auc", "log_loss", "n_test")}
    log_evaluate_run(experiment, this, "imagenet")  # this model's own evaluate run
    page, _ = report(make_inputs(tmp_path))
    assert "Nothing to compare yet: no earlier evaluate run tagged tlpipe.weights" in page


def test_comparison_shows_the_baseline_and_the_best_earlier_pretrained_run(
    tmp_path: Path, experiment: str
) -> None:
    figures = {"accuracy": 0.6, "balanced_accuracy": 0.6, "macro_f1": 0.55, "n_test": 16}
    log_evaluate_run(
        experiment, {**figures, "roc_auc": 0.7, "ci.roc_auc.low": 0.6, "ci.roc_auc.high": 0.8}, "none"
    )
    log_evaluate_run(experiment, {**figures, "roc_auc": 0.65}, "none")
    best = log_evaluate_run(experiment, {**figures, "accuracy": 0.75, "roc_auc": 0.88}, "imagenet")
    log_evaluate_run(experiment, {**figures, "roc_auc": 0.8}, "imagenet")
    page, lines = report(make_inputs(tmp_path))
    section = section_of(page, "comparison")
    header = (
        "<th>metric</th><th>this model (imagenet)</th><th>from-scratch baseline</th>"
        "<th>previous best pretrained</th>"
    )
    assert header in section
    assert (
        "<td>ROC-AUC</td><td>0.9012 [0.8000, 0.9800]</td><td>0.7000 [0.6000, 0.8000]</td><td>0.8800</td>"
        in section
    )
    assert "<td>accuracy</td><td>0.8125 [0.6250, 0.9375]</td><td>0.6000</td><td>0.7500</td>" in section
    assert f"MLflow run {best[:8]}" in section
    assert [alt for alt, _ in images_in(section)] == ["comparison"]
    line = (
        "ROC-AUC vs from-scratch baseline 0.7000 (this model +0.2012); "
        "previous best pretrained 0.8800 (this model +0.0212)."
    )
    assert line in lines


def test_comparison_never_fails_the_report(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "no-such-scheme://nowhere")
    found = comparison.find_comparison(METRICS)
    assert found.columns == [] and found.reason.startswith("MLflow could not be queried")
