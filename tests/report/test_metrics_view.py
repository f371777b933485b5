"""The "Test metrics" and "Per class" sections, and the same figures in the Markdown summary."""

from __future__ import annotations

from pathlib import Path

from report_cases import BINARY, CLASSES, METRICS, make_inputs, report, section_of, write_evaluation


def test_html_has_metrics_with_intervals_per_class_and_params(tmp_path: Path) -> None:
    page, _ = report(make_inputs(tmp_path))
    headline = section_of(page, "headline")
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
    per_class = section_of(page, "per-class")
    assert "<tr><td>dog</td><td>0.625</td><td>1.000</td><td>0.769</td><td>5</td></tr>" in per_class
    assert "<td>&lt;b&gt;&amp;fox|ü</td>" in per_class and "<b>&fox" not in page
    assert "unfreeze_blocks: 7" in page and "image_size: 48" in page


def test_metrics_of_an_older_evaluate_stage_still_render(tmp_path: Path) -> None:
    old = {
        k: METRICS[k] for k in ("accuracy", "macro_f1", "roc_auc", "n_test", "per_class", "confusion_matrix")
    }
    page, lines = report(make_inputs(tmp_path, metrics=old))
    assert "<td>accuracy</td><td>0.8125</td><td>-</td>" in page
    assert "balanced accuracy" not in page
    assert "| accuracy | 0.8125 | - |" in lines


def test_undefined_auc_is_shown_not_fatal(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    _, lines = report(
        {**inputs, "evaluation_dir": write_evaluation(tmp_path / "e2", {**METRICS, "roc_auc": None}, CLASSES)}
    )
    assert "| ROC-AUC | n/a | [0.8000, 0.9800] |" in lines


def test_two_classes_state_the_threshold_and_the_figures_at_half(tmp_path: Path) -> None:
    page, lines = report(make_inputs(tmp_path, metrics=BINARY))
    headline = section_of(page, "headline")
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
    headline = section_of(report(make_inputs(tmp_path, metrics=metrics))[0], "headline")
    assert (
        "Other operating points. Each cut-off is chosen as the one in use is, on val or out of fold"
        in headline
    )
    assert "<th>cut-off chosen on val by</th><th>cut-off</th><th>val sensitivity</th>" in headline
    assert "<tr><td>Youden&#39;s J</td><td>0.3125</td><td>0.9000</td><td>0.8500</td>" in headline
    row = "<tr><td>sensitivity &gt;= 0.9</td><td>0.9375</td><td>0.9000</td><td>1.0000</td><td>0.7000</td>"
    assert row + "<td>0.6000</td><td>0.9000</td></tr>" in headline
    assert "(not applicable: no val; 0.5 used)" in headline
    # without them (more classes, or no val split) there is no such table
    plain = section_of(report(make_inputs(tmp_path / "plain", metrics=BINARY))[0], "headline")
    assert "Other operating points" not in plain


def test_an_out_of_fold_decision_is_said_so_and_both_rules_are_tabled(tmp_path: Path) -> None:
    from tlpipe.report.metrics_view import calibration_line, decision_rule

    threshold = {"rule": "youden", "value": 0.7311, "chosen_on": "oof", "n_oof": 5000, "oof_sensitivity": 0.9,
                 "oof_specificity": 0.8, "n_val": 780, "val_sensitivity": 0.99, "val_specificity": 0.97}  # fmt: skip
    line = decision_rule({"threshold": threshold}, ["NORMAL", "PNEUMONIA"])
    assert (
        line is not None
        and "chosen on out-of-fold predictions over train+val (youden rule, 5000 images" in line
    )
    assert "sensitivity 0.900 out of fold" in line and "specificity 0.970 on val" in line
    figures = {"ece": 0.1, "brier": 0.1, "log_loss": 0.3}
    doc = {"method": "temperature", "temperature": 3.0, "fitted_on": "oof", "n_oof": 5000, "n_val": 780,
           "before": figures, "after": figures}  # fmt: skip
    assert (
        "fitted on 5000 out-of-fold predictions over train+val, the model mapped onto them through 780 val"
        in (calibration_line({"calibration": doc}) or "")
    )
    rules = {
        "val": {"threshold": 0.9, "temperature": 1.1, "accuracy": 0.84, "sensitivity": 0.99, "specificity": 0.6,
                "roc_auc": 0.97, "ece": 0.1},
        "oof": {"threshold": 0.7311, "temperature": 3.0, "accuracy": 0.88, "sensitivity": 0.97,
                "specificity": 0.72, "roc_auc": 0.97, "ece": 0.06},
    }  # fmt: skip
    metrics = {**BINARY, "threshold": threshold, "calibration": {**BINARY.get("calibration", doc), **doc},
               "decision_rules": rules}  # fmt: skip
    headline = section_of(report(make_inputs(tmp_path, metrics=metrics))[0], "headline")
    assert "Both decision rules on this model" in headline
    assert "<tr><td>oof (served)</td><td>0.7311</td><td>3</td><td>0.8800</td>" in headline
    assert "<tr><td>val</td><td>0.9000</td><td>1.1</td><td>0.8400</td>" in headline


def test_the_calibration_and_what_it_changed_are_stated() -> None:
    from tlpipe.report.metrics_view import calibration_line

    figures = {"ece": 0.143, "brier": 0.12, "log_loss": 1.31}
    doc = {"method": "temperature", "temperature": 3.2, "n_val": 782, "before": figures,
           "after": {"ece": 0.031, "brier": 0.08, "log_loss": 0.35}}  # fmt: skip
    line = calibration_line({"calibration": doc})
    assert line is not None and "T = 3.2, fitted on 782 val images" in line
    assert "ece 0.143 -> 0.031" in line and "log_loss 1.310 -> 0.350" in line
    none = calibration_line({"calibration": {**doc, "method": "none", "after": figures}})
    assert none == "Probabilities are the model's own (no calibration): ECE 0.143."
    assert calibration_line({}) is None
    platt = calibration_line({"calibration": {**doc, "method": "platt", "platt": [0.25, -0.1]}})
    assert platt is not None and platt.startswith(
        "Probabilities calibrated by Platt scaling (a, b = 0.25, -0.1)"
    )
    isotonic = calibration_line({"calibration": {**doc, "method": "isotonic", "isotonic_knots": 12}})
    assert isotonic is not None and "isotonic regression (12 knots, fitted on 782 val images" in isotonic


def test_the_guards_rates_are_stated() -> None:
    from tlpipe.report.metrics_view import guard_line

    guard = {"fitted": True, "accept": 0.99, "test_flagged": 0.016,
             "far": {"flagged": 0.97, "auroc": 0.998, "images": "photos"},
             "near": {"flagged": 0.4, "auroc": 0.81, "images": "inverted"}}  # fmt: skip
    line = guard_line({"guard": guard})
    assert line is not None and "flags 1.6% of the test images" in line
    assert "97% of far-away images (AUROC 0.998: photos)" in line and "AUROC 0.810: inverted" in line
    assert guard_line({"guard": {"fitted": False, "reason": "no train"}}) is None
