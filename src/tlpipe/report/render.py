"""The two documents: the HTML page from its Jinja template, and the Markdown summary.

The page's markup lives in ``templates/report.html.j2`` with its style sheet beside it in
``templates/report.css``; both ship with the package. Autoescape is on for the page, so a
class name or file name with ``<`` or ``&`` in it shows as written and cannot inject markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import jinja2

from tlpipe.report.comparison import Comparison, RunFigures, comparison_line
from tlpipe.report.metrics_view import calibration_line, decision_rule, guard_line, headline, metrics_table
from tlpipe.report.page import Section

TEMPLATE = "report.html.j2"
MARKDOWN_MAX_CLASSES = 8  # more classes: the per-class table is left to the HTML, keeping the summary short


@cache
def environment() -> jinja2.Environment:
    """The template environment, built once: the package's templates, autoescaped."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tlpipe.report", "templates"),
        # the page template ends in .j2; default=True escapes any other template too
        autoescape=jinja2.select_autoescape(["html", "html.j2"], default_for_string=True, default=True),
        # a missing attribute is a bug in the page model, not an empty cell
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,  # the page ends in a newline, like any text file
    )


def render_html(classes: list[str], sections: list[Section]) -> str:
    """The self-contained page: the class list, a linked table of contents, then each section."""
    return environment().get_template(TEMPLATE).render(classes=classes, sections=sections)


def md_table(rows: list[list[str]]) -> str:
    """Rows (the header first) as a Markdown table."""

    def line(cells: list[str]) -> str:
        # a "|" in a class name would otherwise split its cell in two
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * len(rows[0]), *[line(r) for r in rows[1:]]])


def render_markdown(
    metrics: dict,
    classes: list[str],
    this: RunFigures,
    comparison: Comparison,
    html_path: Path,
    cautions: Sequence[str] = (),
) -> str:
    """The CI job summary: the headline metrics, any caution on the data, the decision rule, per
    class when few, the comparison."""
    parts = [
        "# tlpipe report",
        f"Classes: {', '.join(classes)}",
        md_table(headline(metrics, classes, explained=False)),
        *cautions,
    ]
    rule = decision_rule(metrics, classes)
    if rule:
        parts.append(rule)
    shift = (metrics.get("shift") or {}).get("statement")
    parts += [line for line in (calibration_line(metrics), guard_line(metrics), shift) if line]
    if len(classes) <= MARKDOWN_MAX_CLASSES and metrics.get("per_class"):
        parts.append(md_table(metrics_table(metrics)))
    parts.append(comparison_line(this, comparison))
    parts.append(f"Full report with figures: {html_path} (self-contained, opens offline).")
    return "\n\n".join(parts) + "\n"
