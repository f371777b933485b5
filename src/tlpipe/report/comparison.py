"""This model beside earlier ones: the best from-scratch baseline and best pretrained run in MLflow.

The comparison is a courtesy, not a requirement: when MLflow cannot be queried or holds
no earlier evaluate run, the section says why and the stage carries on.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.core import constants as C
from tlpipe.core import tracking
from tlpipe.report.figures import figure_to_data_uri, plot_comparison
from tlpipe.report.metrics_view import NO_CI, format_ci, format_metric, intervals_of, metric_label
from tlpipe.report.page import Block, Figure, Paragraph, Table

BASELINE_WEIGHTS = "none"  # train_frozen.weights of a from-scratch baseline
COMPARED = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "roc_auc", "pr_auc")
COMPARED_LOWER_BETTER = ("log_loss", "brier", "ece")

# figures that, all equal, mark an MLflow run as the evaluation this report shows
_IDENTITY = ("n_test", "accuracy", "macro_f1", "roc_auc", "log_loss")

COMPARISON_NOTE = (
    f"From the evaluate runs in MLflow other than this model's: the best from-scratch baseline "
    f"({C.WEIGHTS_TAG} = {BASELINE_WEIGHTS}) and the best other pretrained model, each by test ROC-AUC."
)


@dataclass(frozen=True)
class RunFigures:
    """One model's test metrics: this model's from metrics.json, earlier ones from MLflow."""

    name: str
    source: str  # where the figures come from, in words
    metrics: dict[str, float]
    ci: dict[str, Sequence[float]]

    def value(self, key: str) -> float:
        """The metric as a float; NaN when this model has none."""
        value = self.metrics.get(key)
        return math.nan if value is None else float(value)

    def error_bar(self, key: str) -> tuple[float, float]:
        """Distances from the value down and up to its interval, for matplotlib's yerr."""
        interval, value = self.ci.get(key), self.value(key)
        if not interval or math.isnan(value):
            return (math.nan, math.nan)  # matplotlib draws no bar for NaN
        return (max(value - interval[0], 0.0), max(interval[1] - value, 0.0))

    def cell(self, key: str) -> str:
        """The metric as a table cell: its value, then its interval when there is one."""
        value = self.metrics.get(key)
        if value is None:
            return NO_CI
        interval = self.ci.get(key)
        return format_metric(value) + (f" {format_ci(interval)}" if interval else "")


@dataclass(frozen=True)
class Comparison:
    baseline: RunFigures | None
    previous: RunFigures | None
    reason: str = ""  # why there is nothing to compare, when there is not

    @property
    def columns(self) -> list[RunFigures]:
        return [c for c in (self.baseline, self.previous) if c is not None]


def figures_from_metrics(metrics: dict, weights: str, source: Path) -> RunFigures:
    """This model's figures, from its metrics.json."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    intervals: dict[str, Sequence[float]] = dict(intervals_of(metrics))
    return RunFigures(f"this model ({weights})", str(source), numbers, intervals)


def figures_from_run(run: Any, name: str) -> RunFigures:
    """An MLflow evaluate run's figures; its ``ci.<metric>.low/high`` metrics become intervals."""
    logged = dict(run.data.metrics)
    intervals: dict[str, Sequence[float]] = {}
    for key in list(logged):
        low, high = logged.get(f"ci.{key}.low"), logged.get(f"ci.{key}.high")
        if low is not None and high is not None:
            intervals[key] = (low, high)
    when = ""
    if run.info.start_time:
        when = dt.datetime.fromtimestamp(run.info.start_time / 1000, tz=dt.UTC).strftime(
            " of %Y-%m-%d %H:%M UTC"
        )
    weights = run.data.tags.get(C.WEIGHTS_TAG, "?")
    return RunFigures(name, f"MLflow run {run.info.run_id[:8]}{when}, weights {weights}", logged, intervals)


def is_this_evaluation(logged: dict[str, float], metrics: dict) -> bool:
    """Whether an MLflow evaluate run logged exactly the figures in metrics.json.

    DVC reruns evaluate only when its inputs change, so this model's run need not be the
    latest; one with identical figures is this model (or one that cannot be told from it).
    """
    shared = [k for k in _IDENTITY if metrics.get(k) is not None]
    return bool(shared) and all(
        k in logged and math.isclose(logged[k], float(metrics[k]), rel_tol=1e-9, abs_tol=1e-12)
        for k in shared
    )


