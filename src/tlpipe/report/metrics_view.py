"""The test metrics as the report words them: labels, number formats and the metric tables.

Each table is a list of rows of cell text (the header first), shared by the HTML page
and the Markdown summary so that both show the same figures in the same format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tlpipe.core.config import SUMMARY_METRICS
from tlpipe.report.page import Block, Paragraph, Table

NO_CI = "-"

LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "macro_precision": "macro precision",
    "macro_recall": "macro recall",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "log_loss": "log loss",
    "brier": "Brier score",
    "ece": "calibration error (ECE)",
}

# the rows of the Markdown summary: what a reviewer of a CI run needs at a glance
MARKDOWN_METRICS = SUMMARY_METRICS

AT_HALF_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "macro_f1")


def format_metric(value: float | None) -> str:
    """None stands for a metric that is undefined on this test split."""
    return "n/a" if value is None else f"{value:.4f}"


def format_ci(interval: Sequence[float] | None) -> str:
    """A confidence interval as ``[low, high]``; NO_CI when there is none."""
    return NO_CI if not interval else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def ci_label(metrics: dict) -> str:
    """The interval column's header, with its level when metrics.json states it."""
    level = metrics.get("ci_level")
    return f"{level * 100:g}% CI" if isinstance(level, (int, float)) else "CI"


def metric_label(key: str) -> str:
    """A metric's name as the report writes it: ``top_2_accuracy`` -> ``top-2 accuracy``."""
    return LABELS.get(key) or re.sub(r"^top_(\d+)_", r"top-\1 ", key).replace("_", " ")


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    meaning: str


def metric_specs(metrics: dict, classes: Sequence[str]) -> list[MetricSpec]:
    """The headline metrics present in metrics.json, in reading order, each with what it says."""
    two = len(classes) == 2
    positive, negative = (classes[1], classes[0]) if two else ("", "")
    top_k = sorted(k for k in metrics if re.fullmatch(r"top_\d+_accuracy", k))
    meanings = [
        ("accuracy", "share of test images classified correctly"),
        ("balanced_accuracy", "mean recall over the classes: a rare class counts"),
        ("sensitivity", f"share of {positive} images called {positive}"),
        ("specificity", f"share of {negative} images called {negative}"),
        ("macro_f1", "F1 averaged over classes, each class weighing the same"),
        ("weighted_f1", "F1 averaged over classes, weighted by their test images"),
        ("macro_precision", "how often a call of a class is right, class mean"),
        ("macro_recall", "share of each class found, class mean"),
        *[(k, "true class among the top guesses") for k in top_k],
        ("roc_auc", "chance a random positive scores above a random negative; no threshold"),
        ("pr_auc", "average precision over all thresholds; no threshold"),
        ("log_loss", "lower is better: punishes confident mistakes"),
        ("brier", "squared error of the probabilities; lower is better"),
        ("ece", "mean gap between stated confidence and accuracy"),
    ]
    if not two:  # sensitivity and specificity need a positive class
        meanings = [m for m in meanings if m[0] not in ("sensitivity", "specificity")]
    return [MetricSpec(key, metric_label(key), meaning) for key, meaning in meanings if key in metrics]


def intervals_of(metrics: dict) -> dict[str, tuple[float, float]]:
    """metrics.json's ``ci`` block ({metric: {low, high}}) as (low, high) pairs; undefined ones left out."""
    return {k: (v["low"], v["high"]) for k, v in (metrics.get("ci") or {}).items() if v}


def headline(metrics: dict, classes: Sequence[str], explained: bool = True) -> list[list[str]]:
    """metric, value, its confidence interval (and, for the HTML, what it says); then the test size."""
    intervals = intervals_of(metrics)
    header = ["metric", "value", ci_label(metrics)] + (["what it says"] if explained else [])
    rows = [header]
    for spec in metric_specs(metrics, classes):
        if not explained and spec.key not in MARKDOWN_METRICS:
            continue
        row = [spec.label, format_metric(metrics[spec.key]), format_ci(intervals.get(spec.key))]
        rows.append(row + ([spec.meaning] if explained else []))
    if "n_test" in metrics:
        rows.append(["test images", str(metrics["n_test"]), ""] + ([""] if explained else []))
    return rows


