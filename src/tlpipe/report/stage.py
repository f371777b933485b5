"""The report stage: reads the evaluation and the data summaries, writes report.html and summary.md.

The HTML opens offline and can be mailed as one file: every figure and image is a
``data:`` URI and the style sheet is inline. Inputs are read defensively: a metric,
curve or file that the evaluate stage did not write hides its item rather than failing
the stage, and the MLflow comparison never fails it.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import cast

import yaml

from tlpipe.core import constants as C
from tlpipe.core import lineage, tracking
from tlpipe.core.config import PIPELINE_SECTIONS, Params, flat_params
from tlpipe.core.files import atomic_write, path_digest, read_json
from tlpipe.report import inputs
from tlpipe.report.comparison import comparison_blocks, figures_from_metrics, find_comparison
from tlpipe.report.dataset_view import data_cautions, dataset_blocks
from tlpipe.report.figures import (
    figure_to_data_uri,
    plot_confusion,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from tlpipe.report.gallery import gradcam_blocks, mistakes_blocks
from tlpipe.report.metrics_view import decision_rule, headline_blocks, metrics_table
from tlpipe.report.model_card import card_blocks, card_markdown, card_sections
from tlpipe.report.page import Block, Figure, FigureRow, Paragraph, Preformatted, Section, Table
from tlpipe.report.render import render_html, render_markdown

logger = logging.getLogger(__name__)


def figure_blocks(figures: list[Figure], missing: str) -> list[Block]:
    """Figures side by side, or a line saying that there are none."""
    return [FigureRow(figures)] if figures else [Paragraph(missing)]


def build_sections(
    metrics: dict,
    classes: list[str],
    evaluation_dir: Path,
    histories: tuple[list[dict], list[dict]],
    augmented_dir: Path | None,
    model_path: Path | None,
    dataset: list[Block],
    comparison: list[Block],
    params_text: str,
) -> list[Section]:
    """Every section of the page, in reading order; an input that is missing says so in its section."""
    frozen, fine = histories
    confusion = []
    if metrics.get("confusion_matrix"):
        uri = figure_to_data_uri(plot_confusion(metrics["confusion_matrix"], classes))
        confusion.append(Figure("confusion", uri))
    # two classes: the matrix counts the decisions at the chosen cut-off, not at 0.5
    cut_off: list[Block] = []
    if decision_rule(metrics, classes):
        cut_off.append(Paragraph("Decisions at the cut-off given under Test metrics.", "note"))
    curves = []
    roc = inputs.load_curves(evaluation_dir / "roc", ("fpr", "tpr"))
    pr = inputs.load_curves(evaluation_dir / "pr", ("recall", "precision"))
    if roc:
        curves.append(Figure("roc", figure_to_data_uri(plot_roc(roc))))
    if pr:
        curves.append(Figure("pr", figure_to_data_uri(plot_pr(pr))))
    fields = ("confidence", "accuracy", "count")
    calibration = inputs.numeric_rows(evaluation_dir / "calibration.csv", fields)
    if calibration:
        # a run evaluated before calibration existed has no raw table
        raw = inputs.numeric_rows(evaluation_dir / "calibration_raw.csv", fields)
        raw_ece = ((metrics.get("calibration") or {}).get("before") or {}).get("ece")
        figure = plot_reliability(calibration, metrics.get("ece"), raw, raw_ece)
        curves.append(Figure("reliability", figure_to_data_uri(figure)))
    training = []
    if frozen or fine:
        training.append(Figure("training", figure_to_data_uri(plot_training_curves(frozen, fine))))
    predictions = inputs.optional_rows(evaluation_dir / "predictions.csv")
    return [
        Section("headline", "Test metrics", headline_blocks(metrics, classes)),
        Section("per-class", "Per class", [Table(metrics_table(metrics))]),
        Section("confusion", "Confusion matrix", figure_blocks(confusion, "no confusion matrix") + cut_off),
        Section("curves", "ROC, precision-recall and reliability", figure_blocks(curves, "no curves found")),
        Section("training", "Training", figure_blocks(training, "no training history")),
        Section("mistakes", "Most confident mistakes", mistakes_blocks(predictions, augmented_dir)),
        Section("gradcam", "Grad-CAM", gradcam_blocks(predictions, model_path, augmented_dir, classes)),
        Section("dataset", "Dataset", dataset),
        Section("comparison", "Comparison with earlier models", comparison),
        Section("params", "Parameters", [Preformatted(params_text)]),
    ]


def write_report(
    evaluation_dir: Path,
    frozen_history: Path,
    fine_history: Path,
    params: Params,
    html_out: Path,
    markdown_out: Path,
    augmented_dir: Path | None = None,
    model_path: Path | None = None,
    split_summary: Path | None = None,
    quarantine: Path | None = None,
    model_card_out: Path | None = None,
) -> None:
    """The report stage: report.html and summary.md from the evaluation, the histories and the data."""
    evaluation_dir = Path(evaluation_dir)
    # the evaluate stage writes metrics.json as one JSON object
    metrics = cast(dict, read_json(evaluation_dir / "metrics.json"))
    classes = inputs.class_names(metrics, augmented_dir)
    this = figures_from_metrics(metrics, params.train_frozen.weights, evaluation_dir / "metrics.json")
    comparison = find_comparison(metrics)
    summary = inputs.optional_json(split_summary)
    summary = summary if isinstance(summary, dict) else None
    dataset = dataset_blocks(summary, inputs.optional_rows(quarantine))
    sections = build_sections(
        metrics,
        classes,
        evaluation_dir,
        (inputs.history(frozen_history), inputs.history(fine_history)),
        augmented_dir,
        model_path,
        dataset,
        comparison_blocks(this, comparison),
        yaml.safe_dump(params.model_dump(include=set(PIPELINE_SECTIONS)), sort_keys=False),
    )
    card = card_sections(metrics, classes, params, summary, _digest(augmented_dir), _commit())
    # before the params, at the end: the top of the page stays the figures
    sections.insert(len(sections) - 1, Section("model-card", "Model card", card_blocks(card)))
    card_out = Path(model_card_out or Path(markdown_out).with_name("model_card.md"))
    for path, text in (
        (html_out, render_html(classes, sections)),
        (markdown_out, render_markdown(metrics, classes, this, comparison, html_out, data_cautions(summary))),
        (card_out, card_markdown(card)),
    ):
        # utf-8: what the HTML declares, whatever the locale; atomic: a kill never truncates it
        atomic_write(Path(path), partial(Path.write_text, data=text, encoding="utf-8"))
    with tracking.stage_run("report", flat_params(params, PIPELINE_SECTIONS)):
        tracking.log_metrics({k: metrics[k] for k in ("accuracy", "macro_f1") if metrics.get(k) is not None})
        tracking.log_artifact(str(html_out))
        tracking.log_artifact(str(markdown_out))
        tracking.log_artifact(str(card_out))
    logger.info("report: wrote %s, %s and %s", html_out, markdown_out, card_out)


def _digest(augmented_dir: Path | None) -> str:
    return (
        path_digest(augmented_dir)
        if augmented_dir is not None and Path(augmented_dir).is_dir()
        else "unknown"
    )


def _commit() -> str:
    state = lineage.git_state()
    dirty = " (with uncommitted changes)" if state.get(C.GIT_DIRTY_TAG) == "true" else ""
    return (state.get(C.GIT_COMMIT_TAG) or "unknown") + dirty


def report_stage(params: Params, args: argparse.Namespace) -> None:
    """stages/report.py's entry point: its command-line paths, by name, into write_report."""
    write_report(
        args.evaluation,
        args.frozen_history,
        args.fine_history,
        params,
        args.html,
        args.markdown,
        augmented_dir=args.augmented,
        model_path=args.model,
        split_summary=args.split_summary,
        quarantine=args.quarantine,
        model_card_out=args.model_card,
    )