def best_by_roc_auc(runs: list) -> Any | None:
    """The run with the highest logged ROC-AUC; None when no run logged one."""
    scored = [r for r in runs if r.data.metrics.get("roc_auc") is not None]
    return max(scored, key=lambda r: r.data.metrics["roc_auc"], default=None)


def evaluate_runs() -> list:
    """Finished evaluate runs of this experiment, newest first; [] when the experiment does not exist."""
    import mlflow  # only the comparison needs it; imported late as it takes a second

    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.experiment_name())
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{C.STAGE_TAG}` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )


def pick_comparison(runs: list, metrics: dict) -> Comparison:
    """The best earlier from-scratch baseline and the best earlier pretrained run, by ROC-AUC."""
    others = [r for r in runs if not is_this_evaluation(r.data.metrics, metrics)]
    tagged = [r for r in others if C.WEIGHTS_TAG in r.data.tags]
    baselines = [r for r in tagged if r.data.tags[C.WEIGHTS_TAG].strip().lower() == BASELINE_WEIGHTS]
    pretrained = [r for r in tagged if r.data.tags[C.WEIGHTS_TAG].strip().lower() != BASELINE_WEIGHTS]
    baseline, previous = best_by_roc_auc(baselines), best_by_roc_auc(pretrained)
    if baseline is None and previous is None:
        reason = (
            f"no earlier evaluate run tagged {C.WEIGHTS_TAG} with a ROC-AUC in MLflow"
            if others
            else "no earlier evaluate run in MLflow"
        )
        return Comparison(None, None, reason)
    return Comparison(
        None if baseline is None else figures_from_run(baseline, "from-scratch baseline"),
        None if previous is None else figures_from_run(previous, "previous best pretrained"),
    )


def find_comparison(metrics: dict) -> Comparison:
    """The comparison columns; never raises, as the report must not depend on MLflow being there."""
    try:
        runs = evaluate_runs()
    except Exception as err:  # any store failure (schema, driver, URI) only hides the section
        return Comparison(None, None, f"MLflow could not be queried ({type(err).__name__}: {err})")
    return pick_comparison(runs, metrics)


def _count(value: float | None) -> str:
    return NO_CI if value is None else str(int(value))


def comparison_table(columns: list[RunFigures]) -> list[list[str]]:
    """A row per metric that this model and at least one other have, then the test sizes."""
    rows = [["metric", *[c.name for c in columns]]]
    for key in (*COMPARED, *COMPARED_LOWER_BETTER, "n_test"):
        if any(key in c.metrics for c in columns[1:]) and key in columns[0].metrics:
            name = metric_label(key) + (" (lower is better)" if key in COMPARED_LOWER_BETTER else "")
            cells = [c.cell(key) if key != "n_test" else _count(c.metrics.get(key)) for c in columns]
            rows.append(["test images" if key == "n_test" else name, *cells])
    return rows


def comparison_blocks(this: RunFigures, comparison: Comparison) -> list[Block]:
    """The comparison section: the table, where each column comes from, and a bar chart."""
    if not comparison.columns:
        return [Paragraph(f"Nothing to compare yet: {comparison.reason}.")]
    columns = [this, *comparison.columns]
    blocks: list[Block] = [Paragraph(COMPARISON_NOTE, "note"), Table(comparison_table(columns))]
    blocks += [Paragraph(f"{c.name}: {c.source}.", "note") for c in comparison.columns]
    sizes = {c.metrics.get("n_test") for c in columns}
    if len(sizes) > 1:
        blocks.append(
            Paragraph(
                "The test sets differ in size: these runs were not evaluated on the same images.", "warn"
            )
        )
    keys = [k for k in COMPARED if all(not math.isnan(c.value(k)) for c in columns)]
    if keys:
        blocks.append(Figure("comparison", figure_to_data_uri(plot_comparison(columns, keys))))
    return blocks


def comparison_line(this: RunFigures, comparison: Comparison) -> str:
    """The comparison in one line of the Markdown summary: ROC-AUC of each earlier model."""
    if not comparison.columns:
        return f"Comparison: nothing to compare yet ({comparison.reason})."
    parts = []
    for column in comparison.columns:
        delta = this.value("roc_auc") - column.value("roc_auc")
        shown = "n/a" if math.isnan(delta) else f"{delta:+.4f}"
        parts.append(f"{column.name} {format_metric(column.metrics.get('roc_auc'))} (this model {shown})")
    return "ROC-AUC vs " + "; ".join(parts) + "."