def decision_rule(metrics: dict, classes: Sequence[str]) -> str | None:
    """How two-class decisions were made, in words; None for argmax (more classes)."""
    rule = metrics.get("threshold")
    if not isinstance(rule, dict) or len(classes) != 2 or rule.get("value") is None:
        return None
    positive = classes[1]
    called = f"An image is called {positive} when P({positive}) >= {rule['value']:.4f}"
    if rule.get("chosen_on") == "val":
        found = [
            f"{k} {rule[f'val_{k}']:.3f}"
            for k in ("sensitivity", "specificity")
            if rule.get(f"val_{k}") is not None
        ]
        on_val = f"; on val: {', '.join(found)}" if found else ""
        n_val = f", {rule['n_val']} images" if rule.get("n_val") else ""
        return f"{called}, the cut-off chosen on the val split ({rule.get('rule')} rule{on_val}{n_val})."
    if rule.get("chosen_on") == "oof":
        found = [
            f"{k} {rule[f'{on}_{k}']:.3f} {where}"
            for on, where in (("oof", "out of fold"), ("val", "on val"))
            for k in ("sensitivity", "specificity")
            if rule.get(f"{on}_{k}") is not None
        ]
        return (
            f"{called}, the cut-off chosen on out-of-fold predictions over train+val ({rule.get('rule')} rule, "
            f"{rule.get('n_oof')} images; {', '.join(found)})."
        )
    if rule.get("chosen_on") == "fallback":
        return (
            f"{called}: the {rule.get('rule')} rule could not be applied ({rule.get('reason', 'no reason')})."
        )
    return f"{called}, a fixed cut-off from params."


def at_half_table(metrics: dict) -> list[list[str]] | None:
    """The decision metrics at the chosen cut-off beside those at 0.5, for two classes."""
    at_half = metrics.get("at_0.5")
    if not isinstance(at_half, dict) or not isinstance(metrics.get("threshold"), dict):
        return None
    cut = metrics["threshold"].get("value")
    rows = [["metric", f"at {cut:.4f} (used)" if cut is not None else "used", "at 0.5"]]
    for key in AT_HALF_METRICS:
        if key in metrics and key in at_half:
            rows.append([metric_label(key), format_metric(metrics[key]), format_metric(at_half[key])])
    return rows if len(rows) > 1 else None


def operating_points_table(metrics: dict) -> list[list[str]] | None:
    """Each cut-off chosen on val (or out of fold, as the decision was) with its sensitivity and specificity
    there and its test figures."""
    points = metrics.get("operating_points")
    if not isinstance(points, dict) or not points:
        return None
    on = next((p["chosen_on"] for p in points.values() if p.get("chosen_on") in ("val", "oof")), "val")
    where = "out of fold" if on == "oof" else "val"
    rows = [[f"cut-off chosen {'on ' if on == 'val' else ''}{where} by", "cut-off"]]
    rows[0] += [f"{where} sensitivity", f"{where} specificity"]
    rows[0] += [f"test {metric_label(k)}" for k in ("accuracy", "sensitivity", "specificity")]
    for name, point in points.items():
        rule = "Youden's J" if name == "youden" else name.replace("sensitivity_", "sensitivity >= ")
        if point.get("chosen_on") == "fallback":
            rule += f" (not applicable: {point.get('reason', 'no reason')}; 0.5 used)"
        rows.append(
            [rule, f"{point['value']:.4f}"]
            + [format_metric(point.get(f"{on}_{k}")) for k in ("sensitivity", "specificity")]
            + [format_metric(point.get(k)) for k in ("accuracy", "sensitivity", "specificity")]
        )
    return rows


def metrics_table(metrics: dict) -> list[list[str]]:
    """Precision, recall, F1 and support of each class."""
    rows = [["class", "precision", "recall", "F1", "support"]]
    for cls, v in metrics.get("per_class", {}).items():
        rows.append([cls, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])])
    return rows


BOOTSTRAP_NOTE = (
    "Intervals: bootstrap percentile intervals over {resamples} resamples of the test images; "
    "the decisions themselves are fixed, so they show the uncertainty from which images were tested."
)
OPERATING_POINTS_NOTE = (
    "Other operating points. Each cut-off is chosen as the one in use is, on val or out of fold "
    "(evaluate.threshold picks the rule, evaluate.decision_data the data). Test figures far from those "
    "mean that the data the cut-off was chosen on does not look like the test population."
)
RULES_NOTE = (
    "Both decision rules on this model (evaluate.decision_data, docs/decision.md): val fits calibration and "
    "cut-off on the val split; oof on out-of-fold predictions over train+val, the model mapped onto them. "
    "The served rule is marked; the other is shown to inform, not to be picked by its test figures."
)


