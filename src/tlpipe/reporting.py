"""A self-contained HTML report (plots embedded) and a short Markdown summary."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run from shells and CI without a display
import matplotlib.pyplot as plt
import numpy as np
import yaml

from tlpipe import tracking
from tlpipe.config import Params, section_dict
from tlpipe.manifest import read_csv, read_json


def figure_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _history(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    return [{k: float(v) for k, v in row.items()} for row in read_csv(path)]


def plot_training_curves(frozen: list[dict], fine: list[dict]):
    """Loss and accuracy of both phases on one epoch axis, the phase change marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = len(frozen)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for rows, start, phase in ((frozen, 0, "frozen"), (fine, offset, "fine-tune")):
            if not rows:
                continue
            epochs = [start + r["epoch"] for r in rows]
            ax.plot(epochs, [r[metric] for r in rows], "o-", ms=3, label=f"{phase} train")
            ax.plot(epochs, [r[f"val_{metric}"] for r in rows], "s--", ms=3, label=f"{phase} val")
        if fine:
            ax.axvline(offset + 0.5, color="grey", lw=1, ls=":")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def plot_confusion(matrix: list[list[int]], classes: list[str]):
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_title("confusion matrix (test)")
    return fig


def plot_roc(curves: dict[str, list[dict]]):
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for cls, points in curves.items():
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=cls)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (test, one-vs-rest)")
    ax.legend(fontsize=8)
    return fig


def _load_roc(roc_dir: Path) -> dict[str, list[dict]]:
    if not Path(roc_dir).is_dir():
        return {}
    return {
        p.stem: [{k: float(v) for k, v in r.items()} for r in read_csv(p)]
        for p in sorted(Path(roc_dir).glob("*.csv"))
    }


def metrics_table(metrics: dict) -> list[list[str]]:
    rows = [["class", "precision", "recall", "F1", "support"]]
    for cls, v in metrics["per_class"].items():
        rows.append([cls, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])])
    return rows


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        # a "|" in a class name would otherwise split its cell in two
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * len(rows[0]), *[line(r) for r in rows[1:]]])


def format_metric(value: float | None) -> str:
    """None stands for a metric that is undefined on this test split."""
    return "n/a" if value is None else f"{value:.4f}"


def headline(metrics: dict) -> list[list[str]]:
    return [
        ["metric", "value"],
        ["accuracy", format_metric(metrics["accuracy"])],
        ["macro F1", format_metric(metrics["macro_f1"])],
        ["ROC-AUC", format_metric(metrics["roc_auc"])],
        ["test images", str(metrics["n_test"])],
    ]


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto}.row{display:flex;gap:2em;flex-wrap:wrap}"""


def render_html(metrics: dict, classes: list[str], figures: dict[str, str], params_text: str) -> str:
    imgs = {k: f'<img alt="{html.escape(k)}" src="{v}">' for k, v in figures.items()}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tlpipe report</title><style>{CSS}</style></head>
<body><h1>tlpipe report</h1>
<p>Classes: {html.escape(", ".join(classes))}</p>
<h2>Test metrics</h2>{_html_table(headline(metrics))}
<h2>Per class</h2>{_html_table(metrics_table(metrics))}
<h2>Training</h2>{imgs.get("training", "<p>no training history</p>")}
<h2>Confusion matrix and ROC</h2><div class="row">{imgs["confusion"]}{imgs.get("roc", "")}</div>
<h2>Parameters</h2><pre>{html.escape(params_text)}</pre>
</body></html>
"""


def render_markdown(metrics: dict, classes: list[str]) -> str:
    return (
        f"# tlpipe report\n\nClasses: {', '.join(classes)}\n\n"
        f"{_md_table(headline(metrics))}\n\n{_md_table(metrics_table(metrics))}\n"
    )


def write_report(
    metrics_path: Path,
    roc_dir: Path,
    frozen_history: Path,
    fine_history: Path,
    params: Params,
    html_out: Path,
    markdown_out: Path,
) -> None:
    """The report stage."""
    metrics = read_json(metrics_path)
    classes = list(metrics["per_class"])
    frozen, fine = _history(frozen_history), _history(fine_history)
    figures = {"confusion": figure_to_data_uri(plot_confusion(metrics["confusion_matrix"], classes))}
    if frozen or fine:
        figures["training"] = figure_to_data_uri(plot_training_curves(frozen, fine))
    curves = _load_roc(roc_dir)
    if curves:
        figures["roc"] = figure_to_data_uri(plot_roc(curves))
    params_text = yaml.safe_dump(params.model_dump(), sort_keys=False)
    for path, text in (
        (html_out, render_html(metrics, classes, figures, params_text)),
        (markdown_out, render_markdown(metrics, classes)),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")  # what the HTML declares, whatever the locale
    flat_params = {
        k: v for name in Params.model_fields for k, v in section_dict(getattr(params, name), name).items()
    }
    with tracking.stage_run("report", flat_params):
        tracking.log_metrics({"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        tracking.log_artifact(str(html_out))
        tracking.log_artifact(str(markdown_out))
    print(f"report: wrote {html_out} and {markdown_out}")
