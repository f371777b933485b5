"""The matplotlib figures of the report, embedded as PNG data URIs."""

from __future__ import annotations

from tlpipe.report import figures


def test_class_names_with_dollars_are_plotted_as_written() -> None:
    classes = ["$\\frac{$", "a$b"]  # as mathtext the first would not even parse
    assert figures.figure_to_data_uri(figures.plot_confusion([[1, 2], [3, 4]], classes)).startswith("data:")
    curves = {c: [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 1.0, "tpr": 1.0}] for c in classes}
    assert figures.figure_to_data_uri(figures.plot_roc(curves)).startswith("data:")
