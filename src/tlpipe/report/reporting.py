"""A self-contained HTML report and a Markdown summary short enough for a CI job summary.

The HTML opens offline and can be mailed as one file: every figure and image is a
``data:`` URI and the style sheet is inline. Inputs are read defensively: a metric,
curve or file that the evaluate stage did not write hides its item rather than failing
the stage, and the MLflow comparison never fails it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run from shells and CI without a display
import matplotlib.pyplot as plt
import numpy as np
import yaml
from PIL import Image

from tlpipe.core import constants as C
from tlpipe.core import tracking
from tlpipe.core.config import PIPELINE_SECTIONS, SUMMARY_METRICS, Params, flat_params
from tlpipe.core.errors import PipelineError
from tlpipe.core.images import data_uri, png_data_uri
from tlpipe.model.gradcam import gradcam_maps, overlay
from tlpipe.core.files import atomic_write, read_csv, read_json

GALLERY_SIZE = 12  # most confident mistakes shown
GRADCAM_CORRECT = 4  # Grad-CAM sample: correct and wrong test images, explained in one batch
GRADCAM_WRONG = 4
GRADCAM_BATCH = 16
THUMBNAIL_SIDE = 128  # px; larger images are scaled down so the HTML stays small
MARKDOWN_MAX_CLASSES = 8  # more classes: the per-class table is left to the HTML, keeping the summary short
QUARANTINE_SHOWN = 20
NO_CI = "-"

# ------------------------------------------------------------------ inputs


def _history(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    return [{k: float(v) for k, v in row.items() if _is_float(v)} for row in read_csv(path)]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _numeric_rows(path: Path, fields: Sequence[str]) -> list[dict[str, float]]:
    """Rows of a CSV with the given numeric fields; rows lacking one are left out."""
    if not Path(path).is_file():
        return []
    rows = read_csv(path)
    return [{f: float(r[f]) for f in fields} for r in rows if all(_is_float(r.get(f)) for f in fields)]


def load_curves(folder: Path, fields: tuple[str, str]) -> dict[str, list[dict[str, float]]]:
    """One curve per class, from ``folder/<class>.csv``; a missing folder gives none."""
    if not Path(folder).is_dir():
        return {}
    curves = {p.stem: _numeric_rows(p, fields) for p in sorted(Path(folder).glob("*.csv"))}
    return {cls: points for cls, points in curves.items() if points}


def _optional_json(path: Path | None) -> object | None:
    if path is None or not Path(path).is_file():
        return None
    return read_json(path)


def _optional_rows(path: Path | None) -> list[dict[str, str]]:
    if path is None or not Path(path).is_file():
        return []
    return read_csv(path)


def class_names(metrics: dict, augmented_dir: Path | None) -> list[str]:
    """The model's class order: classes.json of the augmented data, else the per-class block's."""
    listed = _optional_json(None if augmented_dir is None else Path(augmented_dir) / "classes.json")
    return list(listed) if isinstance(listed, list) else list(metrics.get("per_class", {}))


# ------------------------------------------------------------------ formatting


def format_metric(value: float | None) -> str:
    """None stands for a metric that is undefined on this test split."""
    return "n/a" if value is None else f"{value:.4f}"


def format_ci(interval: Sequence[float] | None) -> str:
    return NO_CI if not interval else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def ci_label(metrics: dict) -> str:
    level = metrics.get("ci_level")
    return f"{level * 100:g}% CI" if isinstance(level, (int, float)) else "CI"


def plain_text(text: str) -> str:
    """A label matplotlib shows as written: a "$" would otherwise start math mode."""
    return text.replace("$", r"\$")


def figure_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buf.getvalue())


def _html_table(rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        # a "|" in a class name would otherwise split its cell in two
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * len(rows[0]), *[line(r) for r in rows[1:]]])


def _img(uri: str, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="{uri}">'


def _p(text: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f"<p{cls}>{html.escape(text)}</p>"


# ------------------------------------------------------------------ headline metrics


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


# the rows of the Markdown summary: what a reviewer of a CI run needs at a glance
MARKDOWN_METRICS = SUMMARY_METRICS


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
    if rule.get("chosen_on") == "fallback":
        return (
            f"{called}: the {rule.get('rule')} rule could not be applied ({rule.get('reason', 'no reason')})."
        )
    return f"{called}, a fixed cut-off from params."


AT_HALF_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "macro_f1")


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
    """Each val-chosen cut-off with its val sensitivity and specificity and its test figures."""
    points = metrics.get("operating_points")
    if not isinstance(points, dict) or not points:
        return None
    rows = [["cut-off chosen on val by", "cut-off", "val sensitivity", "val specificity"]]
    rows[0] += [f"test {metric_label(k)}" for k in ("accuracy", "sensitivity", "specificity")]
    for name, point in points.items():
        rule = "Youden's J" if name == "youden" else name.replace("sensitivity_", "sensitivity >= ")
        if point.get("chosen_on") == "fallback":
            rule += f" (not applicable: {point.get('reason', 'no reason')}; 0.5 used)"
        rows.append(
            [rule, f"{point['value']:.4f}"]
            + [format_metric(point.get(k)) for k in ("val_sensitivity", "val_specificity")]
            + [format_metric(point.get(k)) for k in ("accuracy", "sensitivity", "specificity")]
        )
    return rows


def metrics_table(metrics: dict) -> list[list[str]]:
    rows = [["class", "precision", "recall", "F1", "support"]]
    for cls, v in metrics.get("per_class", {}).items():
        rows.append([cls, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])])
    return rows


# ------------------------------------------------------------------ figures


def plot_training_curves(frozen: list[dict], fine: list[dict]):
    """Loss and accuracy of both phases on one epoch axis, the phase change marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = len(frozen)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for rows, start, phase in ((frozen, 0, "frozen"), (fine, offset, "fine-tune")):
            epochs = [start + r["epoch"] for r in rows if "epoch" in r]
            for key, style, split in ((metric, "o-", "train"), (f"val_{metric}", "s--", "val")):
                if rows and len(epochs) == len(rows) and all(key in r for r in rows):
                    ax.plot(epochs, [r[key] for r in rows], style, ms=3, label=f"{phase} {split}")
        if fine and frozen:
            ax.axvline(offset + 0.5, color="grey", lw=1, ls=":")
            # x in epochs, y in axes fractions: the label sits halfway up the boundary whatever the scale
            ax.text(
                offset + 0.5,
                0.5,
                "fine-tuning starts ",
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha="right",
                va="center",
                fontsize=7,
                color="grey",
            )
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the recall of each class on the diagonal); empty rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def plot_confusion(matrix: list[list[int]], classes: list[str]):
    """Counts and row-normalised shares side by side: rows actual, columns predicted."""
    counts = np.asarray(matrix)
    shares = row_normalised(counts)
    side = min(max(0.7 * len(classes) + 2.2, 4.0), 10)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    labels = [plain_text(c) for c in classes]
    font = 9 if len(classes) <= 10 else 6
    for ax, values, title, text in (
        (axes[0], counts, "counts", [str(v) for v in counts.ravel()]),
        (
            axes[1],
            shares,
            "share of each actual class\n(rows sum to 100%)",
            [f"{v:.0%}" for v in shares.ravel()],
        ),
    ):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(classes)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title, fontsize=10)
        peak = values.max() if values.size else 0
        for (i, j), cell in zip(np.ndindex(values.shape), text):
            dark = values[i, j] > peak / 2
            ax.text(j, i, cell, ha="center", va="center", fontsize=font, color="white" if dark else "black")
    fig.suptitle("confusion matrix (test)")
    fig.tight_layout()
    return fig


