"""The report's matplotlib figures, each drawn headless and embedded as a PNG ``data:`` URI."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: stages run from shells and CI without a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tlpipe.core.images import data_uri
from tlpipe.report.metrics_view import metric_label

if TYPE_CHECKING:  # comparison imports this module for its bar chart
    from tlpipe.report.comparison import RunFigures


def plain_text(text: str) -> str:
    """A label matplotlib shows as written: a "$" would otherwise start math mode."""
    return text.replace("$", r"\$")


def figure_to_data_uri(fig: Figure) -> str:
    """The figure as a PNG ``data:`` URI; the figure is closed, so its memory is freed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buf.getvalue())


def plot_training_curves(frozen: list[dict], fine: list[dict]) -> Figure:
    """Loss and accuracy of both phases on one epoch axis, the phase change marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = len(frozen)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
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


def plot_confusion(matrix: list[list[int]], classes: list[str]) -> Figure:
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
        for (i, j), cell in zip(np.ndindex(values.shape), text, strict=True):
            dark = values[i, j] > peak / 2
            ax.text(j, i, cell, ha="center", va="center", fontsize=font, color="white" if dark else "black")
    fig.suptitle("confusion matrix (test)")
    fig.tight_layout()
    return fig


def curve_area(x: Sequence[float], y: Sequence[float]) -> float:
    """The trapezoidal area under a curve given left to right."""
    xs, ys = np.asarray(x), np.asarray(y)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def plot_roc(curves: dict[str, list[dict]]) -> Figure:
    """One-vs-rest ROC curve of each class, its area in the legend."""
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


def plot_pr(curves: dict[str, list[dict]]) -> Figure:
    """One-vs-rest precision-recall curve of each class."""
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


def plot_reliability(
    table: list[dict[str, float]],
    ece: float | None,
    raw: list[dict[str, float]] | None = None,
    raw_ece: float | None = None,
) -> Figure:
    """Accuracy against stated confidence per bin (on the diagonal: calibrated), with bin sizes below;
    with ``raw``, the model's own probabilities before calibration beside the calibrated ones."""
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    confidence = [r["confidence"] for r in table]
    top.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfectly calibrated")
    counts = np.array([r["count"] for r in table], dtype=np.float64)
    # marker area by bin size: a bin of three images should not catch the eye like one of three hundred
    sizes = 15 + 185 * counts / counts.max()
    if raw:
        before = [r["confidence"] for r in raw]
        label = "before calibration" + ("" if raw_ece is None else f" (ECE {raw_ece:.3f})")
        top.plot(before, [r["accuracy"] for r in raw], "--", color="tab:grey", lw=0.8, alpha=0.7)
        top.scatter(before, [r["accuracy"] for r in raw], s=12, color="tab:grey", label=label, zorder=2)
    top.plot(confidence, [r["accuracy"] for r in table], "-", color="tab:red", lw=0.8, alpha=0.5)
    label = "calibrated" if raw else "model"
    top.scatter(confidence, [r["accuracy"] for r in table], s=sizes, color="tab:red", label=label, zorder=3)
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


def plot_comparison(columns: Sequence[RunFigures], keys: Sequence[str]) -> Figure:
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