def decision_rules_table(metrics: dict) -> list[list[str]] | None:
    """The test figures of each decision rule on this model (metrics.json's decision_rules)."""
    rules = metrics.get("decision_rules")
    if not isinstance(rules, dict) or not rules:
        return None
    served = (metrics.get("calibration") or {}).get("fitted_on")
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")
    rows = [["rule", "cut-off", "temperature", *(f"test {metric_label(k)}" for k in keys)]]
    for name, figures in rules.items():
        label = name + (" (served)" if name == served else "")
        if "skipped" in figures:
            rows.append([label, f"not fitted: {figures['skipped']}", *[""] * (len(keys) + 1)])
            continue
        cut = figures.get("threshold")
        rows.append(
            [label, "argmax" if cut is None else f"{cut:.4f}", f"{figures['temperature']:.3g}"]
            + [format_metric(figures.get(k)) for k in keys]
        )
    return rows


def calibration_line(metrics: dict) -> str | None:
    """How the probabilities were calibrated and what it changed on test (metrics.json's calibration)."""
    doc = metrics.get("calibration")
    if not doc:
        return None
    before, after = doc["before"], doc["after"]
    change = ", ".join(
        f"{name} {before[name]:.3f} -> {after[name]:.3f}" for name in ("ece", "brier", "log_loss")
    )
    if doc["method"] == "none":
        return f"Probabilities are the model's own (no calibration): ECE {after['ece']:.3f}."
    how = {
        "temperature": f"temperature scaling (T = {doc['temperature']:.3g}",
        "platt": "Platt scaling (a, b = {})".format(", ".join(f"{v:.3g}" for v in doc.get("platt") or [])),
        "isotonic": f"isotonic regression ({doc.get('isotonic_knots')} knots",
    }[doc["method"]]
    return (
        f"Probabilities calibrated by {how}, fitted on {_fitted_on(doc)}; predict and the served "
        f"model apply the same): on test, {change}."
    )


def _fitted_on(doc: dict) -> str:
    if doc.get("fitted_on") == "oof":
        return (
            f"{doc.get('n_oof')} out-of-fold predictions over train+val, the model mapped onto them through "
            f"{doc['n_val']} val images"
        )
    return f"{doc['n_val']} val images"


def guard_line(metrics: dict) -> str | None:
    """What the unfamiliar-input guard flags (metrics.json's guard)."""
    guard = metrics.get("guard")
    if not guard or not guard.get("fitted"):
        return None
    return (
        f"Unfamiliar-input guard (predict and the served model mark such images): it flags "
        f"{guard['test_flagged']:.1%} of the test images (cut-off accepting {guard['accept']:.0%} of val), "
        f"{guard['far']['flagged']:.0%} of far-away images (AUROC {guard['far']['auroc']:.3f}: "
        f"{guard['far']['images']}) and {guard['near']['flagged']:.0%} of nearer ones (AUROC "
        f"{guard['near']['auroc']:.3f}: {guard['near']['images']})."
    )


def headline_blocks(metrics: dict, classes: list[str]) -> list[Block]:
    """The "Test metrics" section: the headline table, how decisions were made, other cut-offs."""
    blocks: list[Block] = [Table(headline(metrics, classes), "headline")]
    if metrics.get("ci"):
        blocks.append(Paragraph(BOOTSTRAP_NOTE.format(resamples=metrics.get("bootstrap_resamples")), "note"))
    rule = decision_rule(metrics, classes)
    if rule:
        blocks.append(Paragraph(rule))
    for line in (
        calibration_line(metrics),
        guard_line(metrics),
        (metrics.get("shift") or {}).get("statement"),
    ):
        if line:
            blocks.append(Paragraph(line))
    at_half = at_half_table(metrics)
    if at_half:
        blocks += [Paragraph("The same decision metrics at the conventional cut-off of 0.5:"), Table(at_half)]
    points = operating_points_table(metrics)
    if points:
        blocks += [Paragraph(OPERATING_POINTS_NOTE), Table(points)]
    rules = decision_rules_table(metrics)
    if rules:
        blocks += [Paragraph(RULES_NOTE), Table(rules)]
    return blocks