def curve_area(x: Sequence[float], y: Sequence[float]) -> float:
    """The trapezoidal area under a curve given left to right."""
    x, y = np.asarray(x), np.asarray(y)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def plot_roc(curves: dict[str, list[dict]]):
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for cls, points in curves.items():
        fpr, tpr = [p["fpr"] for p in points], [p["tpr"] for p in points]
        ax.plot(fpr, tpr, label=f"{plain_text(cls)} (AUC {curve_area(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC (test, one-vs-rest)")
    ax.legend(fontsize=8)
    return fig


def plot_pr(curves: dict[str, list[dict]]):
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for cls, points in curves.items():
        ax.plot([p["recall"] for p in points], [p["precision"] for p in points], label=plain_text(cls))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_title("precision-recall (test, one-vs-rest)")
    ax.legend(fontsize=8)
    return fig


def plot_reliability(table: list[dict[str, float]], ece: float | None):
    """Accuracy against stated confidence per bin (on the diagonal: calibrated), with bin sizes below."""
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    confidence = [r["confidence"] for r in table]
    top.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfectly calibrated")
    counts = np.array([r["count"] for r in table], dtype=np.float64)
    # marker area by bin size: a bin of three images should not catch the eye like one of three hundred
    sizes = 15 + 185 * counts / counts.max()
    top.plot(confidence, [r["accuracy"] for r in table], "-", color="tab:red", lw=0.8, alpha=0.5)
    top.scatter(confidence, [r["accuracy"] for r in table], s=sizes, color="tab:red", label="model", zorder=3)
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1.02)
    top.set_title("reliability (test)" + ("" if ece is None else f": ECE {ece:.3f}"))
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(confidence, counts, width=0.05, color="tab:blue")
    bottom.set_xlim(0, 1.02)
    bottom.set_xlabel("top-class confidence")
    bottom.set_ylabel("images")
    return fig


