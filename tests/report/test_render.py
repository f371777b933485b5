"""The two documents: the HTML page from its template, and the Markdown summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_cases import METRICS, SECTIONS, full_inputs, make_inputs, report

from tlpipe.report.page import (
    CamPanel,
    CamPanels,
    Card,
    Figure,
    FigureRow,
    Gallery,
    Heading,
    Paragraph,
    Prediction,
    Preformatted,
    Section,
    Table,
)
from tlpipe.report.render import environment, render_html

# Debian's name, Ubuntu's and Google's (GitHub's runners ship Google Chrome)
CHROMIUM = next(
    filter(
        None, map(shutil.which, ("chromium", "google-chrome", "google-chrome-stable", "chromium-browser"))
    ),
    None,
)
WINDOW = (1280, 2000)
SCRIPT = "<script>alert('x')</script>"
ESCAPED = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"


def _screenshot(page: Path, out: Path, profile: Path) -> subprocess.CompletedProcess:
    """Chromium renders the page offline: every proxied request and every host lookup fails."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI containers run as root, where the sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # a container's small /dev/shm otherwise crashes the renderer
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.resolve().as_uri(),
    ]
    # HOME too: Chromium also writes caches under it
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)


def test_html_has_every_section_linked_from_the_top(tmp_path: Path) -> None:
    page, _ = report(make_inputs(tmp_path))
    for anchor, title in SECTIONS.items():
        assert f'<a href="#{anchor}">{title}</a>' in page
        assert f'<section id="{anchor}"><h2>{title}</h2>' in page


def test_markdown_summary_is_short_and_has_the_headline_with_intervals(tmp_path: Path) -> None:
    _, lines = report(make_inputs(tmp_path))
    assert len(lines) < 40
    assert lines[0] == "# tlpipe report"
    table = lines[lines.index("| metric | value | 95% CI |") :]
    assert table[1] == "|---|---|---|"
    assert table[2:9] == [
        "| accuracy | 0.8125 | [0.6250, 0.9375] |",
        "| balanced accuracy | 0.8222 | [0.6400, 0.9500] |",
        "| macro F1 | 0.7431 | [0.5500, 0.9100] |",
        "| ROC-AUC | 0.9012 | [0.8000, 0.9800] |",
        "| PR-AUC | 0.8456 | - |",
        "| calibration error (ECE) | 0.0712 | - |",
        "| test images | 16 |  |",
    ]
    assert "| cat | 1.000 | 0.667 | 0.800 | 6 |" in lines
    assert "| <b>&fox\\|ü | 0.800 | 0.800 | 0.800 | 5 |" in lines  # one cell, not two
    assert any(line.startswith("Comparison: nothing to compare yet") for line in lines)


def test_markdown_summary_stays_short_with_many_classes(tmp_path: Path) -> None:
    classes = [f"class {i}" for i in range(30)]
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for c in classes}
    metrics = {**METRICS, "per_class": per_class, "confusion_matrix": np.eye(30, dtype=int).tolist()}
    _, lines = report(make_inputs(tmp_path, metrics=metrics, curves=False, images=False))
    assert len(lines) < 40
    assert "| class 0 | 0.500 | 0.500 | 0.500 | 3 |" not in lines  # left to the HTML
    assert "| accuracy | 0.8125 | [0.6250, 0.9375] |" in lines


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path, tiny_model) -> None:
    inputs = full_inputs(tmp_path, tiny_model)
    page, _ = report(inputs)
    assert not re.search(r"https?:", page, re.IGNORECASE)  # nothing for the browser to fetch
    shot = tmp_path / "screenshot.png"
    started = time.monotonic()
    proc = _screenshot(inputs["html_out"], shot, tmp_path / "chromium-profile")
    print(f"screenshot: {shot} ({time.monotonic() - started:.1f} s)")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    pixels = np.asarray(image).reshape(-1, 3).astype(np.int16)
    colours = len(np.unique(pixels, axis=0))
    inked = (pixels.min(axis=1) < 200).mean()  # text, table borders, figures
    coloured = (np.ptp(pixels, axis=1) > 60).mean()  # saturated: only the figures and images are
    assert colours > 500, colours
    assert inked > 0.03, inked
    assert coloured > 0.01, coloured


def test_values_with_markup_are_escaped_once_in_every_kind_of_block() -> None:
    card = Card(Figure(SCRIPT, "data:image/png;base64,AAAA", "thumb"), Prediction(SCRIPT, SCRIPT, "0.500"))
    blocks = [
        Paragraph(SCRIPT, "note"),
        Table([["class", SCRIPT], [SCRIPT, "1 & 2"]]),
        FigureRow([Figure(SCRIPT, "data:image/png;base64,AAAA")]),
        Heading(SCRIPT),
        Preformatted(SCRIPT),
        Gallery([card, Card(None, SCRIPT, SCRIPT)]),
        CamPanels([CamPanel("wrong", [card])]),
    ]
    page = render_html([SCRIPT], [Section("odd", SCRIPT, blocks)])
    assert "<script" not in page.lower()
    assert page.count(ESCAPED) == 19  # every value once, escaped once: no "&amp;lt;"
    assert "<td>1 &amp; 2</td>" in page and "&amp;amp;" not in page
    assert 'src="data:image/png;base64,AAAA"' in page  # a data URI needs no escaping and gets none


def test_a_script_in_a_class_name_is_shown_as_text_in_the_report(tmp_path: Path) -> None:
    per_class = {**METRICS["per_class"], SCRIPT: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1}}
    page, lines = report(make_inputs(tmp_path, metrics={**METRICS, "per_class": per_class}, images=False))
    assert "<script" not in page.lower()
    assert f"<td>{ESCAPED}</td>" in page
    assert f"| {SCRIPT} | 0.500 | 0.500 | 0.500 | 1 |" in lines  # Markdown is not HTML: written as is


def test_the_style_sheet_is_inlined_from_its_file() -> None:
    css, _, _ = environment().loader.get_source(environment(), "report.css")
    page = render_html(["a"], [])
    assert css.strip() and css.strip() in page
    assert page.count("<style>") == 1 and "<link" not in page