def plot_comparison(columns: list[RunFigures], keys: Sequence[str]):
    """Grouped bars per metric, one colour per model, the confidence interval as an error bar."""
    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 2.5, 3.6))
    width = 0.8 / len(columns)
    for k, column in enumerate(columns):
        x = np.arange(len(keys)) + (k - (len(columns) - 1) / 2) * width
        values = np.array([column.value(key) for key in keys], dtype=np.float64)
        errors = np.array([column.error_bar(key) for key in keys], dtype=np.float64).T
        ax.bar(x, values, width, yerr=errors, capsize=3, label=plain_text(column.name))
    ax.set_xticks(range(len(keys)), [metric_label(k) for k in keys], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("test metrics (error bars: confidence interval where logged)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


# ------------------------------------------------------------------ images: mistakes and Grad-CAM


def probability(row: dict[str, str], cls: str) -> float:
    value = row.get(f"p_{cls}")
    return float(value) if _is_float(value) else math.nan


def _confidence(row: dict[str, str]) -> float:
    value = probability(row, row["predicted"])
    return -1.0 if math.isnan(value) else value


def confident_mistakes(rows: Iterable[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The ``n`` wrong predictions with the highest probability for the predicted class."""
    wrong = [r for r in rows if r.get("label") != r.get("predicted")]
    return sorted(wrong, key=_confidence, reverse=True)[:n]


def confident_hits(rows: Iterable[dict[str, str]], n: int) -> list[dict[str, str]]:
    """Up to ``n`` right predictions, the most confident of each true class in turn."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if row.get("label") == row.get("predicted"):
            by_class.setdefault(row["label"], []).append(row)
    queues = [sorted(rs, key=_confidence, reverse=True) for _, rs in sorted(by_class.items())]
    picked = []
    for rank in range(max((len(q) for q in queues), default=0)):
        picked += [q[rank] for q in queues if rank < len(q)]
    return picked[:n]


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """An image as uint8 RGB, resized to (height, width) when given; None when unreadable."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(rgb)
    except (OSError, ValueError):  # missing or not an image: that card says so instead
        return None


def thumbnail(array: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Scaled down to at most ``side`` px; small images stay as they are (the page scales them up)."""
    img = Image.fromarray(array)
    img.thumbnail((side, side), Image.BILINEAR)
    return np.asarray(img)


def _caption(row: dict[str, str]) -> str:
    truth, guess = html.escape(row["label"]), html.escape(row["predicted"])
    p = probability(row, row["predicted"])
    shown = "n/a" if math.isnan(p) else f"{p:.3f}"
    return f"true <b>{truth}</b><br>predicted <b>{guess}</b><br>P({guess}) = {shown}"


def mistake_cards(rows: list[dict[str, str]], augmented_dir: Path | None) -> str:
    cards = []
    for row in rows:
        pixels = None if augmented_dir is None else read_rgb(Path(augmented_dir) / row["path"])
        picture = '<div class="missing">image not found</div>'
        if pixels is not None:
            picture = _img(png_data_uri(thumbnail(pixels)), f"test image {row['path']}", "thumb")
        cards.append(f'<figure class="card">{picture}<figcaption>{_caption(row)}</figcaption></figure>')
    return f'<div class="gallery">{"".join(cards)}</div>'


@dataclass(frozen=True)
class CamPanel:
    row: dict[str, str]
    kind: str  # "correct" or "wrong"
    image: np.ndarray  # uint8 RGB at the model's input size
    maps: list[tuple[str, np.ndarray]]  # (explained class, heatmap in [0, 1])


def gradcam_panels(
    model_path: Path, augmented_dir: Path, sample: list[tuple[str, dict]], classes: list[str]
) -> list[CamPanel]:
    """Grad-CAM maps for each sampled image: its predicted class and, when wrong, its true class."""
    from tlpipe.model.storage import load_model  # TensorFlow loads the model; only this section needs it

    model = load_model(model_path)
    dims = model.input_shape[1:3]
    # images are resized to what the model takes; one taking any size gets them as they are
    size = None if None in dims else (int(dims[0]), int(dims[1]))
    index = {c: i for i, c in enumerate(classes)}
    kept = []
    for kind, row in sample:
        pixels = read_rgb(Path(augmented_dir) / row["path"], size)
        if pixels is not None and row["label"] in index and row["predicted"] in index:
            kept.append((kind, row, pixels))
    if not kept:
        return []
    targets = [(k, row["predicted"]) for k, (_, row, _) in enumerate(kept)]
    targets += [(k, row["label"]) for k, (_, row, _) in enumerate(kept) if row["label"] != row["predicted"]]
    images = np.stack([kept[k][2] for k, _ in targets]).astype(np.float32)
    maps = gradcam_maps(model, images, np.array([index[c] for _, c in targets]), batch_size=GRADCAM_BATCH)
    explained: dict[int, list[tuple[str, np.ndarray]]] = {}
    for (k, cls), heat in zip(targets, maps):
        explained.setdefault(k, []).append((cls, heat))
    return [CamPanel(row, kind, pixels, explained[k]) for k, (kind, row, pixels) in enumerate(kept)]


def _cam_figure(image: np.ndarray, cls: str, heat: np.ndarray, role: str) -> str:
    caption = f"{role} {html.escape(cls)}"
    # an all-zero map: nothing pushed this class's score up (one sigmoid unit: often the unpicked class)
    picture = '<div class="missing">no evidence</div>'
    if heat.max() > 0:
        picture = _img(png_data_uri(thumbnail(overlay(image, heat))), f"Grad-CAM for {cls}", "thumb")
    return f'<figure class="card">{picture}<figcaption>{caption}</figcaption></figure>'


def gradcam_html(panels: list[CamPanel]) -> str:
    blocks = []
    for panel in panels:
        original = _img(png_data_uri(thumbnail(panel.image)), f"test image {panel.row['path']}", "thumb")
        figures = [f'<figure class="card">{original}<figcaption>{_caption(panel.row)}</figcaption></figure>']
        for cls, heat in panel.maps:
            role = "evidence for predicted" if cls == panel.row["predicted"] else "evidence for true"
            figures.append(_cam_figure(panel.image, cls, heat, role))
        blocks.append(f'<div class="cam {panel.kind}"><h3>{panel.kind}</h3>{"".join(figures)}</div>')
    return f'<div class="cams">{"".join(blocks)}</div>'


GRADCAM_NOTE = (
    "Grad-CAM colours the regions whose features raised the model's score for the named class "
    "(red: most). It shows where the model looked, not whether it was right. With two classes the "
    "model has one output, so evidence for one class is evidence against the other: the map for "
    "the class it did not pick is often empty ('no evidence')."
)


def gradcam_section(
    rows: list[dict[str, str]], model_path: Path | None, augmented_dir: Path | None, classes: list[str]
) -> str:
    if not rows or model_path is None or augmented_dir is None:
        return _p("No per-image predictions or no model: nothing to explain.")
    sample = [("correct", r) for r in confident_hits(rows, GRADCAM_CORRECT)]
    sample += [("wrong", r) for r in confident_mistakes(rows, GRADCAM_WRONG)]
    try:
        panels = gradcam_panels(Path(model_path), Path(augmented_dir), sample, classes)
    except (PipelineError, ValueError, FileNotFoundError) as err:  # a model Grad-CAM cannot take apart
        print(f"report: warning: no Grad-CAM: {err}", file=sys.stderr)
        return _p(f"Grad-CAM could not be computed: {err}")
    if not panels:
        return _p("None of the sampled test images could be read: nothing to explain.")
    return _p(GRADCAM_NOTE, "note") + gradcam_html(panels)


# ------------------------------------------------------------------ dataset


def split_table(summary: dict) -> list[list[str]] | None:
    """Images per class (rows) and split (columns), with totals."""
    counts = summary.get("counts")
    if not isinstance(counts, dict) or not counts:
        return None
    splits = list(counts)
    classes = summary.get("classes") or sorted({c for per in counts.values() for c in per})
    rows = [["class", *splits, "total"]]
    for cls in classes:
        values = [int(counts[s].get(cls, 0)) for s in splits]
        rows.append([cls, *map(str, values), str(sum(values))])
    totals = [sum(int(v) for v in counts[s].values()) for s in splits]
    rows.append(["all", *map(str, totals), str(sum(totals))])
    return rows


def split_notes(summary: dict) -> list[str]:
    notes = []
    duplicates = summary.get("duplicates") or {}
    if "rows_in" in summary and "total" in summary:
        notes.append(f"{summary['rows_in']} images after download; {summary['total']} kept by the split.")
    if duplicates.get("dropped"):
        notes.append(
            f"{duplicates['dropped']} duplicate images dropped ({duplicates.get('sets', '?')} sets of "
            f"identical pixels; {duplicates.get('conflicting_sets', 0)} with conflicting labels)."
        )
    if summary.get("grouped_by") not in (None, "none"):
        notes.append(f"Grouped by {summary['grouped_by']}: no group spans two splits.")
    if summary.get("imbalance_ratio") is not None:
        notes.append(f"Largest / smallest training class: {summary['imbalance_ratio']}.")
    note = (summary.get("source_splits") or {}).get("note")
    if note:
        notes.append(f"Splits: {note}.")
    return notes


def quarantine_html(rows: list[dict[str, str]]) -> str:
    if not rows:
        return _p("No input files were quarantined.")
    shown = [["file", "reason"]] + [[r.get("path", ""), r.get("reason", "")] for r in rows[:QUARANTINE_SHOWN]]
    more = len(rows) - QUARANTINE_SHOWN
    tail = _p(f"... and {more} more in quarantine.csv.") if more > 0 else ""
    return (
        _p(f"Input files rejected by the download stage, so not used: {len(rows)}.")
        + _html_table(shown)
        + tail
    )


def dataset_section(summary: dict | None, quarantined: list[dict[str, str]]) -> str:
    parts = []
    table = None if summary is None else split_table(summary)
    parts.append(_html_table(table) if table else _p("No split summary found."))
    parts += [_p(note) for note in ([] if summary is None else split_notes(summary))]
    parts.append("<h3>Quarantined files</h3>" + quarantine_html(quarantined))
    return "".join(parts)


# ------------------------------------------------------------------ comparison with earlier runs (MLflow)

BASELINE_WEIGHTS = "none"  # train_frozen.weights of a from-scratch baseline
COMPARED = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "roc_auc", "pr_auc")
COMPARED_LOWER_BETTER = ("log_loss", "brier", "ece")


@dataclass(frozen=True)
class RunFigures:
    """One model's test metrics: this model's from metrics.json, earlier ones from MLflow."""

    name: str
    source: str  # where the figures come from, in words
    metrics: dict[str, float]
    ci: dict[str, Sequence[float]]

    def value(self, key: str) -> float:
        value = self.metrics.get(key)
        return math.nan if value is None else float(value)

    def error_bar(self, key: str) -> tuple[float, float]:
        interval, value = self.ci.get(key), self.value(key)
        if not interval or math.isnan(value):
            return (math.nan, math.nan)  # matplotlib draws no bar for NaN
        return (max(value - interval[0], 0.0), max(interval[1] - value, 0.0))

    def cell(self, key: str) -> str:
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
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    intervals = intervals_of(metrics)
    return RunFigures(f"this model ({weights})", str(source), numbers, intervals)


def figures_from_run(run, name: str) -> RunFigures:
    logged = dict(run.data.metrics)
    intervals = {}
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


# figures that, all equal, mark an MLflow run as the evaluation this report shows
_IDENTITY = ("n_test", "accuracy", "macro_f1", "roc_auc", "log_loss")


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


def best_by_roc_auc(runs: list) -> object | None:
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
    except Exception as err:  # noqa: BLE001 - any store failure (schema, driver, URI) only hides the section
        return Comparison(None, None, f"MLflow could not be queried ({type(err).__name__}: {err})")
    return pick_comparison(runs, metrics)


def comparison_table(columns: list[RunFigures]) -> list[list[str]]:
    rows = [["metric", *[c.name for c in columns]]]
    for key in (*COMPARED, *COMPARED_LOWER_BETTER, "n_test"):
        if any(key in c.metrics for c in columns[1:]) and key in columns[0].metrics:
            name = metric_label(key) + (" (lower is better)" if key in COMPARED_LOWER_BETTER else "")
            cells = [c.cell(key) if key != "n_test" else _count(c.metrics.get(key)) for c in columns]
            rows.append(["test images" if key == "n_test" else name, *cells])
    return rows


COMPARISON_NOTE = (
    f"From the evaluate runs in MLflow other than this model's: the best from-scratch baseline "
    f"({C.WEIGHTS_TAG} = {BASELINE_WEIGHTS}) and the best other pretrained model, each by test ROC-AUC."
)


def _count(value: float | None) -> str:
    return NO_CI if value is None else str(int(value))


def comparison_section(this: RunFigures, comparison: Comparison) -> str:
    if not comparison.columns:
        return _p(f"Nothing to compare yet: {comparison.reason}.")
    columns = [this, *comparison.columns]
    parts = [_p(COMPARISON_NOTE, "note"), _html_table(comparison_table(columns))]
    parts += [_p(f"{c.name}: {c.source}.", "note") for c in comparison.columns]
    sizes = {c.metrics.get("n_test") for c in columns}
    if len(sizes) > 1:
        parts.append(
            _p("The test sets differ in size: these runs were not evaluated on the same images.", "warn")
        )
    keys = [k for k in COMPARED if all(not math.isnan(c.value(k)) for c in columns)]
    if keys:
        parts.append(_img(figure_to_data_uri(plot_comparison(columns, keys)), "comparison"))
    return "".join(parts)


def comparison_line(this: RunFigures, comparison: Comparison) -> str:
    if not comparison.columns:
        return f"Comparison: nothing to compare yet ({comparison.reason})."
    parts = []
    for column in comparison.columns:
        delta = this.value("roc_auc") - column.value("roc_auc")
        shown = "n/a" if math.isnan(delta) else f"{delta:+.4f}"
        parts.append(f"{column.name} {format_metric(column.metrics.get('roc_auc'))} (this model {shown})")
    return "ROC-AUC vs " + "; ".join(parts) + "."


# ------------------------------------------------------------------ the documents

CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.headline td:nth-child(4),table.headline th:nth-child(4){text-align:left;color:#555}
img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}.row{display:flex;gap:2em;flex-wrap:wrap}
nav{columns:3;background:#f6f8fa;padding:0.5em 1em;border:1px solid #ddd}nav a{display:block;color:#0550ae}
.gallery,.cams{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin-bottom:1em}
.cam{display:flex;flex-wrap:wrap;gap:8px;border:1px solid #ddd;border-top:4px solid #1a7f37;padding:6px}
.cam.wrong{border-top-color:#b00020}.cam h3{width:100%;margin:0;font-size:13px;text-transform:uppercase}
.cam.wrong h3{color:#b00020}.cam.correct h3{color:#1a7f37}figure.card{margin:0;width:140px;font-size:12px;line-height:1.35}
img.thumb{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#000}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#eee;color:#666}
.note{color:#555;max-width:60em}.warn{color:#b00020}"""


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    body: str


def render_html(classes: list[str], sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tlpipe report</title><style>{CSS}</style></head>
<body><h1>tlpipe report</h1>
<p>Classes: {html.escape(", ".join(classes))}</p>
<nav>{nav}</nav>
{body}
</body></html>
"""


def render_markdown(
    metrics: dict, classes: list[str], this: RunFigures, comparison: Comparison, html_path: Path
) -> str:
    parts = [
        "# tlpipe report",
        f"Classes: {', '.join(classes)}",
        _md_table(headline(metrics, classes, explained=False)),
    ]
    rule = decision_rule(metrics, classes)
    if rule:
        parts.append(rule)
    if len(classes) <= MARKDOWN_MAX_CLASSES and metrics.get("per_class"):
        parts.append(_md_table(metrics_table(metrics)))
    parts.append(comparison_line(this, comparison))
    parts.append(f"Full report with figures: {html_path} (self-contained, opens offline).")
    return "\n\n".join(parts) + "\n"


def headline_section(metrics: dict, classes: list[str]) -> str:
    parts = [_html_table(headline(metrics, classes), "headline")]
    if metrics.get("ci"):
        resamples = metrics.get("bootstrap_resamples")
        parts.append(
            _p(
                f"Intervals: bootstrap percentile intervals over {resamples} resamples of the test images; "
                "the decisions themselves are fixed, so they show the uncertainty from which images were "
                "tested.",
                "note",
            )
        )
    rule = decision_rule(metrics, classes)
    if rule:
        parts.append(_p(rule))
    at_half = at_half_table(metrics)
    if at_half:
        parts.append(
            _p("The same decision metrics at the conventional cut-off of 0.5:") + _html_table(at_half)
        )
    points = operating_points_table(metrics)
    if points:
        parts.append(
            _p(
                "Other operating points. Each cut-off is chosen on the val split, as the one in use is "
                "(evaluate.threshold picks the rule). Test figures far from the val ones mean that the val "
                "split does not look like the test population."
            )
            + _html_table(points)
        )
    return "".join(parts)


def figure_section(uris: list[tuple[str, str]], missing: str) -> str:
    if not uris:
        return _p(missing)
    return '<div class="row">' + "".join(_img(uri, alt) for alt, uri in uris) + "</div>"


def build_sections(
    metrics: dict,
    classes: list[str],
    evaluation_dir: Path,
    histories: tuple[list[dict], list[dict]],
    augmented_dir: Path | None,
    model_path: Path | None,
    dataset: str,
    comparison: str,
    params_text: str,
) -> list[Section]:
    frozen, fine = histories
    confusion = []
    if metrics.get("confusion_matrix"):
        confusion.append(
            ("confusion", figure_to_data_uri(plot_confusion(metrics["confusion_matrix"], classes)))
        )
    # two classes: the matrix counts the decisions at the chosen cut-off, not at 0.5
    cut_off = (
        _p("Decisions at the cut-off given under Test metrics.", "note")
        if decision_rule(metrics, classes)
        else ""
    )
    curves = []
    roc = load_curves(evaluation_dir / "roc", ("fpr", "tpr"))
    pr = load_curves(evaluation_dir / "pr", ("recall", "precision"))
    if roc:
        curves.append(("roc", figure_to_data_uri(plot_roc(roc))))
    if pr:
        curves.append(("pr", figure_to_data_uri(plot_pr(pr))))
    calibration = _numeric_rows(evaluation_dir / "calibration.csv", ("confidence", "accuracy", "count"))
    if calibration:
        reliability = figure_to_data_uri(plot_reliability(calibration, metrics.get("ece")))
        curves.append(("reliability", reliability))
    training = []
    if frozen or fine:
        training.append(("training", figure_to_data_uri(plot_training_curves(frozen, fine))))
    predictions = _optional_rows(evaluation_dir / "predictions.csv")
    mistakes = confident_mistakes(predictions, GALLERY_SIZE)
    if mistakes:
        gallery = mistake_cards(mistakes, augmented_dir)
    else:
        gallery = _p("No mistakes on the test split." if predictions else "No per-image predictions found.")
    return [
        Section("headline", "Test metrics", headline_section(metrics, classes)),
        Section("per-class", "Per class", _html_table(metrics_table(metrics))),
        Section("confusion", "Confusion matrix", figure_section(confusion, "no confusion matrix") + cut_off),
        Section("curves", "ROC, precision-recall and reliability", figure_section(curves, "no curves found")),
        Section("training", "Training", figure_section(training, "no training history")),
        Section("mistakes", "Most confident mistakes", gallery),
        Section("gradcam", "Grad-CAM", gradcam_section(predictions, model_path, augmented_dir, classes)),
        Section("dataset", "Dataset", dataset),
        Section("comparison", "Comparison with earlier models", comparison),
        Section("params", "Parameters", f"<pre>{html.escape(params_text)}</pre>"),
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
) -> None:
    """The report stage: report.html and summary.md from the evaluation, the histories and the data."""
    evaluation_dir = Path(evaluation_dir)
    metrics = read_json(evaluation_dir / "metrics.json")
    classes = class_names(metrics, augmented_dir)
    this = figures_from_metrics(metrics, params.train_frozen.weights, evaluation_dir / "metrics.json")
    comparison = find_comparison(metrics)
    summary = _optional_json(split_summary)
    dataset = dataset_section(summary if isinstance(summary, dict) else None, _optional_rows(quarantine))
    sections = build_sections(
        metrics,
        classes,
        evaluation_dir,
        (_history(frozen_history), _history(fine_history)),
        augmented_dir,
        model_path,
        dataset,
        comparison_section(this, comparison),
        yaml.safe_dump(params.model_dump(include=set(PIPELINE_SECTIONS)), sort_keys=False),
    )
    for path, text in (
        (html_out, render_html(classes, sections)),
        (markdown_out, render_markdown(metrics, classes, this, comparison, html_out)),
    ):
        # utf-8: what the HTML declares, whatever the locale; atomic: a kill never truncates it
        atomic_write(Path(path), lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    with tracking.stage_run("report", flat_params(params, PIPELINE_SECTIONS)):
        tracking.log_metrics({k: metrics[k] for k in ("accuracy", "macro_f1") if metrics.get(k) is not None})
        tracking.log_artifact(str(html_out))
        tracking.log_artifact(str(markdown_out))
    print(f"report: wrote {html_out} and {markdown_out}")


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
    )
